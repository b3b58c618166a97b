"""Real brokers and real mqinfer processes for integration tests (used by conftest.py).

Mosquitto runs as a process on a free port with a config derived from
deploy/mosquitto/mosquitto.conf; the embedded broker runs as `mqinfer broker`.
Every test gets its own topic prefix.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from mqinfer.broker.ports import free_port
from mqinfer.coordinator import hub
from mqinfer.coordinator.agent import CoordinatorAgent
from mqinfer.coordinator.registry import Registry
from mqinfer.mqtt import BrokerURL
from mqinfer.protocol.topics import Topics

REPO = Path(__file__).resolve().parents[2]
MOSQUITTO_CONF = REPO / "deploy" / "mosquitto" / "mosquitto.conf"
REQUIRE_MOSQUITTO = os.environ.get("MQINFER_REQUIRE_MOSQUITTO") == "1"
LIMIT = 30.0  # seconds a test waits for something before it fails (a limit, not a goal)


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = LIMIT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def mosquitto_binary() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def need_mosquitto() -> str:
    binary = mosquitto_binary()
    if binary is None:
        if REQUIRE_MOSQUITTO:
            pytest.fail("MQINFER_REQUIRE_MOSQUITTO=1 but no mosquitto binary is installed")
        pytest.skip("mosquitto is not installed (Debian: apt-get install mosquitto)")
    return binary


def need_client_tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        if REQUIRE_MOSQUITTO:
            pytest.fail(f"MQINFER_REQUIRE_MOSQUITTO=1 but {name} is not installed")
        pytest.skip(f"{name} is not installed (Debian: apt-get install mosquitto-clients)")
    return found


def derived_mosquitto_conf(
    port: int, data_dir: Path, passwd: Path | None = None, acl: Path | None = None
) -> str:
    """The shipped config, with the listener, persistence path and logging made local.

    With `passwd` (and `acl`), authentication is on as the config's comments describe.
    """
    replaced = (
        "listener",
        "persistence_location",
        "log_dest",
        "pid_file",
        "user",
        "password_file",
        "acl_file",
        "allow_anonymous",
        "include_dir",
        "log_type",
    )
    kept = [
        line
        for line in MOSQUITTO_CONF.read_text().splitlines()
        if not line.strip().startswith(replaced)
    ]
    kept += [
        f"listener {port} 127.0.0.1",
        # Started as root, Mosquitto would drop to the 'mosquitto' user, which cannot read
        # the test's private temporary folders; as anyone else this line is ignored.
        f"user {pwd.getpwuid(os.geteuid()).pw_name}",
        f"allow_anonymous {'false' if passwd else 'true'}",
        f"persistence_location {data_dir}/",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
    ]
    if passwd is not None:
        kept.append(f"password_file {passwd}")
    if acl is not None:
        kept.append(f"acl_file {acl}")
    return "\n".join(kept) + "\n"


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@dataclass
class Broker:
    kind: str  # "mosquitto" or "amqtt"
    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    passwd: Path | None = None  # Mosquitto only: password file (authentication on)
    acl: Path | None = None  # Mosquitto only: ACL file
    extra_conf: str = ""  # Mosquitto only: more lines for the derived config

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def broker_url(self) -> BrokerURL:
        return BrokerURL.parse(self.url)

    def url_as(self, user: str, password: str) -> str:
        return f"mqtt://{user}:{password}@127.0.0.1:{self.port}"

    def _command(self) -> list[str]:
        if self.kind == "mosquitto":
            conf = self.workdir / "mosquitto.conf"
            derived = derived_mosquitto_conf(self.port, self.workdir, self.passwd, self.acl)
            conf.write_text(derived + self.extra_conf)
            return [need_mosquitto(), "-c", str(conf)]
        return [sys.executable, "-m", "mqinfer", "broker", "--port", str(self.port)]

    def start(self) -> None:
        log = open(self.workdir / f"{self.kind}.log", "ab")  # noqa: SIM115 - kept by the process
        self.proc = subprocess.Popen(self._command(), stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_for(
            lambda: _port_open(self.port) or self.proc.poll() is not None,  # type: ignore[union-attr]
            f"{self.kind} to listen on {self.port}",
        )
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.kind} exited: {self.log()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self) -> None:
        self.stop()
        wait_for(lambda: not _port_open(self.port), "the broker port to close")
        self.start()

    def log(self) -> str:
        path = self.workdir / f"{self.kind}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def start_broker(kind: str, tmp_path: Path) -> Broker:
    if kind == "mosquitto":
        need_mosquitto()
    workdir = tmp_path / kind
    workdir.mkdir()
    b = Broker(kind, free_port(), workdir)
    b.start()
    return b


@dataclass
class Proc:
    """An mqinfer command running as its own process, its output in a log file."""

    name: str
    args: list[str]
    logfile: Path
    proc: subprocess.Popen[bytes] = field(init=False)

    def start(self) -> Proc:
        with open(self.logfile, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mqinfer", *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        return self

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def terminate(self) -> int:
        self.signal(signal.SIGTERM)
        return self.proc.wait(15)

    def log(self) -> str:
        return self.logfile.read_text(errors="replace")


class Procs:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.all: list[Proc] = []

    def start(self, name: str, *args: str) -> Proc:
        p = Proc(name, list(args), self.tmp_path / f"{name}-{len(self.all)}.log").start()
        self.all.append(p)
        return p

    def node(
        self, broker: Broker, prefix: str, node_id: str, *extra: str, url: str | None = None
    ) -> Proc:
        """`mqinfer node` on `broker` (at `url`, with credentials say, if given)."""
        return self.start(
            node_id,
            "node",
            "--broker",
            url or broker.url,
            "--prefix",
            prefix,
            "--id",
            node_id,
            "--heartbeat",
            "0.5",
            "--cache-dir",
            str(self.tmp_path / f"cache-{node_id}"),
            *extra,
        )


class Observer:
    """A plain paho client watching everything under a prefix (independent of our client)."""

    def __init__(self, broker: Broker, prefix: str) -> None:
        self.lock = threading.Lock()
        self.last: dict[str, bytes] = {}
        self.log: list[tuple[str, bytes, bool]] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        self.client.subscribe(Topics(prefix).everything(), qos=1)
        assert subscribed.wait(10), "observer: no SUBACK"

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.last[msg.topic] = msg.payload
            self.log.append((msg.topic, msg.payload, bool(msg.retain)))

    def json(self, topic: str) -> dict[str, Any] | None:
        with self.lock:
            payload = self.last.get(topic)
        return orjson.loads(payload) if payload else None

    def seen(self, topic: str) -> list[dict[str, Any]]:
        with self.lock:
            return [orjson.loads(p) for t, p, _ in self.log if t == topic and p]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@dataclass
class InProcessCoordinator:
    """A coordinator on its own thread, so tests can read its registry directly."""

    agent: CoordinatorAgent
    stop: threading.Event
    thread: threading.Thread
    status: list[int]

    def shutdown(self) -> None:
        self.stop.set()
        self.thread.join(15)
        assert not self.thread.is_alive(), "coordinator did not stop"

    def state(self, node: str) -> str | None:
        rec = self.agent.registry.nodes.get(node)
        return rec.state if rec else None


def start_coordinator(
    broker: Broker,
    prefix: str,
    missed_beats: float = 8.0,
    forget_after: float = 3600.0,
    url: str | None = None,
) -> InProcessCoordinator:
    """missed_beats is generous by default: a loaded CI machine must not make a live node
    look silent. The heartbeat-timeout test asks for the usual 3. `url`: connect there
    instead (a proxy in front of the broker)."""
    agent = CoordinatorAgent(
        Topics(prefix), Registry(missed_beats=missed_beats), "test", forget_after=forget_after
    )
    stop = threading.Event()
    status: list[int] = []

    def main() -> None:
        status.append(hub.run(agent, BrokerURL.parse(url) if url else broker.broker_url, stop))

    thread = threading.Thread(target=main, name="coordinator", daemon=True)
    thread.start()
    return InProcessCoordinator(agent, stop, thread, status)


class CuttingProxy:
    """A TCP forwarder in front of a broker that drops connections the way a failing
    broker or link does, without a DISCONNECT: `cut_after(n)` closes the first connection
    whose client sends more than n bytes (one only; with `from_broker`, whose broker sends
    more than n bytes); `cut()` closes every open one now."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self.accepted = 0
        self.cuts = 0
        self._budget: int | None = None
        self._from_broker = False
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="proxy", daemon=True).start()

    def cut_after(self, sent: int, from_broker: bool = False) -> None:
        self._budget, self._from_broker = sent, from_broker

    def cut(self) -> None:
        self.cuts += self._close_open()

    def close(self) -> None:
        self._close_open()
        _close(self.listener)

    def _close_open(self) -> bool:
        with self._lock:
            socks, self._open = self._open, []
        for s in socks:
            _close(s)
        return bool(socks)

    def _over(self, sent: int, from_broker: bool) -> bool:
        with self._lock:
            if self._budget is None or sent <= self._budget or from_broker != self._from_broker:
                return False
            self._budget = None
            self.cuts += 1
            return True

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self.accepted += 1
                self._open += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_broker: bool) -> None:
        passed = 0
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if self._over(passed + len(data), from_broker):
                data = b""
            try:
                if data:
                    dst.sendall(data)
            except OSError:
                data = b""
            if not data:
                for s in (src, dst):
                    _close(s)
                return
            passed += len(data)


def _close(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
    s.close()
