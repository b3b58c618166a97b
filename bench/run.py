"""`make bench`: every benchmark, one after another, each against its baseline in the same
run; each prints one line per figure and appends them to bench/RESULTS.md.

    python -m bench.run [--only loopback,pool,...] [--no-save]

`pool` and `site` need root (cgroups; network namespaces and tc) and what bench/setup.sh
installs (HAProxy); `make bench` runs that first.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from bench.common import REPO

# name -> module; the order keeps the quick ones first
BENCHMARKS = {
    "loopback": "bench.loopback",  # digits latency: the hand-written node, async FastAPI
    "scale": "bench.scale",  # the coordinator with 1000 simulated nodes
    "latency": "bench.latency",  # latency overhead and one node's throughput, two brokers
    "http": "bench.http",  # against FastAPI + uvicorn endpoints (sync and async)
    "pool": "bench.pool",  # heterogeneous pool (CPU quotas) against HAProxy leastconn
    "pipeline": "bench.pipeline",  # a 2-stage pipeline against the whole model
    "site": "bench.site",  # an emulated edge site: link bytes, throughput, delayed latency
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    p.add_argument("--only", help=f"comma-separated, from {', '.join(BENCHMARKS)}")
    p.add_argument("--no-save", action="store_true", help="do not append to bench/RESULTS.md")
    args = p.parse_args(argv)
    chosen = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = [c for c in chosen if c not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; expected some of {list(BENCHMARKS)}")
    started = time.monotonic()
    failed = []
    for name in chosen:
        print(f"== {name}", flush=True)
        t = time.monotonic()
        extra = ["--no-save"] if args.no_save else []
        rc = subprocess.run([sys.executable, "-m", BENCHMARKS[name], *extra], cwd=REPO).returncode
        print(f"== {name}: {time.monotonic() - t:.0f} s" + (f", exit {rc}" if rc else ""))
        if rc:
            failed.append(name)
    print(f"== all: {time.monotonic() - started:.0f} s" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
