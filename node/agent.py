"""The node agent: presence (caps, state, Will, heartbeats), its command topic, and the
work the hub gives it.

A node subscribes once per session, to its own topics only: commands, its state (to
contradict a stale Will) and its work. It sees no other node's work and no request it was
not given ([T-WORK-1]).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from pathlib import Path

from mqinfer.mqtt import SUBSCRIBE_RETRIES, Connection, Message, MQTTError, Will
from mqinfer.node import sysinfo
from mqinfer.node.artifacts import ArtifactStore, default_cache_dir
from mqinfer.node.capabilities import Probe, capabilities, reference_ms
from mqinfer.node.commands import CommandHandler
from mqinfer.node.fallback import Fallback
from mqinfer.node.fetch import META_WAIT, Fetcher
from mqinfer.node.intake import Intake
from mqinfer.node.provisioning import Provisioning
from mqinfer.node.replica import DEFAULT_MAX_REQUEST_BYTES, Replica
from mqinfer.node.runtimes import Backend
from mqinfer.protocol import codec
from mqinfer.protocol import messages as m
from mqinfer.protocol.errors import ProtocolError
from mqinfer.protocol.topics import Kind, Topics

log = logging.getLogger("mqinfer.node")

FETCH_IDLE = 30.0  # seconds without a fetch before the artifacts' connection is closed


class NodeAgent:
    """Runs one node's sessions (see mqinfer.mqtt.session.run)."""

    def __init__(
        self,
        node_id: str,
        topics: Topics,
        probe: Probe,
        host: m.Host,
        heartbeat: float = 5.0,
        labels: dict[str, str] | None = None,
        backends: dict[str, Backend] | None = None,
        cache_dir: Path | None = None,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        max_workers: int | None = None,
        artificial_slowdown: float = 1.0,
        max_model_bytes: int | None = None,
        artifact_wait: float = META_WAIT,
    ) -> None:
        self.node_id = node_id
        self.name = f"node {node_id}"
        self.topics = topics
        self.probe = probe
        self.host = host
        self.heartbeat = heartbeat
        self.labels = labels or {}
        self.started = time.monotonic()
        self._session = 0
        self._seq = 0
        self._next_beat = 0.0
        self._conn: Connection | None = None
        self._stopping = False
        self._born = False
        self._lock = threading.Lock()
        self.backends = backends or {}
        self.store = ArtifactStore(cache_dir or default_cache_dir(node_id))
        self.max_request_bytes = max_request_bytes
        self.max_model_bytes = max_model_bytes
        self.fetcher = Fetcher(
            self.store,
            topics,
            self._fetch_connection,
            self.model_bytes_limit,
            meta_wait=artifact_wait,
        )
        self._fetching: Connection | None = None  # a connection for artifacts alone
        self._fetch_lock = threading.Lock()
        self._fetch_idle = 0.0  # monotonic time the fetcher last had nothing to do
        self.fallback = Fallback(node_id, topics)
        self.max_workers = max_workers
        self.artificial_slowdown = artificial_slowdown
        self.speed_ms = reference_ms()
        self.replicas: dict[str, Replica] = {}  # by slot: 'name', or 'name:k' for a stage
        self.intake = Intake(node_id, topics, self.replicas, self._current)
        self.commands = CommandHandler(self)
        self.provisioning = Provisioning(self, self.commands.finished)

    @property
    def session(self) -> int:
        return self._session

    def connection(self) -> Connection | None:
        """The live connection, if any (for work off the network thread)."""
        conn = self._conn
        return conn if conn is not None and conn.alive else None

    def _fetch_connection(self) -> Connection | None:
        """Artifacts are fetched on a connection of their own (the fetcher's thread opens
        it): a SUBSCRIBE that stalls a clustered broker for seconds stalls no heartbeat."""
        with self._fetch_lock:
            conn = self._fetching
            if conn is not None and conn.alive:
                return conn
            main = self.connection()
            if main is None:
                return None
            conn = Connection(
                [main.url, *(u for u in main.urls if u != main.url)],
                f"mqinfer-fetch-{self.node_id}-{secrets.token_hex(6)}",
                self._fetched,
                protocol=main.version or "auto",
            )
            try:
                conn.open()
            except MQTTError as e:
                log.warning("%s: no connection for artifacts: %s", self.name, e)
                return None
            self._fetching = conn
            return conn

    def _fetched(self, message: Message) -> None:
        try:
            ref = self.topics.parse(message.topic)
        except ValueError:
            return
        if ref.kind is Kind.ARTIFACT_META or ref.kind is Kind.ARTIFACT_CHUNK:
            self.fetcher.on_message(ref, message.payload)

    def _close_fetching(self, now: float) -> None:
        """The artifacts' connection goes when nothing was fetched for a while."""
        if self.fetcher.pending():
            self._fetch_idle = now
            return
        if now - self._fetch_idle < FETCH_IDLE:
            return
        with self._fetch_lock:
            conn, self._fetching = self._fetching, None
        if conn is not None:
            conn.close()

    def _current(self) -> tuple[Connection | None, int]:
        with self._lock:
            return self.connection(), self._session

    def model_bytes_limit(self) -> int:
        """The largest model this node takes in now: half its available memory, or less
        (--max-model-mb)."""
        _total, available = sysinfo.memory_mb()
        limit = available * 2**20 // 2
        return min(limit, self.max_model_bytes) if self.max_model_bytes else limit

    def remove(self, conn: Connection | None, slot: str) -> bool:
        """Stop serving a slot: unsubscribe its topics, answer its queue, free its models."""
        replica = self.replicas.pop(slot, None)
        if replica is None:
            return False
        replica.stop()
        log.info("%s: stopped serving %s", self.name, slot)
        return True

    def close(self) -> None:
        """Stop the provisioning thread, the fetcher and every replica (after the session)."""
        self.provisioning.close()
        self.fetcher.close()
        with self._fetch_lock:
            conn, self._fetching = self._fetching, None
        if conn is not None:
            conn.close()
        for slot in list(self.replicas):
            self.remove(None, slot)

    # ---- session hooks ------------------------------------------------------------

    def client_id(self, session: int) -> str:
        # One client id per connection: a hung old connection is not taken over, so its
        # Will may arrive late; the session number in it tells it apart ([T-STATE-3]).
        # The session is in every heartbeat, so a random tail keeps the id from anyone
        # who reads them: with the id, any account could connect and knock the node off.
        return f"mqinfer-node-{self.node_id}-{session:x}-{secrets.token_hex(4)}"

    def will(self, session: int) -> Will:
        lost = m.NodeState(node=self.node_id, state="lost", session=session, by="will")
        return Will(self.topics.node_state(self.node_id), codec.encode(lost), qos=1, retain=True)

    def start(self, conn: Connection, session: int) -> None:
        with self._lock:
            self._conn, self._session, self._seq = conn, session, 0
            self._born = False  # until our 'online' is out, the retained state is old news
        self.intake.new_session(session)
        # [T-CMD-1] subscribe before birth, so no command sent after "online" is missed; one
        # SUBSCRIBE per session, never one per deploy (each can stall a clustered broker).
        self.fallback.start(time.monotonic())
        conn.subscribe(
            [
                (self.topics.node_cmd(self.node_id), 1),
                (self.topics.node_state(self.node_id), 1),
                (self.topics.node_work(self.node_id), 1),
                (self.topics.coordinator_state(), 1),  # [T-HUB-4] is the hub there?
                (self.topics.coordinator_heartbeat(), 0),
            ],
            timeout=60,
            retries=SUBSCRIBE_RETRIES,
        )
        self.announce(conn)
        self.publish_state(conn, "online")
        self._born = True
        self._next_beat = 0.0
        self.tick(conn)

    def tick(self, conn: Connection) -> None:
        now = time.monotonic()
        for replica in list(self.replicas.values()):
            replica.tick(now)
        self.fallback.tick(conn, now)
        self._close_fetching(now)
        if now < self._next_beat:
            return
        self._next_beat = now + self.heartbeat
        _total, available = sysinfo.memory_mb()
        beat = m.Heartbeat(
            node=self.node_id,
            session=self._session,
            seq=self._seq,
            ts=time.time(),
            interval=self.heartbeat,
            uptime=round(now - self.started, 3),
            load=sysinfo.load_average(),
            memory_available_mb=available,
            inflight=sum(r.inflight for r in list(self.replicas.values())),
            services={slot: r.state for slot, r in list(self.replicas.items())},
            stats={slot: r.stats() for slot, r in list(self.replicas.items())},
        )
        self._seq += 1
        conn.publish(
            self.topics.node_heartbeat(self.node_id), codec.encode(beat), qos=0, retain=True
        )

    def shutdown(self, conn: Connection) -> None:
        # [T-STATE-2] a clean stop says 'offline' before the DISCONNECT discards the Will.
        self._stopping = True
        self.publish_state(conn, "offline", wait=True)
        log.info("%s: offline", self.name)

    # ---- publishing -------------------------------------------------------------------

    def announce(self, conn: Connection, wait: bool = True) -> None:
        """Publish the retained caps; `wait` for the PUBACK only off the network thread."""
        caps = capabilities(
            self.node_id, self._session, self.probe, self.host, self.labels, self.store.cached()
        ).model_copy(
            update={
                "speed_ms": round(self.speed_ms * self.artificial_slowdown, 3),
                "max_workers": self.max_workers,
                "artificial_slowdown": self.artificial_slowdown,
            }
        )
        self._retain(conn, self.topics.node_caps(self.node_id), caps, wait)

    def publish_state(self, conn: Connection, state: m.NodeStateName, wait: bool = False) -> None:
        msg = m.NodeState(node=self.node_id, state=state, session=self._session, ts=time.time())
        self._retain(conn, self.topics.node_state(self.node_id), msg, wait)

    @staticmethod
    def _retain(conn: Connection, topic: str, msg: m.Wire, wait: bool) -> None:
        if wait:
            conn.publish_wait(topic, codec.encode(msg), retain=True)
        else:
            conn.publish(topic, codec.encode(msg), retain=True)

    # ---- incoming (network thread) -------------------------------------------------

    def on_message(self, message: Message) -> None:
        try:
            ref = self.topics.parse(message.topic)
        except ValueError as e:
            log.warning("%s: ignoring message: %s", self.name, e)
            return
        conn = self._conn
        if conn is None:
            return
        kind = ref.kind
        if kind is Kind.NODE_WORK and ref.node == self.node_id:
            self.intake.on_work(message, self._session)
        elif kind is Kind.ARTIFACT_META or kind is Kind.ARTIFACT_CHUNK:
            self.fetcher.on_message(ref, message.payload)
        elif kind is Kind.NODE_CMD and ref.node == self.node_id:
            self.commands.handle(conn, message)
        elif kind is Kind.NODE_STATE and ref.node == self.node_id:
            self._check_own_state(conn, message)
        elif kind is Kind.COORDINATOR_HEARTBEAT:
            self.fallback.on_heartbeat(time.monotonic())
        elif kind is Kind.COORDINATOR_STATE:
            self.fallback.on_state(message.payload, time.monotonic())
        elif kind is Kind.SERVICE_REQUEST:  # only while cut off from the hub
            self.fallback.on_request(conn, ref, message, time.monotonic())

    def replicas_of(self, service: str) -> list[Replica]:
        return [r for r in list(self.replicas.values()) if r.name == service]

    def _check_own_state(self, conn: Connection, message: Message) -> None:
        """Re-assert 'online' when a stale Will (or a wrong 'lost') overwrote our state."""
        if not message.payload:
            state = None
        else:
            try:
                state = codec.decode_as(m.NodeState, message.payload)
            except ProtocolError as e:
                log.warning("%s: unreadable state on own topic (%s); re-asserting", self.name, e)
                state = None
        if self._stopping or not self._born:
            return
        if state is not None and state.state == "online":
            if state.session > self._session:
                log.warning(
                    "%s: another process claims this node id (session %d, ours %d)",
                    self.name,
                    state.session,
                    self._session,
                )
            return
        if state is not None and state.session > self._session:
            return  # a newer session of this id ended; not ours to contradict
        if state is not None:
            log.info(
                "%s: state '%s' of session %d (by %s) overwrote ours (%d); re-asserting online",
                self.name,
                state.state,
                state.session,
                state.by,
                self._session,
            )
        self.publish_state(conn, "online")
