"""Loopback latency: what serving through the hub costs a small request when the network
costs nothing, against the two things someone would write instead.

    python -m bench.loopback [--count 300] [--reps 7] [--no-save]

The digits CNN (int8), one PNG from models/digits/samples, one request at a time, everything
on this machine and one Mosquitto on loopback. Measured in interleaved rounds:
- mqinfer: one node, one replica (one worker), requests through the coordinator (the hub);
- the hand-written paho node (bench.handwritten: PNG decode with Pillow, invoke, orjson,
  QoS 1 both ways) through the same broker. Goal: mqinfer's p50 <= 1.6x its p50;
- an `async def` FastAPI + uvicorn endpoint doing what a node does per request (bench.http,
  POST /infer-async/digits, a keep-alive connection). Goal: mqinfer's p50 <= 1.2x its p50;
- for context, where mqinfer's time goes: the same node given the same request as work
  straight from this process (what the hub would send it, bypassing the hub; the hub drops
  its answers as not its own), and the round-trip floor, a bare paho echo through the same
  broker (QoS 1, the same payload). mqinfer minus the node alone is what the hub's two
  extra hops cost; a bare forwarder would cost about one echo.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bench.common import (
    REPO,
    Cluster,
    Echo,
    Load,
    Report,
    Run,
    handwritten_command,
    interleaved,
    machine,
    nodelay,
    ratios,
    spread,
    verdict,
    wait_ready,
)
from bench.http import HttpLoad, Server
from mqinfer.protocol import work as w
from mqinfer.protocol.topics import Topics

DIGITS = REPO / "models" / "digits" / "digits_int8.tflite"
DIGIT_PNG = REPO / "models" / "digits" / "samples" / "digit_7_0.png"
HANDWRITTEN_GOAL = 1.6
ASYNC_GOAL = 1.2


class WorkLoad:
    """The node alone: requests given to it as work (the hub's envelope, a lease of its own),
    its answers read on its answer topic, one request at a time."""

    def __init__(self, port: int, topics: Topics, node: str, service: str) -> None:
        self.work_topic = topics.node_work(node)
        self.service = service
        self.lock = threading.Condition()
        self.answers: dict[str, tuple[float, bytes]] = {}
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        self.client.on_socket_open = nodelay
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe(topics.node_answer(node), qos=1)
        assert subscribed.wait(10), "no SUBACK"
        self._n = 0

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.perf_counter()
        answer, body = w.decode_answer(bytes(msg.payload))
        with self.lock:
            self.answers[answer.job] = (now, body if answer.kind == "result" else b"")
            self.lock.notify_all()

    def run(self, payload: bytes, count: int) -> Run:
        latencies, bodies = [], []
        start = time.perf_counter()
        for _ in range(count):
            self._n += 1
            job = f"bench-{self._n:x}"
            header = w.Work(
                job=job,
                service=self.service,
                kind="request",
                lease_ms=10_000,
                deadline_ms=10_000,
                request_id=f"w{self._n}",
            )
            sent = time.perf_counter()
            self.client.publish(self.work_topic, w.encode_work(header, payload), qos=1)
            with self.lock:
                if not self.lock.wait_for(functools.partial(self.answers.__contains__, job), 30):
                    raise TimeoutError("no answer for 30 s")
                received, body = self.answers.pop(job)
            if not body:
                raise RuntimeError(f"the node released work {job} instead of doing it")
            latencies.append(received - sent)
            bodies.append(orjson.loads(body))
        return Run(count / (time.perf_counter() - start), latencies, bodies)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.loopback",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--count", type=int, default=300, help="requests per run")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--no-save", action="store_true", help="do not append to bench/RESULTS.md")
    args = p.parse_args(argv)
    began = time.monotonic()
    png = DIGIT_PNG.read_bytes()
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mqinfer-bench-")))
        cluster = Cluster(tmp)
        stack.callback(cluster.stop)
        cluster.node("n1")
        server = Server(tmp)
        stack.callback(server.stop)
        hand = Topics(cluster.aside("handwritten"))
        log = tmp / "handwritten.log"
        with log.open("ab") as err:
            proc = subprocess.Popen(
                handwritten_command("127.0.0.1", cluster.broker.port, DIGITS, hand, "digits"),
                stdout=subprocess.PIPE,
                stderr=err,
                cwd=REPO,
            )
        stack.callback(proc.wait, 10)
        stack.callback(proc.terminate)
        wait_ready(proc, "the hand-written node", log)
        cluster.wait_online(1)
        cluster.deploy("--model", str(DIGITS), "--name", "digits")
        echo = Echo(cluster.broker, cluster.aside("echo"))
        stack.callback(echo.close)
        loads: dict[str, Load | HttpLoad] = {
            "mqinfer": Load(cluster.broker, cluster.prefix, "digits"),
            "handwritten": Load(cluster.broker, hand.prefix, "digits"),
            "async": HttpLoad(server.port, "digits", "infer-async"),
        }
        for load in loads.values():
            stack.callback(load.close)
            load.run(png, 50, 1)  # warm-up
        echo.load.run(png, 50, 1, results=False)
        measures = {n: functools.partial(load.run, png, args.count, 1) for n, load in loads.items()}
        alone = WorkLoad(cluster.broker.port, Topics(cluster.prefix), "n1", "digits")
        stack.callback(alone.close)
        alone.run(png, 50)
        measures["alone"] = functools.partial(alone.run, png, args.count)
        measures["echo"] = functools.partial(echo.load.run, png, args.count, 1, results=False)
        runs = interleaved(measures, args.reps)
    p50 = {name: [r.p50_ms() for r in rs] for name, rs in runs.items()}
    p99 = {name: [r.p(0.99) * 1000 for r in rs] for name, rs in runs.items()}
    report = Report("loopback latency")
    tail = (
        f"digits PNG ({len(png)} B), 1 in flight, {args.reps} x {args.count} requests; "
        f"Mosquitto on loopback, 1 node, 1 worker; {machine()}"
    )
    for name, label, goal in (
        ("handwritten", "hand-written paho node", HANDWRITTEN_GOAL),
        ("async", "async def FastAPI endpoint", ASYNC_GOAL),
    ):
        r = ratios(p50["mqinfer"], p50[name])
        report.figure(
            f"loopback latency, mqinfer / {label} p50 = {spread(r)} (goal <= {goal}: "
            f"{verdict(statistics.median(r), goal, at_most=True)}); mqinfer "
            f"{spread(p50['mqinfer'])} ms, {label} {spread(p50[name])} ms (p99 "
            f"{spread(p99['mqinfer'])} vs {spread(p99[name])} ms); {tail}"
        )
    node_ms = statistics.median(b["timing"]["total_ms"] for r in runs["mqinfer"] for b in r.bodies)
    total = statistics.median(p50["mqinfer"])
    report.figure(
        f"loopback, where mqinfer's time goes (p50s, ms): through the hub {total:.3f} = the "
        f"node alone (work straight to it) {spread(p50['alone'])} + the hub's two hops "
        f"{spread([a - b for a, b in zip(p50['mqinfer'], p50['alone'], strict=True)])}; "
        f"node alone / hand-written node {spread(ratios(p50['alone'], p50['handwritten']))}; "
        f"a paho QoS 1 echo through the same broker {spread(p50['echo'])}; the node's own "
        f"account (hub's receipt to the result's encoding) {node_ms:.3f}; run took "
        f"{time.monotonic() - began:.0f} s"
    )
    if not args.no_save:
        report.save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
