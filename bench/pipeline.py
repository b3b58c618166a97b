"""Pipeline benchmark: a model split into 2 stages on 2 nodes against the same model as one
service on 1 node, throughput measured side by side in one run (compute-bound case).

    python -m bench.pipeline [--model models/mobilenet_v2/mobilenet_v2_f32.tflite]

Both services are deployed at once on the same two nodes (one worker, one runtime thread
per replica) and measured alternately, `--reps` times each, with `--window` requests in
flight: the pipeline can only win by running its stages at the same time. In each round
the ceiling is measured too, in this process with no messaging: the same segments on one
thread each at once against the whole model back to back. Goal: the pipeline's gain over
the whole model is at least 0.9 of the ceiling's gain, round by round.
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
GOAL = 0.9  # of the ceiling's gain


class Ceiling:
    """What the machine allows a pipeline: runs per second with no messaging at all, the
    whole model back to back on one thread, and the segments each on its own thread at the
    same time, each fed its own zeros (the slowest stage sets the pace)."""

    def __init__(self, model: Path, cuts: list[int]) -> None:
        backend = available_backends()["tflite"]
        self.whole = backend.load(str(model), 1)
        with split_temporarily(model, len(cuts) + 1, at=cuts) as (pipeline, folder):
            self.parts = [backend.load(str(folder / s.manifest.file), 1) for s in pipeline.segments]
        for m in [self.whole, *self.parts]:
            warm_up(m)

    def measure(self, seconds: float = 1.0) -> tuple[float, float]:
        """(whole model alone, segments together) in runs per second."""
        return _rate([self.whole], seconds), _rate(self.parts, seconds)


def _rate(models: list[Model], seconds: float) -> float:
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
            cuts = [int(line.split("ops ")[1].split("-")[1].split(",")[0]) for line in split[:-1]]
            ceiling = Ceiling(args.model, cuts)
            status = {s["name"]: s for s in cluster.status()["services"]}
            placed = {r["stage"]: r["node"] for r in status["pipe"]["replicas"]}
            whole_on = [r["node"] for r in status["whole"]["replicas"]]
            payload = camera_frame("JPEG")
            loads = {name: Load(cluster.broker, cluster.prefix, name) for name in ("whole", "pipe")}
            for load in loads.values():
                load.run(payload, 30, args.window)  # warm-up
            runs: dict[str, list] = {"whole": [], "pipe": []}
            bound: list[tuple[float, float]] = []
            for _ in range(args.reps):
                for name, load in loads.items():
                    runs[name].append(load.run(payload, args.count, args.window))
                bound.append(ceiling.measure())
            for load in loads.values():
                load.close()
        finally:
            cluster.stop()
    tput = {name: [r.throughput for r in rs] for name, rs in runs.items()}
    ratios = [a / b for a, b in zip(tput["pipe"], tput["whole"], strict=True)]
    gains = [together / alone for alone, together in bound]
    of_ceiling = [r / g for r, g in zip(ratios, gains, strict=True)]
    share = statistics.median(of_ceiling)
    verdict = "met" if share >= GOAL else f"not met: {GOAL - share:.2f} short"
    where = ", ".join(f"stage {k} on {n}" for k, n in sorted(placed.items()))
    report.figure(
        f"pipeline gain / ceiling gain, {args.model.name}, {args.segments} stages: "
        f"{spread(of_ceiling)} (goal >= {GOAL}: {verdict}); pipeline/whole throughput "
        f"{spread(ratios)}, the ceiling's (segments on {args.segments} threads at once / whole "
        f"model back to back, in-process, no messaging, the same cuts {cuts}) {spread(gains)}, "
        f"measured in the same rounds"
    )
    report.figure(
        f"pipeline {spread(tput['pipe'])} req/s ({where}), whole model {spread(tput['whole'])} "
        f"req/s (on {', '.join(whole_on)}); {args.reps} x {args.count} requests, "
        f"{args.window} in flight; Mosquitto; {machine()}"
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
        "ceiling runs/s: whole model "
        + spread([a for a, _ in bound])
        + ", segments together "
        + spread([t for _, t in bound])
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
