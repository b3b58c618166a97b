"""Heterogeneous pool: a fast node and a node about 4x slower serving one service.

    python -m bench.pool [--no-save]

In one run, with MobileNetV2 int8 (raw frames, 16 in flight, one worker per replica):
- each node alone (a service pinned to it by label): their throughputs, and their sum;
- the pool, routed by measured capacity (the default): against that sum (goal >= 90 %);
- the same pool routed evenly (what round robin does): the trap the measured routing avoids.
The slow node runs with --artificial-slowdown 4 (for experiments only): its model runs
really take 4x as long, which is what its measurements see.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np

from bench.common import REPO, Cluster, Load, Report, machine, spread, until

MOBILENET = REPO / "models" / "mobilenet_v2" / "mobilenet_v2_int8.tflite"
GOAL = 0.9
SLOWDOWN = 4


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.pool", description=__doc__)
    p.add_argument("--count", type=int, default=200, help="requests per measurement")
    p.add_argument("--window", type=int, default=16, help="requests in flight")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-save", action="store_true", help="do not append to bench/RESULTS.md")
    args = p.parse_args(argv)
    frame = np.random.default_rng(5).integers(0, 256, 224 * 224 * 3, np.uint8).tobytes()
    with tempfile.TemporaryDirectory(prefix="mqinfer-bench-") as tmp:
        cluster = Cluster(Path(tmp))
        try:
            cluster.node("fast", "--label", "speed=fast")
            cluster.node("slow", "--label", "speed=slow", "--artificial-slowdown", str(SLOWDOWN))
            until(lambda: len(cluster.status()["nodes"]) == 2, "nodes")
            model = ["--model", str(MOBILENET)]
            cluster.deploy(*model, "--name", "alone-fast", "--label", "speed=fast")
            cluster.deploy(*model, "--name", "alone-slow", "--label", "speed=slow")
            cluster.deploy(*model, "--name", "pool", "--replicas", "2")
            cluster.deploy(*model, "--name", "even", "--replicas", "2", "--routing", "even")

            def weighed() -> bool:
                services = {s["name"]: s for s in cluster.status()["services"]}
                return all(r.get("weight") for r in services["pool"]["replicas"])

            until(weighed, "routing weights for the pool")
            names = ["alone-fast", "alone-slow", "pool", "even"]
            loads = {n: Load(cluster.broker, cluster.prefix, n) for n in names}
            for load in loads.values():
                load.run(frame, 40, args.window)  # warm-up (and the first measurements)
            tput: dict[str, list[float]] = {n: [] for n in names}
            shares: dict[str, list[float]] = {"pool": [], "even": []}
            for _ in range(args.reps):
                for n in names:
                    run = loads[n].run(frame, args.count, args.window)
                    tput[n].append(run.throughput)
                    if n in shares:
                        fast = sum(b["node"] == "fast" for b in run.bodies)
                        shares[n].append(fast / len(run.bodies))
            weights = {
                r["node"]: r["weight"]
                for s in cluster.status()["services"]
                if s["name"] == "pool"
                for r in s["replicas"]
            }
            for load in loads.values():
                load.close()
        finally:
            cluster.stop()
    total = [a + b for a, b in zip(tput["alone-fast"], tput["alone-slow"], strict=True)]
    of_sum = [a / b for a, b in zip(tput["pool"], total, strict=True)]
    vs_even = [a / b for a, b in zip(tput["pool"], tput["even"], strict=True)]
    ratio = statistics.median(of_sum)
    verdict = "met" if ratio >= GOAL else f"not met: {GOAL - ratio:.2f} short"
    report = Report("heterogeneous pool")
    where = f"Mosquitto; {machine()}"
    report.figure(
        f"heterogeneous pool / sum of the nodes alone = {spread(of_sum)} (goal >= {GOAL}: "
        f"{verdict}); pool {spread(tput['pool'])} req/s, fast alone "
        f"{spread(tput['alone-fast'])}, slow (x{SLOWDOWN}) alone {spread(tput['alone-slow'])}; "
        f"MobileNetV2 int8, {args.window} in flight, {args.reps} x {args.count}; {where}"
    )
    report.figure(
        f"measured routing / even routing = {spread(vs_even)}; even {spread(tput['even'])} "
        f"req/s; share answered by the fast node: measured {spread(shares['pool'])}, even "
        f"{spread(shares['even'])}; weights {weights}; {where}"
    )
    if not args.no_save:
        report.save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
