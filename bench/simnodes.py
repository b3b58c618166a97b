"""Simulated nodes for the scale benchmark: many MQTT sessions that speak the real protocol.

Each simulated node has its own paho client, client id, session and Will, subscribes to what
node/agent.py subscribes to (its command, state and work topics, and the coordinator's state
and heartbeat), and publishes what it publishes (retained caps and `online`, then a retained
QoS 0 heartbeat every second), built from the protocol's own models and topic builders; it
answers `ping` and `announce` on its command topic and refuses anything else. It runs no
replica (no work comes to it) and reads the coordinator's messages without acting on them
(a real node answers requests `unavailable` itself only when the hub falls silent). A
`Simulator` drives a few hundred of them from one selector loop in its own process;
`Simulators` starts those processes and collects what they report, so a thousand nodes fit
on a small machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import multiprocessing as mp
import queue
import random
import selectors
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.sharedctypes import Synchronized
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from mqinfer.mqtt.session import SessionCounter
from mqinfer.node import sysinfo
from mqinfer.node.capabilities import Probe, capabilities
from mqinfer.protocol import codec
from mqinfer.protocol import messages as m
from mqinfer.protocol.errors import Code, ProtocolError
from mqinfer.protocol.topics import Kind, Topics

INTERVAL = 1.0  # heartbeat interval of the simulated nodes (s)
KEEPALIVE = 30  # as mqinfer.mqtt.session.run
HANDSHAKES = 50  # connections per simulator waiting for their CONNACK at most
CONNACK_LIMIT = 10.0  # seconds for a CONNACK before a simulated node counts as failed


# ---- what a simulated node publishes ------------------------------------------------------


@dataclass(frozen=True)
class Kit:
    """What every simulated node shares (probed once, sent to the simulator processes)."""

    prefix: str
    port: int
    probe: Probe
    host: m.Host
    speed_ms: float


def node_caps(
    kit: Kit, node: str, session: int, cores: int | None = None, models: list[str] | None = None
) -> m.Capabilities:
    """The caps NodeAgent.announce builds, for a node on a host like this one."""
    host = kit.host.model_copy(update={"hostname": node, "cores": cores or kit.host.cores})
    caps = capabilities(node, session, kit.probe, host, {}, models or [])
    return caps.model_copy(
        update={
            "speed_ms": round(kit.speed_ms, 3),
            "max_workers": None,
            "artificial_slowdown": 1.0,
        }
    )


def node_beat(
    node: str,
    session: int,
    seq: int,
    uptime: float,
    load: tuple[float, float, float],
    memory_mb: int,
) -> m.Heartbeat:
    """A heartbeat of a node that runs no replica (NodeAgent.tick)."""
    return m.Heartbeat(
        node=node,
        session=session,
        seq=seq,
        ts=time.time(),
        interval=INTERVAL,
        uptime=round(uptime, 3),
        load=load,
        memory_available_mb=memory_mb,
        inflight=0,
        services={},
        stats={},
    )


def node_ids(count: int) -> list[str]:
    width = len(str(count - 1))
    return [f"sim{i:0{width}d}" for i in range(count)]


# ---- the simulator: many nodes, one selector loop per process ------------------------------


class SimNode:
    """One node's session on its own paho client, driven by the simulator's selector loop."""

    def __init__(self, sim: Simulator, index: int, node_id: str) -> None:
        self.sim = sim
        self.index = index
        self.id = node_id
        topics = sim.topics
        self.t_caps = topics.node_caps(node_id)
        self.t_state = topics.node_state(node_id)
        self.t_beat = topics.node_heartbeat(node_id)
        self.t_cmd = topics.node_cmd(node_id)
        self.t_reply = topics.node_reply(node_id)
        self.t_work = topics.node_work(node_id)
        self.client: mqtt.Client | None = None
        self.session = 0
        self.seq = 0
        self.started = 0.0
        self.connected = False  # CONNACK received
        self.failed = False
        self.born = False  # caps acknowledged, `online` out
        self.stopping = False
        self.writing = False  # registered for EVENT_WRITE
        self.caps_mid = -1
        self.offline_mid = -1

    # -- connection ---------------------------------------------------------------------

    def connect(self) -> None:
        """A new session: its own client id and Will, as NodeAgent does on every connect."""
        self.session = self.sim.sessions.next()
        self.started = time.monotonic()
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"mqinfer-node-{self.id}-{self.session:x}",
            protocol=mqtt.MQTTv5,
        )
        lost = m.NodeState(node=self.id, state="lost", session=self.session, by="will")
        client.will_set(self.t_state, codec.encode(lost), qos=1, retain=True)
        client.on_socket_open = self._opened
        client.on_socket_close = self._closed
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_disconnect = self._on_disconnect
        client.max_inflight_messages_set(100)
        client.max_queued_messages_set(0)
        self.client = client
        client.connect("127.0.0.1", self.sim.kit.port, keepalive=KEEPALIVE)
        self.flush()

    def _opened(self, _c: mqtt.Client, _u: Any, sock: Any) -> None:
        if isinstance(sock, socket.socket):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.writing = False
        self.sim.selector.register(sock, selectors.EVENT_READ, self)

    def _closed(self, _c: mqtt.Client, _u: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sim.selector.unregister(sock)

    @property
    def alive(self) -> bool:
        return self.client is not None and self.client.socket() is not None

    def flush(self) -> None:
        """Write what paho queued (publishes from inside its callbacks wait for this), and
        watch the socket for writability only while something is left over. Never from a
        paho callback: paho holds its callback lock there, and writing takes it again."""
        client = self.client
        if client is None or client.socket() is None:
            return
        if client.want_write():
            client.loop_write()
        sock = client.socket()
        want = client.want_write()
        if sock is not None and want != self.writing:
            self.writing = want
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
            with contextlib.suppress(KeyError, ValueError):
                self.sim.selector.modify(sock, events, self)

    # -- the node's protocol ------------------------------------------------------------

    def _on_connect(
        self, client: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Properties | None
    ) -> None:
        if self.failed:
            return
        self.sim.handshaking -= 1
        if rc.is_failure:
            self.failed = True
            self.sim.failure(f"{self.id}: CONNACK {rc.getName()}")
            return
        self.connected = True
        self.sim.stats.last_connack = time.time()
        # [T-CMD-1] subscribe before birth; the own state topic to re-assert a stale 'lost';
        # [T-WORK-1] the own work topic (a simulated node runs no replica: none comes);
        # [T-HUB-4] the coordinator's state and heartbeats, as a node watches the hub.
        client.subscribe(
            [
                (self.t_cmd, 1),
                (self.t_state, 1),
                (self.t_work, 1),
                (self.sim.topics.coordinator_state(), 1),
                (self.sim.topics.coordinator_heartbeat(), 0),
            ]
        )

    def _on_subscribe(
        self, client: mqtt.Client, _u: Any, _mid: int, _codes: list[ReasonCode], _p: Any
    ) -> None:
        if self.caps_mid >= 0:
            return
        caps = node_caps(self.sim.kit, self.id, self.session)
        self.caps_mid = client.publish(self.t_caps, codec.encode(caps), qos=1, retain=True).mid

    def _on_publish(
        self, _c: mqtt.Client, _u: Any, mid: int, _rc: ReasonCode, _p: Properties | None
    ) -> None:
        if mid == self.caps_mid and not self.born:
            # The agent waits for the PUBACK of its caps, then says 'online', then beats.
            self.publish_state("online")
            self.born = True
            self.sim.born(self)
        elif mid == self.offline_mid:
            self.offline_mid = -1

    def publish_state(self, state: m.NodeStateName) -> int:
        assert self.client is not None
        msg = m.NodeState(node=self.id, state=state, session=self.session, ts=time.time())
        return self.client.publish(self.t_state, codec.encode(msg), qos=1, retain=True).mid

    def beat(self) -> bool:
        client = self.client
        if client is None or not self.born or self.stopping or not self.alive:
            return False
        sim = self.sim
        beat = node_beat(
            self.id,
            self.session,
            self.seq,
            time.monotonic() - self.started,
            sim.load,
            sim.memory_mb,
        )
        self.seq += 1
        info = client.publish(self.t_beat, codec.encode(beat), qos=0, retain=True)
        if info.rc == mqtt.MQTT_ERR_SUCCESS:
            sim.published.value += 1
        return True

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic in self.sim.coordinator_topics:
            return  # read, as a node reads them, and left there
        try:
            kind = self.sim.topics.parse(msg.topic).kind
        except ValueError:
            return
        if kind is Kind.NODE_CMD:
            self._command(bytes(msg.payload))
        elif kind is Kind.NODE_STATE:
            self._own_state(bytes(msg.payload))

    def _command(self, payload: bytes) -> None:
        """[T-CMD-2] one reply per command: ping and announce are answered as the agent
        answers them; a simulated node cannot load models, so anything else is refused."""
        assert self.client is not None
        cmd_id: str | None = None
        try:
            cmd = codec.decode_as(m.Command, payload)
            cmd_id = cmd.id
            self.sim.stats.commands[cmd.op] += 1
            op = OPS.get(cmd.op)
            if op is None:
                raise ProtocolError(
                    Code.UNKNOWN_COMMAND,
                    f"unknown op {cmd.op!r}; this simulated node accepts {sorted(OPS)}",
                )
            reply = m.CommandReply(node=self.id, id=cmd.id, ok=True, result=op(self))
        except ProtocolError as e:
            error = m.ErrorInfo(code=e.code, message=e.message)
            reply = m.CommandReply(node=self.id, id=cmd_id, ok=False, error=error)
        self.client.publish(self.t_reply, codec.encode(reply), qos=1)

    def ping(self) -> dict[str, Any]:
        return {"pong": time.time(), "session": self.session}

    def announce(self) -> dict[str, Any]:
        """Caps and 'online' again (the coordinator asks when it has no caps for a node)."""
        assert self.client is not None
        caps = node_caps(self.sim.kit, self.id, self.session)
        self.client.publish(self.t_caps, codec.encode(caps), qos=1, retain=True)
        self.publish_state("online")
        return {"session": self.session}

    def _own_state(self, payload: bytes) -> None:
        """[T-STATE-3] re-assert 'online' over a stale or wrong 'lost' (as the agent does)."""
        if self.stopping or not self.born:
            return
        state: m.NodeState | None = None
        if payload:
            with contextlib.suppress(ProtocolError):
                state = codec.decode_as(m.NodeState, payload)
        if state is not None and (state.state == "online" or state.session > self.session):
            return
        self.sim.stats.reasserted += 1
        self.publish_state("online")

    def _on_disconnect(
        self, _c: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Properties | None
    ) -> None:
        if not self.stopping:
            self.sim.stats.dropped += 1
            self.sim.stats.first_failure = (
                self.sim.stats.first_failure or f"{self.id}: connection lost ({rc.getName()})"
            )


# What a simulated node answers on its command topic, as node/commands.py does.
OPS: dict[str, Callable[[SimNode], dict[str, Any]]] = {
    "ping": SimNode.ping,
    "announce": SimNode.announce,
}


@dataclass
class SimStats:
    first_connect: float = 0.0  # wall clock
    last_connack: float = 0.0
    last_born: float = 0.0
    born: int = 0
    dropped: int = 0
    reasserted: int = 0
    failures: int = 0
    first_failure: str = ""
    commands: Counter[str] = field(default_factory=Counter)


class Simulator:
    """Nodes of one worker process: connects them, then beats and answers until told to stop."""

    def __init__(self, kit: Kit, ids: list[str], published: Synchronized[int]) -> None:
        self.kit = kit
        self.topics = Topics(kit.prefix)
        self.coordinator_topics = {
            self.topics.coordinator_state(),
            self.topics.coordinator_heartbeat(),
        }
        self.selector = selectors.DefaultSelector()
        self.sessions = SessionCounter()
        self.published = published
        self.stats = SimStats()
        self.nodes = [SimNode(self, i, node_id) for i, node_id in enumerate(ids)]
        self.due: list[tuple[float, int]] = []  # heartbeat heap: (monotonic time, node index)
        self.handshaking = 0  # connections waiting for their CONNACK
        self.load = sysinfo.load_average()
        self.memory_mb = sysinfo.memory_mb()[1]
        self.rng = random.Random(ids[0] if ids else "")

    def snapshot(self) -> SimStats:
        return dataclasses.replace(self.stats, commands=Counter(self.stats.commands))

    def failure(self, what: str) -> None:
        self.stats.failures += 1
        if not self.stats.first_failure:
            self.stats.first_failure = what

    def born(self, node: SimNode) -> None:
        self.stats.born += 1
        self.stats.last_born = time.time()
        node.beat()  # the agent's first tick right after 'online'
        # Later beats every INTERVAL, each node at its own phase (staggered).
        heapq.heappush(self.due, (time.monotonic() + self.rng.uniform(0, INTERVAL), node.index))

    def service(self, timeout: float) -> None:
        for key, mask in self.selector.select(timeout):
            node: SimNode = key.data
            client = node.client
            if client is None:
                continue
            if mask & selectors.EVENT_READ:
                client.loop_read()
            node.flush()

    def housekeeping(self) -> None:
        """Once a second: keepalive pings, and the host figures the heartbeats carry."""
        self.load = sysinfo.load_average()
        self.memory_mb = sysinfo.memory_mb()[1]
        now = time.monotonic()
        for node in self.nodes:
            late = node.client is not None and not node.connected and not node.failed
            if late and now - node.started > CONNACK_LIMIT:
                node.failed = True
                self.handshaking -= 1
                self.failure(f"{node.id}: no CONNACK within {CONNACK_LIMIT:.0f} s")
            if node.client is not None and node.alive:
                node.client.loop_misc()
                node.flush()

    def run(self, go: Any, stop: Any, out: Any) -> None:
        out.put(("ready", None))
        go.wait()
        waiting = list(reversed(self.nodes))  # still to connect
        reported = False
        self.stats.first_connect = time.time()
        next_misc = time.monotonic() + 1.0
        while not stop.is_set():
            while waiting and self.handshaking < HANDSHAKES:
                node = waiting.pop()
                self.handshaking += 1
                try:
                    node.connect()
                except OSError as e:
                    self.handshaking -= 1
                    node.failed = True
                    self.failure(f"{node.id}: connect: {e}")
            if (
                not reported
                and not waiting
                and self.stats.born + self.stats.failures >= len(self.nodes)
            ):
                out.put(("born", self.snapshot()))
                reported = True
            now = time.monotonic()
            timeout = min(next_misc, self.due[0][0] if self.due else next_misc) - now
            self.service(max(0.0, min(timeout, 0.05)))  # a CONNACK or PUBACK wakes it
            now = time.monotonic()
            while self.due and self.due[0][0] <= now:
                when, index = heapq.heappop(self.due)
                node = self.nodes[index]
                if node.beat():
                    node.flush()
                    later = when + INTERVAL
                    heapq.heappush(self.due, (later if later > now else now + INTERVAL, index))
            if now >= next_misc:
                next_misc = now + 1.0
                self.housekeeping()
        self.shutdown()
        out.put(("done", self.snapshot()))

    def shutdown(self) -> None:
        """[T-STATE-2] a clean stop: retained 'offline' for each session, then DISCONNECT."""
        for node in self.nodes:
            node.stopping = True
            if node.alive and node.born:
                node.offline_mid = node.publish_state("offline")
                node.flush()
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and any(n.offline_mid >= 0 for n in self.nodes):
            self.service(0.05)
        for node in self.nodes:
            if node.client is not None and node.alive:
                node.client.disconnect()
                node.flush()
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and any(n.alive for n in self.nodes):
            self.service(0.05)
        self.selector.close()


def simulate(
    kit: Kit, ids: list[str], published: Synchronized[int], go: Any, stop: Any, out: Any
) -> None:
    """Entry point of a simulator process."""
    Simulator(kit, ids, published).run(go, stop, out)


# ---- the simulator processes, seen from the benchmark -------------------------------------


class Simulators:
    """The simulator processes, and what they report: 'ready', 'born' (every node online
    or failed), 'done' (after a clean stop)."""

    def __init__(self, kit: Kit, ids: list[str], workers: int) -> None:
        ctx = mp.get_context("spawn")
        self.out = ctx.Queue()
        self.go = ctx.Event()
        self.stop = ctx.Event()
        self.counts = [ctx.Value("q", 0, lock=False) for _ in range(workers)]
        self.procs = [
            ctx.Process(
                target=simulate,
                args=(kit, ids[w::workers], self.counts[w], self.go, self.stop, self.out),
                name=f"simulator-{w}",
                daemon=True,
            )
            for w in range(workers)
        ]
        self.reports: dict[str, list[Any]] = {"ready": [], "born": [], "done": []}
        for proc in self.procs:
            proc.start()

    @property
    def published(self) -> int:
        return sum(v.value for v in self.counts)

    def poll(self, timeout: float = 0.0) -> None:
        with contextlib.suppress(queue.Empty):
            kind, value = self.out.get(timeout=timeout) if timeout else self.out.get_nowait()
            self.reports[kind].append(value)

    def wait(self, kind: str, timeout: float) -> list[Any]:
        deadline = time.monotonic() + timeout
        while len(self.reports[kind]) < len(self.procs):
            if time.monotonic() > deadline:
                missing = len(self.procs) - len(self.reports[kind])
                raise TimeoutError(f"{missing} simulator processes did not report '{kind}'")
            self.poll(0.1)
        return self.reports[kind]

    def close(self) -> None:
        self.stop.set()
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()
