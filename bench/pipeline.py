"""Pipeline benchmark: a model split into 2 stages on 2 nodes against the same model as one
service on 1 node, throughput measured side by side in one run (compute-bound case).

    python -m bench.pipeline [--model models/mobilenet_v2/mobilenet_v2_f32.tflite]

Both services are deployed at once on the same two nodes (one worker, one runtime thread
per replica) and measured alternately, `--reps` times each, with `--window` requests in
flight: the pipeline can only win by running its stages at the same time.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.common import REPO, Cluster, Load, Report, camera_frame, machine, spread, until
from mqinfer.node.runtimes import Model, available_backends, warm_up
from mqinfer.split import split_temporarily

DEFAULT_MODEL = REPO / "models" / "mobilenet_v2" / "mobilenet_v2_f32.tflite"
GOAL = 1.7


def compute_bound(model: Path, cuts: list[int], seconds: float = 2.0) -> tuple[float, float]:
    """Runs per second with no messaging at all: the whole model back to back on one
    thread, and the segments each on its own thread at the same time, each fed its own
    zeros (the slowest stage sets the pace). What the machine allows a pipeline."""
    backend = available_backends()["tflite"]

    def rate(models: list[Model]) -> float:
        counts = [0] * len(models)
        stop = time.perf_counter() + seconds
        zeros = [[np.zeros(t.shape, t.dtype) for t in m.inputs] for m in models]

        def loop(i: int) -> None:
            while time.perf_counter() < stop:
                models[i].run(zeros[i])
                counts[i] += 1

        threads = [threading.Thread(target=loop, args=(i,)) for i in range(len(models))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return min(counts) / seconds

    whole = backend.load(str(model), 1)
    warm_up(whole)
    alone = rate([whole])
    with split_temporarily(model, len(cuts) + 1, at=cuts) as (pipeline, folder):
        parts = [backend.load(str(folder / s.manifest.file), 1) for s in pipeline.segments]
        for p in parts:
            warm_up(p)
        together = rate(parts)
    return alone, together


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--segments", type=int, default=2)
    p.add_argument("--count", type=int, default=300, help="requests per measurement")
    p.add_argument("--window", type=int, default=8, help="requests in flight")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-save", action="store_true", help="do not append to bench/RESULTS.md")
    args = p.parse_args(argv)
    report = Report(f"pipeline ({args.model.name}, {args.segments} stages)")
    with tempfile.TemporaryDirectory(prefix="mqinfer-bench-") as tmp:
        cluster = Cluster(Path(tmp))
        try:
            for n in range(1, args.segments + 1):
                cluster.node(f"n{n}")
            until(lambda: len(cluster.status()["nodes"]) == args.segments, "nodes")
            cluster.deploy("--model", str(args.model), "--name", "whole")
            out = cluster.deploy(
                "--model", str(args.model), "--name", "pipe", "--segments", str(args.segments)
            )
            split = [line for line in out.splitlines() if line.startswith("segment ")]
            status = {s["name"]: s for s in cluster.status()["services"]}
            placed = {r["stage"]: r["node"] for r in status["pipe"]["replicas"]}
            whole_on = [r["node"] for r in status["whole"]["replicas"]]
            payload = camera_frame("JPEG")
            loads = {name: Load(cluster.broker, cluster.prefix, name) for name in ("whole", "pipe")}
            for load in loads.values():
                load.run(payload, 30, args.window)  # warm-up
            runs: dict[str, list] = {"whole": [], "pipe": []}
            for _ in range(args.reps):
                for name, load in loads.items():
                    runs[name].append(load.run(payload, args.count, args.window))
            for load in loads.values():
                load.close()
        finally:
            cluster.stop()
    cuts = [int(line.split("ops ")[1].split("-")[1].split(",")[0]) for line in split[:-1]]
    bound_whole, bound_pipe = compute_bound(args.model, cuts)
    tput = {name: [r.throughput for r in rs] for name, rs in runs.items()}
    ratios = [a / b for a, b in zip(tput["pipe"], tput["whole"], strict=True)]
    ratio = statistics.median(ratios)
    verdict = "met" if ratio >= GOAL else f"not met: {GOAL - ratio:.2f} short"
    where = ", ".join(f"stage {k} on {n}" for k, n in sorted(placed.items()))
    report.figure(
        f"pipeline/whole throughput, {args.model.name}, {args.segments} stages: ratio "
        f"{spread(ratios)} (goal >= {GOAL}x: {verdict}); pipeline {spread(tput['pipe'])} req/s "
        f"({where}), whole model {spread(tput['whole'])} req/s (on {', '.join(whole_on)}); "
        f"{args.reps} x {args.count} requests, {args.window} in flight; Mosquitto; {machine()}"
    )
    stages = [r["timing"]["stages"] for run in runs["pipe"] for r in run.bodies]
    per_stage = [
        statistics.median(s[k]["inference_ms"] for s in stages) for k in range(args.segments)
    ]
    whole_ms = statistics.median(
        r["timing"]["inference_ms"] for run in runs["whole"] for r in run.bodies
    )
    report.figure(
        "per-stage model run (median ms, on the nodes): "
        + ", ".join(f"stage {k} {ms:.2f}" for k, ms in enumerate(per_stage))
        + f"; whole model {whole_ms:.2f}"
    )
    report.figure("split (measured on this machine when split): " + "; ".join(split))
    report.figure(
        f"compute bound, no messaging: segments on {args.segments} threads at once / whole model "
        f"back to back = {bound_pipe / bound_whole:.2f} ({bound_pipe:.1f} vs {bound_whole:.1f} "
        f"runs/s, in-process, the same cuts {cuts}): the most a pipeline can gain here"
    )
    for name in ("whole", "pipe"):
        lat = [x for run in runs[name] for x in run.latencies]
        ordered = sorted(lat)
        report.figure(
            f"{name}: latency under load p50 {ordered[len(ordered) // 2] * 1000:.2f} ms, "
            f"p99 {ordered[int(len(ordered) * 0.99)] * 1000:.2f} ms"
        )
    if not args.no_save:
        report.save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
