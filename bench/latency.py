"""Latency overhead and single-node throughput, on Mosquitto and on the embedded broker.

    python -m bench.latency [--brokers mosquitto,amqtt] [--no-save]

For each broker, one node serves the digits CNN and MobileNetV2 (int8), one worker with
one runtime thread each; requests go through the coordinator (the hub), which gives each to
the node as work and forwards its answer. In the same run:
1. latency: requests one at a time, end to end (publish to result received), against
   (a) the bare interpreter's run time for the same input and (b) the round-trip floor: a
   bare paho echo through the same broker with the same payload (on a topic prefix the
   coordinator does not serve). Goal: p50 end to end minus the run time <= 1.5 x the
   floor's p50 (through the hub a request makes two round trips, the echo one).
2. throughput with 8 requests in flight, against the bare interpreter running the same
   input back to back with the same number of threads. Goal: >= 90 %.
Frames go as raw tensors where the model takes uint8 (no decoding), as PNG for digits.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import REPO, Cluster, Echo, Load, Report, machine, spread, until
from mqinfer.node.runtimes import available_backends
from mqinfer.protocol.payload import decode_request
from mqinfer.servicefile import read_model

DIGITS = REPO / "models" / "digits" / "digits_int8.tflite"
MOBILENET = REPO / "models" / "mobilenet_v2" / "mobilenet_v2_int8.tflite"
SAMPLE = REPO / "models" / "digits" / "samples" / "digit_7_0.png"
LATENCY_GOAL = 1.5
THROUGHPUT_GOAL = 0.9


def payloads() -> dict[str, tuple[Path, bytes]]:
    rng = np.random.default_rng(3)
    frame = rng.integers(0, 256, (1, 224, 224, 3), dtype=np.uint8).tobytes()
    return {"digits": (DIGITS, SAMPLE.read_bytes()), "mnv2": (MOBILENET, frame)}


def bare_ms(path: Path, payload: bytes, runs: int) -> list[float]:
    """The model run alone (ms each), on the input the node would feed it."""
    info = read_model(path)
    model = available_backends()["tflite"].load(str(path), 1)
    prep = info.manifest.preprocessing if info.manifest else None
    arrays = decode_request(payload, model.inputs, prep, max_bytes=1 << 26).arrays
    for _ in range(5):
        model.run(arrays)
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        model.run(arrays)
        out.append((time.perf_counter() - t) * 1000)
    model.close()
    return out


def p50(values: list[float]) -> float:
    return statistics.median(values)


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def one_broker(kind: str, count: int, reps: int, report: Report) -> None:
    with tempfile.TemporaryDirectory(prefix="mqinfer-bench-") as tmp:
        cluster = Cluster(Path(tmp), kind)
        try:
            cluster.node("n1")
            until(lambda: len(cluster.status()["nodes"]) == 1, "the node")
            work = payloads()
            for name, (path, _) in work.items():
                cluster.deploy("--model", str(path), "--name", name)
            echo = Echo(cluster.broker, cluster.aside("echo"))
            loads = {name: Load(cluster.broker, cluster.prefix, name) for name in work}
            try:
                figures = {
                    name: measure(loads[name], echo.load, path, payload, count, reps)
                    for name, (path, payload) in work.items()
                }
            finally:
                echo.close()
                for load in loads.values():
                    load.close()
        finally:
            cluster.stop()
    where = f"{'Mosquitto' if kind == 'mosquitto' else 'embedded amqtt'}; {machine()}"
    for name, f in figures.items():
        overhead = f["e2e_p50"] - f["run_p50"]
        ratio = overhead / f["floor_p50"]
        verdict = "met" if ratio <= LATENCY_GOAL else f"not met: {ratio - LATENCY_GOAL:.2f} over"
        report.figure(
            f"latency overhead, {name}: (p50 end to end - model run) / round-trip floor p50 = "
            f"{ratio:.2f} (goal <= {LATENCY_GOAL}: {verdict}); end to end p50 "
            f"{f['e2e_p50']:.3f} ms, p99 {f['e2e_p99']:.3f} ms; model run p50 "
            f"{f['run_p50']:.3f} ms; paho echo floor p50 {f['floor_p50']:.3f} ms, p99 "
            f"{f['floor_p99']:.3f} ms ({f['bytes']} B payload, QoS 1); {where}"
        )
    for name, f in figures.items():
        ratio = statistics.median(f["tput_ratios"])
        verdict = (
            "met" if ratio >= THROUGHPUT_GOAL else f"not met: {THROUGHPUT_GOAL - ratio:.2f} short"
        )
        report.figure(
            f"single-node throughput, {name}: node / bare interpreter = "
            f"{spread(f['tput_ratios'])} (goal >= {THROUGHPUT_GOAL}: {verdict}); node "
            f"{spread(f['node_rps'])} req/s with 8 in flight, bare interpreter "
            f"{spread(f['bare_rps'])} runs/s; 1 worker x 1 thread; {where}"
        )


def measure(
    load: Load, echo: Load, path: Path, payload: bytes, count: int, reps: int
) -> dict[str, Any]:
    load.run(payload, 30, 1)  # warm-up
    echo.run(payload, 30, 1, results=False)
    e2e: list[float] = []
    floor: list[float] = []
    run: list[float] = []
    node_rps: list[float] = []
    bare_rps: list[float] = []
    for _ in range(reps):  # side by side: each figure's runs interleave with the others'
        e2e += [x * 1000 for x in load.run(payload, count, 1).latencies]
        floor += [x * 1000 for x in echo.run(payload, count, 1, results=False).latencies]
        run += bare_ms(path, payload, count)
        node_rps.append(load.run(payload, count * 2, 8).throughput)
        started = time.perf_counter()
        bare = bare_ms(path, payload, count * 2)
        bare_rps.append(len(bare) / (time.perf_counter() - started))
    return {
        "e2e_p50": p50(e2e),
        "e2e_p99": p99(e2e),
        "floor_p50": p50(floor),
        "floor_p99": p99(floor),
        "run_p50": p50(run),
        "bytes": len(payload),
        "node_rps": node_rps,
        "bare_rps": bare_rps,
        "tput_ratios": [a / b for a, b in zip(node_rps, bare_rps, strict=True)],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__)
    p.add_argument("--brokers", default="mosquitto,amqtt")
    p.add_argument("--count", type=int, default=200, help="requests per measurement")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-save", action="store_true", help="do not append to bench/RESULTS.md")
    args = p.parse_args(argv)
    report = Report("latency and single-node throughput")
    for kind in args.brokers.split(","):
        one_broker(kind, args.count, args.reps, report)
    if not args.no_save:
        report.save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
