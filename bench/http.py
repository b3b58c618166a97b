"""HTTP benchmark: mqinfer against the usual alternative, the same model behind a small
FastAPI + uvicorn endpoint (PNG in, JSON out), side by side in one run.

    python -m bench.http [--count 600] [--window 4] [--reps 3] [--no-save]

The endpoint does exactly what a node does per request (mqinfer.node.jobs.serve: decode the
PNG with the model's preprocessing, run the model through the project's runtime, encode the
outputs, top-5, result JSON), with one interpreter (one runtime thread) behind a lock, as
TFLite interpreters are not thread-safe; uvicorn runs it in one worker process on loopback.
It is served twice by the same app: as a plain sync `def` endpoint (POST /infer/NAME),
which FastAPI runs in its threadpool, and as an `async def` one (POST /infer-async/NAME),
which runs on the event loop itself. mqinfer runs one node with one worker (one
interpreter, one runtime thread) behind Mosquitto, through the coordinator (the hub).
Clients: a keep-alive `http.client` connection per request in flight, and
`bench.common.Load` over MQTT.

For each model: latency with one request at a time, throughput with `--window` in flight;
`--reps` rounds, the order of the three sides alternating; ratios per round, medians with
spread. Goal (sync endpoint): mqinfer's p50 <= 0.8x. The `async def` endpoint's figures are
context here; bench.loopback holds the goal against it.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.metadata
import importlib.util
import itertools
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import orjson
from fastapi import Body, FastAPI, HTTPException, Response

from bench.common import (
    REPO,
    Cluster,
    Load,
    Report,
    Run,
    camera_frame,
    machine,
    ratios,
    spread,
    until,
    verdict,
)
from mqinfer.broker.ports import free_port
from mqinfer.node.replica import DEFAULT_MAX_REQUEST_BYTES
from mqinfer.node.runtimes import Model, RuntimeFailure, available_backends, warm_up
from mqinfer.protocol.errors import Code, ProtocolError
from mqinfer.protocol.manifest import Manifest
from mqinfer.protocol.payload import decode_request, encode_outputs, result_json, top_k
from mqinfer.servicefile import read_model

# Service name -> model file, served under the same name by both sides.
MODELS = {
    "digits": REPO / "models" / "digits" / "digits_int8.tflite",
    "mnv2": REPO / "models" / "mobilenet_v2" / "mobilenet_v2_int8.tflite",
}
DIGIT_PNG = REPO / "models" / "digits" / "samples" / "digit_7_0.png"
GOAL = 0.8  # mqinfer's p50 latency at most this times the HTTP endpoint's


# ---- the HTTP endpoint (runs in the uvicorn process) -----------------------------------


class Endpoint:
    """One model as the endpoint serves it: the work of mqinfer.node.jobs.serve."""

    def __init__(self, name: str, path: Path) -> None:
        found = read_model(path)
        self.name = name
        self.manifest: Manifest | None = found.manifest
        self.model: Model = available_backends()[found.format].load(str(path), threads=1)
        warm_up(self.model)
        self.lock = threading.Lock()  # one interpreter, not thread-safe
        self.ids = itertools.count()

    def serve(self, payload: bytes) -> tuple[int, bytes]:
        received = time.monotonic()
        request_id = f"h{next(self.ids)}"
        try:
            decoded = decode_request(
                payload,
                self.model.inputs,
                self.manifest.preprocessing if self.manifest else None,
                max_bytes=DEFAULT_MAX_REQUEST_BYTES,
            )
            waiting = time.monotonic()
            with self.lock:
                start = time.monotonic()
                outputs = self.model.run(decoded.arrays)
                ran = time.monotonic()
        except ProtocolError as e:
            return 400, self._error(request_id, str(e.code), e.message)
        except RuntimeFailure as e:
            return 500, self._error(request_id, str(Code.INFERENCE_FAILED), str(e))
        specs = self.model.outputs
        labels = self.manifest.labels if self.manifest else []
        top = top_k(outputs[0], specs[0], labels) if labels else None
        timing = {
            "queue_ms": (start - waiting) * 1000,  # waiting for the interpreter
            "inference_ms": (ran - start) * 1000,
            "total_ms": (time.monotonic() - received) * 1000,
        }
        return 200, result_json(
            request_id=request_id,
            service=self.name,
            node="http",
            ok=True,
            outputs=encode_outputs(outputs, specs),
            top=top,
            timing=timing,
        )

    def _error(self, request_id: str, code: str, message: str) -> bytes:
        return result_json(
            request_id=request_id, service=self.name, node="http", ok=False, error=(code, message)
        )


def create_app() -> FastAPI:
    """The FastAPI app (`uvicorn --factory bench.http:create_app`): every model in MODELS
    loaded and warmed up before uvicorn starts listening."""
    endpoints = {name: Endpoint(name, path) for name, path in MODELS.items()}
    app = FastAPI()

    @app.post("/infer/{service}")
    def infer(service: str, body: Annotated[bytes, Body(media_type="image/png")]) -> Response:
        endpoint = endpoints.get(service)
        if endpoint is None:
            raise HTTPException(404, f"no service {service!r}; there are {sorted(endpoints)}")
        status, payload = endpoint.serve(body)
        return Response(payload, status_code=status, media_type="application/json")

    @app.post("/infer-async/{service}")
    async def infer_async(
        service: str, body: Annotated[bytes, Body(media_type="image/png")]
    ) -> Response:
        """The same work on the event loop: no threadpool hand-off, one request at a time."""
        endpoint = endpoints.get(service)
        if endpoint is None:
            raise HTTPException(404, f"no service {service!r}; there are {sorted(endpoints)}")
        status, payload = endpoint.serve(body)
        return Response(payload, status_code=status, media_type="application/json")

    return app


class Server:
    """uvicorn serving create_app in its own process: 1 worker, loopback, a free port, the
    event loop and HTTP parser uvicorn picks (uvloop and httptools only if installed)."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.logfile = workdir / "uvicorn.log"
        with self.logfile.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "bench.http:create_app", "--factory",
                 "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                 "--no-access-log", "--log-level", "warning",
                 # uvicorn closes connections idle for 5 s; a camera sending frames is
                 # never idle that long, but a connection waits while the other side is
                 # measured
                 "--timeout-keep-alive", "600"],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )  # fmt: skip
        until(lambda: self._listening() or self.proc.poll() is not None, "uvicorn to listen", 60)
        if self.proc.poll() is not None:
            raise RuntimeError(f"uvicorn exited: {self.logfile.read_text(errors='replace')}")

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---- the HTTP client ------------------------------------------------------------------


class HttpLoad:
    """A sensor's view over HTTP: keep-alive connections, one per request in flight, to
    POST /ROUTE/SERVICE."""

    def __init__(self, port: int, service: str, route: str = "infer") -> None:
        self.port = port
        self.path = f"/{route}/{service}"
        self.conns: list[http.client.HTTPConnection] = []

    def _conn(self, i: int) -> http.client.HTTPConnection:
        while len(self.conns) <= i:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            conn.connect()  # sets TCP_NODELAY
            self.conns.append(conn)
        return self.conns[i]

    def run(self, payload: bytes, count: int, window: int) -> Run:
        """Send `count` requests, `window` at a time (one client thread per connection)."""
        conns = [self._conn(i) for i in range(window)]
        left = itertools.count()
        latencies: list[float] = []
        bodies: list[dict[str, Any]] = []
        failed: list[BaseException] = []
        headers = {"Content-Type": "image/png"}

        def client(conn: http.client.HTTPConnection) -> None:
            try:
                while next(left) < count:
                    t0 = time.perf_counter()
                    conn.request("POST", self.path, payload, headers)
                    response = conn.getresponse()
                    data = response.read()
                    latencies.append(time.perf_counter() - t0)
                    if response.status not in (200, 400, 500):  # not the endpoint's answer
                        raise RuntimeError(f"HTTP {response.status}: {data[:300]!r}")
                    bodies.append(orjson.loads(data))
            except BaseException as e:  # reported by run()
                failed.append(e)

        threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in conns]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
        if failed:
            raise RuntimeError(f"HTTP client failed: {failed[0]!r}")
        errors = [b["error"] for b in bodies if not b["ok"]]
        if errors:
            raise RuntimeError(f"{len(errors)} errors, e.g. {errors[0]}")
        return Run(count / elapsed, latencies, bodies)

    def close(self) -> None:
        for conn in self.conns:
            conn.close()


# ---- the benchmark --------------------------------------------------------------------


@dataclass
class Rounds:
    """One side's runs for one model: (latency run, throughput run) per round."""

    latency: list[Run]
    throughput: list[Run]

    def p(self, q: float) -> list[float]:
        return [r.p(q) * 1000 for r in self.latency]

    def tput(self) -> list[float]:
        return [r.throughput for r in self.throughput]

    def timing(self, key: str) -> float:
        """The median of a `timing` field of the results, one request at a time: total_ms
        runs from a request's arrival at the node or handler to its result's encoding."""
        return float(statistics.median(b["timing"][key] for r in self.latency for b in r.bodies))


def versions() -> str:
    def v(name: str) -> str:
        return f"{name} {importlib.metadata.version(name)}"

    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    parser = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return f"{v('fastapi')}, {v('uvicorn')} ({loop}, {parser}, 1 worker)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.http", description=__doc__)
    p.add_argument(
        "--count", type=int, default=600, help="requests per measurement (MobileNetV2: half)"
    )
    p.add_argument("--window", type=int, default=4, help="requests in flight for throughput")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-save", action="store_true", help="do not append to bench/RESULTS.md")
    args = p.parse_args(argv)
    began = time.perf_counter()
    report = Report("mqinfer against FastAPI + uvicorn")
    payloads = {"digits": DIGIT_PNG.read_bytes(), "mnv2": camera_frame("PNG", noise=3)}
    counts = {"digits": args.count, "mnv2": max(args.count // 2, 10)}
    results: dict[str, dict[str, Rounds]] = {}
    with tempfile.TemporaryDirectory(prefix="mqinfer-bench-") as tmp:
        cluster = Cluster(Path(tmp))
        server: Server | None = None
        try:
            cluster.node("n1")
            server = Server(Path(tmp))
            until(lambda: len(cluster.status()["nodes"]) == 1, "the node")
            for name, path in MODELS.items():
                cluster.deploy("--model", str(path), "--name", name)
            for name in MODELS:
                payload, count = payloads[name], counts[name]
                sides: dict[str, HttpLoad | Load] = {
                    "http": HttpLoad(server.port, name),
                    "async": HttpLoad(server.port, name, "infer-async"),
                    "mqinfer": Load(cluster.broker, cluster.prefix, name),
                }
                for load in sides.values():  # warm-up
                    load.run(payload, max(count // 5, 5), 1)
                    load.run(payload, max(count // 5, 5), args.window)
                rounds = {side: Rounds([], []) for side in sides}
                for rep in range(args.reps):
                    order = list(sides) if rep % 2 == 0 else list(sides)[::-1]
                    for side in order:
                        load = sides[side]
                        rounds[side].latency.append(load.run(payload, count, 1))
                        rounds[side].throughput.append(load.run(payload, count, args.window))
                for load in sides.values():
                    load.close()
                results[name] = rounds
        finally:
            if server is not None:
                server.stop()
            cluster.stop()
    for name, rounds in results.items():
        mq, web, aio = rounds["mqinfer"], rounds["http"], rounds["async"]
        model = MODELS[name].name
        what = f"{model} ({len(payloads[name]) / 1000:.1f} KB PNG)"
        tail = f"{args.reps} x {counts[name]} requests; Mosquitto, 1 node, 1 worker; {machine()}"
        p50 = [a / b for a, b in zip(mq.p(0.5), web.p(0.5), strict=True)]
        met = verdict(statistics.median(p50), GOAL, at_most=True)
        report.figure(
            f"mqinfer/HTTP p50 latency, {what}, 1 in flight: ratio {spread(p50)} "
            f"(goal <= {GOAL}x: {met}); mqinfer {spread(mq.p(0.5))} ms, "
            f"HTTP {spread(web.p(0.5))} ms; {tail}"
        )
        p99 = [a / b for a, b in zip(mq.p(0.99), web.p(0.99), strict=True)]
        report.figure(
            f"mqinfer/HTTP p99 latency, {what}, 1 in flight: ratio {spread(p99)}; "
            f"mqinfer {spread(mq.p(0.99))} ms, HTTP {spread(web.p(0.99))} ms; {tail}"
        )
        tput = [a / b for a, b in zip(mq.tput(), web.tput(), strict=True)]
        report.figure(
            f"mqinfer/HTTP throughput, {what}, {args.window} in flight: ratio {spread(tput)}; "
            f"mqinfer {spread(mq.tput())} req/s, HTTP {spread(web.tput())} req/s; {tail}"
        )
        report.figure(
            f"mqinfer/HTTP async def, {what}: p50 latency ratio "
            f"{spread(ratios(mq.p(0.5), aio.p(0.5)))} (HTTP async {spread(aio.p(0.5))} ms), "
            f"p99 {spread(ratios(mq.p(0.99), aio.p(0.99)))} (HTTP async {spread(aio.p(0.99))} "
            f"ms), throughput with {args.window} in flight "
            f"{spread(ratios(mq.tput(), aio.tput()))} (HTTP async {spread(aio.tput())} req/s); "
            f"{tail}"
        )
        parts = []
        for label, rounds_of in (("mqinfer", mq), ("HTTP", web), ("HTTP async", aio)):
            total = statistics.median(rounds_of.p(0.5))
            served = rounds_of.timing("total_ms")
            where = "node" if rounds_of is mq else "handler"
            parts.append(
                f"{label} {total:.2f} = {where} {served:.2f} "
                f"(queue {rounds_of.timing('queue_ms'):.2f}, model run "
                f"{rounds_of.timing('inference_ms'):.2f}) + the rest {total - served:.2f}"
            )
        report.figure(
            f"{model}, where the time goes (medians, ms, 1 in flight): {'; '.join(parts)} "
            "(the rest: encoding the result and the way there and back)"
        )
    report.figure(
        f"HTTP side: {versions()}, sync def endpoint (FastAPI's threadpool) and async def "
        f"endpoint (on the event loop), one interpreter behind a lock, keep-alive http.client "
        f"connections; run took "
        f"{time.perf_counter() - began:.0f} s"
    )
    if not args.no_save:
        report.save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
