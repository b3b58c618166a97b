"""`make bench`: every benchmark, one after another, each against its baseline in the same
run; each prints one line per figure and appends them to bench/RESULTS.md.

    python -m bench.run [--only latency,pool,...] [--no-save]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from bench.common import REPO

# name -> module; the order keeps the quick ones first
BENCHMARKS = {
    "latency": "bench.latency",  # 1, 2 and 5: latency overhead, single-node throughput, brokers
    "pool": "bench.pool",  # 3: heterogeneous pool
    "scale": "bench.scale",  # 4: coordinator at 1000 nodes
    "http": "bench.http",  # 6: against a FastAPI + uvicorn endpoint
    "pipeline": "bench.pipeline",  # a 2-stage pipeline against the whole model
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
