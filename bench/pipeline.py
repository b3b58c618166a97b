"""Pipeline benchmark: a model split into 2 stages on 2 nodes against the same model as one
service on 1 node, throughput measured side by side in one run (compute-bound case).

    python -m bench.pipeline [--model models/mobilenet_v2/mobilenet_v2_f32.tflite]

Both services are deployed at once on the same two nodes (one worker, one runtime thread
per replica) and measured alternately, `--reps` times each, with `--window` requests in
flight: the pipeline can only win by running its stages at the same time. In each round
the ceiling is measured too, in this process with no messaging: the same segments on one
thread each at once against the whole model back to back. Goal: the pipeline's gain over
the whole model is at least 0.9 of the ceiling's gain, round by round.

Where the machine's CPU goes during the pipeline's rounds is accounted per process (psutil):
the model runs (the stages' own timings) against everything else a request costs here, the
broker, the hub, the nodes' messaging and decoding, and the requester (this process). On
this machine they all share the cores the ceiling gives the segments alone; the CPU per
request bounds what the pipeline can reach here.
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

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


class Accounts:
    """CPU seconds (user + system) of the cluster's processes and this one, by role."""

    def __init__(self, cluster: Cluster) -> None:
        self.procs: dict[str, psutil.Process] = {"requester": psutil.Process()}
        if cluster.broker.proc is not None:
            self.procs["broker"] = psutil.Process(cluster.broker.proc.pid)
        for p in cluster.procs.all:  # the coordinator, and the nodes by their ids
            self.procs[p.name if p.name == "coordinator" else f"node {p.name}"] = psutil.Process(
                p.proc.pid
            )
        self.seconds: dict[str, float] = dict.fromkeys(self.procs, 0.0)

    def read(self) -> dict[str, float]:
        out = {}
        for who, proc in self.procs.items():
            t = proc.cpu_times()
            out[who] = t.user + t.system
        return out

    def add(self, before: dict[str, float], after: dict[str, float]) -> None:
        for who in self.seconds:
            self.seconds[who] += after[who] - before[who]


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
            accounts = Accounts(cluster)
            for _ in range(args.reps):
                for name, load in loads.items():
                    before = accounts.read()
                    runs[name].append(load.run(payload, args.count, args.window))
                    if name == "pipe":
                        accounts.add(before, accounts.read())
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
    served = sum(len(run.bodies) for run in runs["pipe"])
    spent = {who: seconds * 1000 / served for who, seconds in accounts.seconds.items()}
    parts = {
        "nodes": sum(ms for who, ms in spent.items() if who.startswith("node")),
        "Mosquitto": spent["broker"],
        "hub": spent["coordinator"],
        "requester": spent["requester"],
    }
    total = sum(parts.values())
    alone = sum(float(ms) for ms in re.findall(r"([\d.]+) ms here", " ".join(split)))
    cores = psutil.cpu_count() or 1
    most = cores * 1000 / total  # req/s if every core did nothing else
    whole = statistics.median(tput["whole"])
    report.figure(
        f"CPU per pipeline request, accounted per process over its rounds: {total:.2f} ms = "
        + " + ".join(f"{who} {ms:.2f}" for who, ms in parts.items())
        + f" (the nodes' includes their model runs: the segments alone took {alone:.2f} ms "
        f"when split); {cores} cores doing nothing else allow {most:.0f} req/s = "
        f"{most / whole:.2f}x the whole model's {whole:.0f} req/s, against the ceiling's gain "
        f"{statistics.median(gains):.2f}: at most {most / whole / statistics.median(gains):.2f} "
        "of the ceiling on this machine"
    )
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
