"""Heterogeneous pool: two nodes of unequal speed serving one service, against each node alone
and against the usual HTTP answer to the same problem. Needs root (cgroups): `sh
bench/setup.sh` first.

    python -m bench.pool [--count 240] [--reps 5] [--no-save]

Two `mqinfer node` processes, each held from its start by a cgroup CPU quota (bench.cpu):
'fast' to 50 % of a core, 'slow' to 12.5 %. MobileNetV2 int8 takes raw uint8 frames, 8
requests in flight, one worker (interpreter) per replica, as nodes run by default. Measured
in interleaved rounds, through one Mosquitto on loopback:
- each node alone (a service pinned to it with --label), and the sum of the two;
- the pool: one service with --replicas 2, on both nodes.
  Goal: pool / sum of the two alone >= 0.9;
- the same two CPU budgets as two FastAPI + uvicorn workers (bench.haproxy: what a node does
  per request, one interpreter each, each worker under its quota) behind HAProxy 2.6
  `balance leastconn`. Goal: pool / HAProxy >= 1.0. Each HTTP worker is also measured
  alone, so HAProxy's share of its own workers' sum is there for context.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.common import (
    REPO,
    Cluster,
    Load,
    Report,
    Run,
    interleaved,
    machine,
    node_command,
    ratios,
    spread,
    verdict,
)
from bench.cpu import CpuQuota
from bench.haproxy import HttpPool
from bench.http import HttpLoad

MOBILENET = REPO / "models" / "mobilenet_v2" / "mobilenet_v2_int8.tflite"
SHARES = {"fast": 0.5, "slow": 0.125}  # of one core
SUM_GOAL = 0.9
HAPROXY_GOAL = 1.0


def start_nodes(
    cluster: Cluster, stack: contextlib.ExitStack
) -> dict[str, subprocess.Popen[bytes]]:
    """One node per share, inside its quota from its first instruction, labelled speed=NAME."""
    procs = {}
    for name, share in SHARES.items():
        quota = stack.enter_context(CpuQuota(share))
        cache = cluster.workdir / f"cache-{name}"
        with (cluster.workdir / f"{name}.log").open("ab") as log:
            procs[name] = quota.popen(
                node_command(
                    cluster.broker.url, cluster.prefix, name, cache, "--label", f"speed={name}"
                ),
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                cwd=REPO,
            )
    return procs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.pool",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--count", type=int, default=240, help="requests per run (the slow one alone: a quarter)"
    )
    p.add_argument("--window", type=int, default=8, help="requests in flight")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-save", action="store_true", help="do not append to bench/RESULTS.md")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.pool needs root (cgroup CPU quotas)", file=sys.stderr)
        return 1
    began = time.monotonic()
    frame = np.random.default_rng(5).integers(0, 256, 224 * 224 * 3, np.uint8).tobytes()
    slow_count = max(args.count // 4, 10)
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mqinfer-bench-")))
        cluster = Cluster(tmp)
        stack.callback(cluster.stop)
        start_nodes(cluster, stack)
        http = stack.enter_context(HttpPool(MOBILENET, list(SHARES.values()), "mnv2"))
        cluster.wait_online(len(SHARES))
        model = ["--model", str(MOBILENET)]
        for name in SHARES:
            cluster.deploy(*model, "--name", f"alone-{name}", "--label", f"speed={name}")
        cluster.deploy(*model, "--name", "pool", "--replicas", str(len(SHARES)))
        services = ("alone-fast", "alone-slow", "pool")
        mq = {n: Load(cluster.broker, cluster.prefix, n) for n in services}
        web = {
            "http-fast": HttpLoad(http.workers[0].port, "mnv2"),
            "http-slow": HttpLoad(http.workers[1].port, "mnv2"),
            "haproxy": HttpLoad(http.port, "mnv2"),
        }
        loads: dict[str, Load | HttpLoad] = {**mq, **web}
        for load in loads.values():
            stack.callback(load.close)

        def measure(name: str) -> Callable[[], Run]:
            count = slow_count if name.endswith("slow") else args.count
            return lambda: loads[name].run(frame, count, args.window)

        for name in loads:  # warm-up: the hub measures each replica, HAProxy opens connections
            loads[name].run(frame, 2 * args.window, args.window)
        served: list[dict[str, int]] = []

        def through_haproxy() -> Run:
            before = http.served()
            run = loads["haproxy"].run(frame, args.count, args.window)
            after = http.served()
            served.append({w: after[w] - before.get(w, 0) for w in after})
            return run

        measures = {name: measure(name) for name in loads} | {"haproxy": through_haproxy}
        runs = interleaved(measures, args.reps)
    tput = {name: [r.throughput for r in rs] for name, rs in runs.items()}
    alone = [a + b for a, b in zip(tput["alone-fast"], tput["alone-slow"], strict=True)]
    http_alone = [a + b for a, b in zip(tput["http-fast"], tput["http-slow"], strict=True)]
    of_sum = ratios(tput["pool"], alone)
    of_haproxy = ratios(tput["pool"], tput["haproxy"])
    fast_share = [sum(b["node"] == "fast" for b in r.bodies) / len(r.bodies) for r in runs["pool"]]
    http_share = [s["w0"] / max(1, sum(s.values())) for s in served]
    report = Report("heterogeneous pool")
    where = (
        f"MobileNetV2 int8 raw frames, {args.window} in flight, quotas "
        f"{', '.join(f'{n} {s:.1%}' for n, s in SHARES.items())} of a core; Mosquitto; {machine()}"
    )
    report.figure(
        f"heterogeneous pool / sum of the nodes alone = {spread(of_sum)} (goal >= {SUM_GOAL}: "
        f"{verdict(statistics.median(of_sum), SUM_GOAL)}); pool {spread(tput['pool'])} req/s, "
        f"fast alone {spread(tput['alone-fast'])}, slow alone {spread(tput['alone-slow'])}; "
        f"share answered by the fast node {spread(fast_share)}; {args.reps} x {args.count} "
        f"requests (slow alone {slow_count}); {where}"
    )
    report.figure(
        f"heterogeneous pool / HAProxy leastconn = {spread(of_haproxy)} (goal >= "
        f"{HAPROXY_GOAL}: {verdict(statistics.median(of_haproxy), HAPROXY_GOAL)}); HAProxy "
        f"{spread(tput['haproxy'])} req/s = {spread(ratios(tput['haproxy'], http_alone))} of "
        f"its workers alone (fast {spread(tput['http-fast'])}, slow "
        f"{spread(tput['http-slow'])}); share sent to the fast worker {spread(http_share)}; "
        f"FastAPI + uvicorn workers under the same quotas; {where}"
    )
    report.figure(
        f"pool latency under load, p50: mqinfer {spread([r.p50_ms() for r in runs['pool']])} ms, "
        f"HAProxy {spread([r.p50_ms() for r in runs['haproxy']])} ms; run took "
        f"{time.monotonic() - began:.0f} s"
    )
    if not args.no_save:
        report.save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
