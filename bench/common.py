"""What every benchmark shares: a broker, mqinfer processes, a load generator that
measures what a sensor would see, and the one-line-per-figure report.

Benchmarks compare ratios measured side by side in one run; absolute numbers are printed
for context only (these machines are shared and noisy).
"""

from __future__ import annotations

import datetime
import io
import os
import selectors
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import numpy as np
import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from PIL import Image

from mqinfer.broker.ports import free_port
from mqinfer.protocol.topics import Topics
from tests.integration.harness import Broker, Procs, need_mosquitto, start_broker, wait_for

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "RESULTS.md"


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        )
        dirty = subprocess.run(  # this file's own appends do not count
            ["git", "status", "--porcelain", "--", ".", ":!bench/RESULTS.md"],
            cwd=REPO,
            capture_output=True,
        )
        return out.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def camera_frame(image_format: str = "JPEG", noise: float = 0.0) -> bytes:
    """A 224x224 camera-like picture: smooth gradients and a few shapes, with pixel noise of
    this standard deviation (seeded). As JPEG (quality 85) without noise it is about 10 KB;
    as PNG it needs the noise to be camera-sized (about 80 KB at 3), since smooth gradients
    alone compress to 1 KB."""
    y, x = np.mgrid[0:224, 0:224]
    rgb = np.stack([x, y, (x + y) // 2], axis=-1).astype(np.int16)
    rgb[60:120, 80:160] = (200, 40, 40)
    rgb[140:200, 20:90] = (30, 160, 220)
    if noise:
        rgb += np.random.default_rng(0).normal(0, noise, rgb.shape).round().astype(np.int16)
    out = io.BytesIO()
    options = {"quality": 85} if image_format == "JPEG" else {}
    Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB").save(out, image_format, **options)
    return out.getvalue()


def machine() -> str:
    return f"{os.cpu_count()} cores"


@dataclass
class Report:
    """One line per figure, printed and appended to bench/RESULTS.md."""

    title: str
    lines: list[str] = field(default_factory=list)

    def figure(self, text: str) -> None:
        print(text, flush=True)
        self.lines.append(text)

    def save(self) -> None:
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        new = not RESULTS.exists()
        with RESULTS.open("a") as f:
            if new:
                f.write("# Benchmark results\n\nAppended by `make bench`, newest last.\n")
            f.write(f"\n## {self.title}: {stamp}, commit {commit()}, {machine()}\n\n")
            f.writelines(f"- {line}\n" for line in self.lines)


@dataclass
class OpenBroker(Broker):
    """Mosquitto with the project's config as the integration tests derive it, listening on
    every address (0.0.0.0) instead of loopback only: nodes in network namespaces reach it
    at their link's host address."""

    def _command(self) -> list[str]:
        command = super()._command()
        conf = self.workdir / "mosquitto.conf"
        local = f"listener {self.port} 127.0.0.1\n"
        text = conf.read_text()
        if local not in text:
            raise RuntimeError(f"no line {local.strip()!r} to open up in {conf}")
        conf.write_text(text.replace(local, f"listener {self.port} 0.0.0.0\n"))
        return command


def open_broker(tmp_path: Path) -> Broker:
    """A Mosquitto on a free port of every address, with the project's config."""
    need_mosquitto()
    workdir = tmp_path / "mosquitto"
    workdir.mkdir()
    broker = OpenBroker("mosquitto", free_port("0.0.0.0"), workdir)
    broker.start()
    return broker


class Cluster:
    """A broker, a coordinator and nodes, each its own process, as a user runs them. With
    `listen_all` the broker (Mosquitto) listens on every address, for nodes elsewhere."""

    def __init__(self, workdir: Path, broker: str = "mosquitto", listen_all: bool = False) -> None:
        self.workdir = workdir
        self.broker: Broker = open_broker(workdir) if listen_all else start_broker(broker, workdir)
        self.prefix = f"b{uuid.uuid4().hex[:8]}/mqinfer"
        self.procs = Procs(workdir)
        try:
            self.procs.start(
                "coordinator", "coordinator", "--broker", self.broker.url, "--prefix", self.prefix
            )
        except BaseException:
            self.broker.stop()
            raise

    def aside(self, name: str) -> str:
        """A topic prefix beside the cluster's, which the coordinator does not serve: for a
        baseline that answers requests itself (the coordinator would answer its requests
        `unavailable` under the cluster's prefix)."""
        return f"{self.prefix.rsplit('/', 1)[0]}/{name}"

    def node(self, node_id: str, *extra: str) -> None:
        self.procs.node(self.broker, self.prefix, node_id, *extra)

    def mqinfer(self, *args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "mqinfer", *args, "--broker", self.broker.url],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=300,
        )
        if out.returncode != 0:
            raise RuntimeError(f"mqinfer {' '.join(args)}: {out.stdout}{out.stderr}")
        return out.stdout + out.stderr

    def deploy(self, *args: str) -> str:
        return self.mqinfer("deploy", *args, "--prefix", self.prefix, "--wait", "--timeout", "120")

    def status(self) -> dict[str, Any]:
        text = self.mqinfer("status", "--json", "--prefix", self.prefix)
        value = orjson.loads(text[text.index("{") :])
        assert isinstance(value, dict)
        return value

    def wait_online(self, count: int, timeout: float = 120) -> None:
        """Until `count` nodes are online in the retained state."""

        def online() -> bool:
            states = [str(n["state"]) for n in self.status()["nodes"]]
            return states.count("online") >= count

        until(online, f"{count} nodes online", timeout)

    def stop(self) -> None:
        """Stop every process started here (killed if it does not stop in time), then the
        broker."""
        for p in self.procs.all:
            try:
                p.terminate()
            except subprocess.TimeoutExpired:
                p.kill9()
        self.broker.stop()


class Load:
    """A sensor's view: requests on request/{id}, results read on result/{id}. It connects
    to the broker, or to `address` (host, port: a proxy in front of it) if given."""

    def __init__(
        self,
        broker: Broker,
        prefix: str,
        service: str,
        address: tuple[str, int] | None = None,
    ) -> None:
        self.topics = Topics(prefix)
        self.service = service
        self.lock = threading.Condition()
        self.sent: dict[str, float] = {}
        self.latency: dict[str, float] = {}
        self.bodies: dict[str, bytes] = {}
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        self.client.on_socket_open = nodelay
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        host, port = address or ("127.0.0.1", broker.port)
        self.client.connect(host, port)
        self.client.loop_start()
        self.client.subscribe(self.topics.service_result(service) + "/+", qos=1)
        assert subscribed.wait(10), "no SUBACK"
        self._n = 0

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.perf_counter()
        rid = msg.topic.rsplit("/", 1)[1]
        with self.lock:
            if rid in self.sent and rid not in self.latency:
                self.latency[rid] = now - self.sent[rid]
                self.bodies[rid] = bytes(msg.payload)
                self.lock.notify_all()

    def run(self, payload: bytes, count: int, window: int, results: bool = True) -> Run:
        """Send `count` requests, at most `window` unanswered at a time (1: one at a time)."""
        if window < 1:
            raise ValueError(f"window must be 1 or more, not {window}")
        ids = []
        start = time.perf_counter()
        unanswered: list[str] = []
        for _ in range(count):
            rid = f"r{self._n}"
            self._n += 1
            with self.lock:
                while True:
                    unanswered = [i for i in unanswered if i not in self.latency]
                    if len(unanswered) < window:
                        break
                    if not self.lock.wait(30):
                        raise TimeoutError("no result for 30 s")
                self.sent[rid] = time.perf_counter()
            ids.append(rid)
            unanswered.append(rid)
            self.client.publish(self.topics.service_request(self.service, rid), payload, qos=1)
        with self.lock:
            while not all(i in self.latency for i in ids):
                if not self.lock.wait(30):
                    raise TimeoutError("no result for 30 s")
            elapsed = time.perf_counter() - start
            raw = [self.bodies[i] for i in ids]
            lat = [self.latency[i] for i in ids]
        sizes = [len(b) for b in raw]
        if not results:  # an echo: the payload comes back as it went
            return Run(count / elapsed, lat, [], sizes)
        bodies = [orjson.loads(b) for b in raw]
        errors = [b["error"] for b in bodies if not b["ok"]]
        if errors:
            raise RuntimeError(f"{len(errors)} errors, e.g. {errors[0]}")
        return Run(count / elapsed, lat, bodies, sizes)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@dataclass
class Run:
    throughput: float  # results per second
    latencies: list[float]  # seconds
    bodies: list[dict[str, Any]]
    sizes: list[int] = field(default_factory=list)  # bytes of each result as received

    def p(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def p50_ms(self) -> float:
        return self.p(0.5) * 1000


def nodelay(_c: Any, _u: Any, sock: Any) -> None:
    """paho's on_socket_open: TCP_NODELAY on the client's socket (paho does not set it)."""
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def spread(values: list[float]) -> str:
    """'median (min-max)'."""
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def ratios(a: list[float], b: list[float]) -> list[float]:
    """a[i] / b[i]: one ratio per round, each of two figures measured side by side."""
    return [x / y for x, y in zip(a, b, strict=True)]


def verdict(ratio: float, goal: float, at_most: bool = False) -> str:
    """'met', or 'not met: X over' (goal an upper bound) / 'X short' (a lower bound)."""
    if at_most:
        return "met" if ratio <= goal else f"not met: {ratio - goal:.2f} over"
    return "met" if ratio >= goal else f"not met: {goal - ratio:.2f} short"


K = TypeVar("K")
T = TypeVar("T")


def interleaved(measures: Mapping[K, Callable[[], T]], reps: int) -> dict[K, list[T]]:
    """Each measure once per round, `reps` rounds, the order reversed every other round, so
    that no side always runs first (or right after the same other side)."""
    out: dict[K, list[T]] = {name: [] for name in measures}
    names = list(measures)
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            out[name].append(measures[name]())
    return out


def node_command(url: str, prefix: str, node_id: str, cache: Path, *extra: str) -> list[str]:
    """`mqinfer node` as a user runs it, for a process started some other way than
    Cluster.node (in a network namespace, under a CPU quota)."""
    return [
        sys.executable, "-m", "mqinfer", "node", "--broker", url, "--prefix", prefix,
        "--id", node_id, "--cache-dir", str(cache), *extra,
    ]  # fmt: skip


def handwritten_command(
    host: str, port: int, model: Path, topics: Topics, service: str
) -> list[str]:
    """bench.handwritten serving `model` on `topics`' request and result topics of
    `service` (use a prefix the coordinator does not serve, or it answers them too)."""
    return [
        sys.executable, "-m", "bench.handwritten", "--broker", f"{host}:{port}",
        "--model", str(model),
        "--request-topic", topics.service_request(service) + "/+",
        "--result-topic", topics.service_result(service) + "/+",
    ]  # fmt: skip


def wait_ready(proc: subprocess.Popen[bytes], what: str, log: Path, timeout: float = 60) -> None:
    """Read `proc`'s stdout (a pipe) until it prints 'ready'; fail with its log if it exits
    or takes longer than `timeout` seconds."""
    out: IO[bytes] | None = proc.stdout
    assert out is not None, "start it with stdout=subprocess.PIPE"
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(out, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if sel.select(0.2) and out.readline().strip() == b"ready":
                return
            if proc.poll() is not None:
                break
    raise RuntimeError(f"{what} is not ready: {log.read_text(errors='replace')[-2000:]}")


def until(predicate: Callable[[], Any], what: str, timeout: float = 120) -> Any:
    return wait_for(predicate, what, timeout)


# ---- the round-trip floor: a bare paho echo through the same broker ------------------------


def _echo(port: int, request: str, reply_base: str, ready: Any) -> None:
    """Republish every message on `request`/+ to `reply_base`/{id}, QoS 1 (a process)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.on_socket_open = nodelay

    def on_message(c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        c.publish(f"{reply_base}/{msg.topic.rsplit('/', 1)[1]}", msg.payload, qos=1)

    client.on_message = on_message
    client.on_subscribe = lambda *a: ready.set()
    client.connect("127.0.0.1", port)
    client.subscribe(request + "/+", qos=1)
    client.loop_forever()


class Echo:
    """A paho client in its own process that answers like a replica with no model: what
    the broker and two clients cost, the floor under any request/result round trip. Give
    it a prefix no coordinator serves (Cluster.aside)."""

    def __init__(self, broker: Broker, prefix: str, service: str = "echo") -> None:
        import multiprocessing

        topics = Topics(prefix)
        ready = multiprocessing.Event()
        self.proc = multiprocessing.Process(
            target=_echo,
            args=(
                broker.port,
                topics.service_request(service),
                topics.service_result(service),
                ready,
            ),
            daemon=True,
        )
        self.proc.start()
        if not ready.wait(10):
            raise RuntimeError("echo: no SUBACK")
        self.load = Load(broker, prefix, service)

    def close(self) -> None:
        self.load.close()
        self.proc.terminate()
        self.proc.join(5)
