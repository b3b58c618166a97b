"""The coordinator agent: the registry, provisioning and the dispatcher, on the hub.

It reads every node and service topic into the registry (retained messages rebuild it,
[T-COORD-2]), turns specs into replicas (coordinator.provision), and, while it is the
active coordinator, takes every request and gives it to one replica (coordinator.dispatch).
A standby keeps only the registry warm (coordinator.hub runs the roles).

Threads: the hub connection's network thread calls `on_message`; the main thread calls
`tick`. Both hold the agent's lock while they decide and publish only after letting it go
(a publish takes the connection's lock, which the network thread holds around on_message).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from mqinfer.coordinator.dispatch import (
    Ack,
    Dispatcher,
    Incoming,
    ReadyReplica,
    Reply,
    SendWork,
    epoch_of,
)
from mqinfer.coordinator.dispatch import Action as Dispatch
from mqinfer.coordinator.provision import Action, Provisioner, PublishStatus, SendCommand
from mqinfer.coordinator.registry import Change, Registry
from mqinfer.mqtt import (
    SUBSCRIBE_RETRIES,
    Brokers,
    BrokerURL,
    Connection,
    Message,
    MQTTError,
    NotConnected,
    Will,
)
from mqinfer.protocol import codec, replies
from mqinfer.protocol import messages as m
from mqinfer.protocol import work as w
from mqinfer.protocol.errors import ProtocolError
from mqinfer.protocol.topics import Kind, Ref, TopicError, Topics

log = logging.getLogger("mqinfer.coordinator")

# What the coordinator reads: every node and service control topic.
WATCHED = (
    Kind.NODE_CAPS,
    Kind.NODE_STATE,
    Kind.NODE_HEARTBEAT,
    Kind.NODE_REPLY,
)
WATCHED_SERVICES = (Kind.SERVICE_SPEC, Kind.SERVICE_STATUS)
# What the registry keeps. (amqtt also delivers retained messages that match *other*
# clients' subscriptions, such as artifact chunks: those are passed over.)
REGISTERED = {*WATCHED, *WATCHED_SERVICES, Kind.COORDINATOR_STATE} - {Kind.NODE_REPLY}
FORGET_AFTER = 3600.0  # seconds a node stays lost or offline before it is forgotten
HEARTBEAT = 1.0  # seconds between the active coordinator's heartbeats
RECENT = 16  # statuses per service the coordinator remembers having published
ACKED = 65536  # request packet ids remembered as acknowledged (a redelivery is acked again)


def subscriptions(topics: Topics) -> list[tuple[str, int]]:
    """What the registry needs (a standby, `mqinfer status`)."""
    subs = [(topics.all_nodes(k), 1) for k in WATCHED]
    subs += [(topics.all_services(k), 1) for k in WATCHED_SERVICES]
    return [*subs, (topics.coordinator_state(), 1)]


def hub_subscriptions(topics: Topics) -> list[tuple[str, int]]:
    """What the active coordinator takes, in one SUBSCRIBE per session: the registry's
    topics, every request topic and every node's answers ([T-WORK-1])."""
    subs = subscriptions(topics)
    subs += [(f, 1) for f in topics.all_requests()]
    return [*subs, (topics.all_nodes(Kind.NODE_ANSWER), 1)]


def read(
    topics: Topics, registry: Registry, message: Message, now: float
) -> tuple[Ref, m.Wire | None, list[Change]]:
    """Decode and apply one message; raise ProtocolError/TopicError when it is malformed."""
    ref = topics.parse(message.topic)
    if ref.kind not in REGISTERED:
        return ref, None, []  # replies, requests and answers are read by the caller
    try:
        msg = codec.decode_for(ref, message.payload) if message.payload else None
    except ProtocolError as e:
        if ref.kind is Kind.SERVICE_SPEC and ref.service is not None:
            # Nothing to act on until a good one comes; the status will say why.
            registry.reject_spec(ref.service, f"{e.code}: {e.message}")
        raise
    return ref, msg, registry.apply(ref, msg, now, message.retain)


@dataclass
class _Published:
    """The statuses of one service this coordinator published, to tell them from others'."""

    own: m.ServiceStatus | None = None  # the newest; None: cleared
    recent: deque[bytes] = field(default_factory=lambda: deque(maxlen=RECENT))


@dataclass
class _Acks:
    """Requests taken from the broker and not yet acknowledged, by packet id; and the ids
    acknowledged lately, so a redelivery of one (its acknowledgement was lost) is
    acknowledged again rather than served twice."""

    pending: set[int] = field(default_factory=set)
    done: dict[int, None] = field(default_factory=dict)  # insertion ordered, bounded

    def take(self, message: Message) -> str:
        """'new', 'pending' (a redelivery of one being served) or 'again' (of one done)."""
        mid = message.mid if message.qos else 0
        if not mid:
            return "new"
        if message.dup and mid in self.pending:
            return "pending"
        if mid in self.done:
            del self.done[mid]
            if message.dup:
                return "again"
        self.pending.add(mid)
        return "new"

    def acked(self, mid: int) -> None:
        self.pending.discard(mid)
        self.done[mid] = None
        while len(self.done) > ACKED:
            del self.done[next(iter(self.done))]


class CoordinatorAgent:
    def __init__(
        self,
        topics: Topics,
        registry: Registry,
        coordinator_id: str,
        forget_after: float = FORGET_AFTER,
        max_request_bytes: int = 16 * 2**20,
    ) -> None:
        self.topics = topics
        self.forget_after = forget_after
        self.max_request_bytes = max_request_bytes
        self.registry = registry
        self.id = coordinator_id
        self.name = f"coordinator {coordinator_id}"
        self.active = False  # False: a standby, keeping the registry warm
        self._lock = threading.Lock()
        self._session = 0
        self._conn: Connection | None = None
        self._asked: set[tuple[str, int]] = set()  # (node, session) asked to re-announce
        self.changes: deque[Change] = deque(maxlen=1000)  # recent state changes, newest last
        self.provisioner = Provisioner()
        self.dispatcher = Dispatcher(epoch_of(coordinator_id, 0), max_request_bytes)
        self._acks = _Acks()
        self._seq = 0  # the newest status seq seen or given, so ours always counts higher
        self._published: dict[str, _Published] = {}  # service -> what we published
        self._restore: set[str] = set()  # services whose status someone else overwrote
        self._beat = 0
        self._next_beat = 0.0
        self._specs: dict[str, m.ServiceSpec | None] = {}  # what the dispatcher was told
        self._fresh = True

    @property
    def session(self) -> int:
        return self._session

    @property
    def lock(self) -> threading.Lock:
        """Held while the registry and dispatcher change; readers (the web view) take it."""
        return self._lock

    def _state(self, state: m.NodeStateName, session: int) -> bytes:
        ts = None if state == "lost" else time.time()
        return codec.encode(m.CoordinatorState(id=self.id, state=state, session=session, ts=ts))

    def will(self, session: int) -> Will:
        return Will(self.topics.coordinator_state(), self._state("lost", session))

    # ---- roles (coordinator.hub) ----------------------------------------------------------

    def prepare(self, conn: Connection, session: int, fresh: bool, warm: bool) -> None:
        """Before the hub connection opens (what it holds may come at once): `fresh` when
        this coordinator is becoming the active one (a new dispatcher, whose leases are its
        own), else a reconnect of the same active period (the dispatcher and its leases go
        on). `warm`: the registry was kept while standing by, so provisioning needs no time
        to read the retained state."""
        with self._lock:
            self._session, self._conn = session, conn
            self.active = True
            self._fresh = fresh
            if fresh:
                self.provisioner = Provisioner(grace=0.2 if warm else 1.0)
                self.dispatcher = Dispatcher(epoch_of(self.id, session), self.max_request_bytes)
                self._specs.clear()
                self._acks = _Acks()
                self._published.clear()
                self._seed()
            # The statuses to believe are this session's own ([T-STATUS-2]).
            own = m.CoordinatorState(id=self.id, state="online", session=session)
            self.registry.apply(self.topics.parse(self.topics.coordinator_state()), own, 0, False)

    def connected(self, session_present: bool) -> None:
        """The broker took the hub connection (network thread, before any message of it)."""
        with self._lock:
            if not session_present and not self._fresh:
                # The broker lost our session: what we had taken from it is gone there, so
                # there is nothing to acknowledge; the requests we hold are still answered.
                self._acks = _Acks()
                self.dispatcher.forget_acks()

    def begin(self, conn: Connection) -> None:
        """The hub connection is up: subscribe (once per session), announce."""
        session = self._session
        # One SUBSCRIBE per session, with wildcards; again after a reconnect even when the
        # broker kept the session (a cluster may have lost a subscription it refused).
        conn.subscribe(hub_subscriptions(self.topics), timeout=60, retries=SUBSCRIBE_RETRIES)
        conn.publish_wait(
            self.topics.coordinator_state(), self._state("online", session), retain=True
        )
        # [T-STATUS-2] readers believe the statuses of this session only: those this
        # coordinator published in an earlier session of its active period go again under
        # this one, or a reader would see none until a service changed.
        with self._lock:
            again = [(name, p.own) for name, p in self._published.items() if p.own is not None]
        for name, own in again:
            self._provision(conn, PublishStatus(name, own))
        self._next_beat = 0.0
        log.info("%s: active (session %d)", self.name, session)

    def _seed(self) -> None:
        """A new provisioner learns what the registry read while standing by: the specs,
        and the newest status a previous coordinator published, to adopt its placement."""
        for name, why in self.registry.rejected.items():
            self.provisioner.reject(name, why)
        for name, rec in self.registry.services.items():
            if rec.spec is not None:
                self.provisioner.on_spec(name, rec.spec)
            kept = rec.statuses.by_session
            if kept:
                newest = kept[max(kept)]
                self._seq = max(self._seq, newest.seq or 0)
                self.provisioner.on_status(name, newest)

    def end(self) -> None:
        """No longer the active coordinator (another took over): back to standing by."""
        with self._lock:
            self.active = False
            self._conn = None

    def shutdown(self, conn: Connection) -> None:
        conn.publish_wait(
            self.topics.coordinator_state(), self._state("offline", self._session), retain=True
        )

    # ---- incoming (the network thread) --------------------------------------------------

    def on_message(self, message: Message) -> None:
        now = time.monotonic()
        conn = self._conn
        out: list[Dispatch] = []
        try:
            ref = self.topics.parse(message.topic)
        except TopicError as e:
            log.warning("ignored message on %s: %s", message.topic, e)
            self._ack(conn, message)
            return
        if ref.kind is Kind.SERVICE_REQUEST:
            self._request(conn, ref, message, now)
            return
        if ref.kind is Kind.NODE_ANSWER:
            out = self._answer(ref, message, now)
            self._carry_out(conn, out)
            self._ack(conn, message)
            return
        try:
            with self._lock:
                ref, msg, changes = read(self.topics, self.registry, message, now)
                if self.active:
                    self._provisioning_input(ref, msg, message, now)
        except (ProtocolError, TopicError) as e:
            # [T-COORD-3] malformed input is logged with the reason and ignored; a spec is
            # answered with a failed status naming what was wrong, where its sender looks.
            log.warning("ignored message on %s: %s", message.topic, e)
            self._refused_spec(ref, e)
            self._ack(conn, message)
            return
        for change in changes:
            self.changes.append(change)
            log.info("node %s: %s -> %s (%s)", change.node, change.old, change.new, change.reason)
        if self.active and not message.retain and ref.node is not None:
            self._ask_for_caps(ref.node)
        self._ack(conn, message)

    def _ack(self, conn: Connection | None, message: Message) -> None:
        """Everything but requests is acknowledged as soon as it is read."""
        if conn is not None and message.qos and conn.manual_ack:
            conn.ack(message.mid)

    def _request(self, conn: Connection | None, ref: Ref, message: Message, now: float) -> None:
        """[T-WORK-1] a request: given to one replica, acknowledged to the broker only once
        it is answered (until then the broker keeps it for a successor)."""
        if not self.active or conn is None:
            return  # a standby's connection does not subscribe to requests
        with self._lock:
            seen = self._acks.take(message)
            if seen == "pending":
                return  # the broker resent one we are serving: it is acknowledged when done
            if seen == "again":
                out: list[Dispatch] = [Ack(message.mid)]
            else:
                out = self.dispatcher.on_request(self._incoming(ref, message), now)
        self._carry_out(conn, out)

    def _incoming(self, ref: Ref, message: Message) -> Incoming:
        assert ref.service is not None
        corr = message.correlation_data
        fixed = bool(ref.request_id) or replies.valid_id(corr)
        key = (
            ""
            if fixed
            else replies.request_key(message.topic, message.payload, corr, message.response_topic)
        )
        return Incoming(
            service=ref.service,
            payload=message.payload,
            reply=replies.result_topic(self.topics, ref.service, ref, message.response_topic),
            correlation=corr,
            request_id=replies.request_id(ref, corr, None, key),
            id_fixed=fixed,
            mid=message.mid if message.qos else 0,
            refused=replies.response_refused(self.topics, message.response_topic) or "",
        )

    def _answer(self, ref: Ref, message: Message, now: float) -> list[Dispatch]:
        if not self.active or ref.node is None:
            return []
        try:
            answer, body = w.decode_answer(message.payload)
        except ProtocolError as e:
            log.warning("ignored an answer from %s: %s", ref.node, e)
            return []
        with self._lock:
            return self.dispatcher.on_answer(ref.node, answer, body, now)

    def _carry_out(self, conn: Connection | None, actions: list[Dispatch]) -> None:
        """Work to nodes, results to requesters, then the acknowledgements: a request is
        acknowledged only after its result is handed to the broker."""
        if conn is None:
            return
        for action in actions:
            try:
                if isinstance(action, SendWork):
                    conn.publish(self.topics.node_work(action.node), action.payload, qos=1)
                elif isinstance(action, Reply):
                    conn.publish(
                        action.topic, action.payload, qos=1, correlation_data=action.correlation
                    )
                elif isinstance(action, Ack) and action.mid:
                    with self._lock:
                        self._acks.acked(action.mid)
                    conn.ack(action.mid)
            except (MQTTError, ValueError) as e:
                # A reply topic the broker will not take (an MQTT 5 response topic with
                # wildcards, say): logged; the request is still acknowledged.
                log.warning("could not publish: %s", e)

    def _refused_spec(self, ref: Ref, error: Exception) -> None:
        if ref.kind is not Kind.SERVICE_SPEC or ref.service is None or not self.active:
            return  # a standby's registry keeps it for when it becomes active
        why = f"{error.code}: {error.message}" if isinstance(error, ProtocolError) else str(error)
        with self._lock:
            self.provisioner.reject(ref.service, why)

    def _provisioning_input(
        self, ref: Ref, msg: m.Wire | None, message: Message, now: float
    ) -> None:
        if ref.service is not None:
            rec = self.registry.services.get(ref.service)
            if ref.kind is Kind.SERVICE_SPEC:
                self.provisioner.on_spec(ref.service, rec.spec if rec else None)
            elif ref.kind is Kind.SERVICE_STATUS:
                status = msg if isinstance(msg, m.ServiceStatus) else None
                if status is not None and status.seq is not None:
                    self._seq = max(self._seq, status.seq)
                if not self._ours(ref.service, message.payload):
                    self.provisioner.on_status(ref.service, status)
        elif ref.kind is Kind.NODE_REPLY:
            reply = codec.decode_for(ref, message.payload)
            if isinstance(reply, m.CommandReply):
                self.provisioner.on_reply(reply, now)

    def _ask_for_caps(self, node: str) -> None:
        """A live node we have no caps for is asked to announce again (once per session)."""
        rec = self.registry.nodes.get(node)
        conn = self._conn
        if rec is None or rec.caps is not None or rec.state != "online" or conn is None:
            return
        key = (rec.id, rec.session or 0)
        if key in self._asked:
            return
        self._asked.add(key)
        cmd = m.Command(id=uuid.uuid4().hex, op="announce")
        try:
            conn.publish(self.topics.node_cmd(rec.id), codec.encode(cmd))
        except NotConnected:
            self._asked.discard(key)

    # ---- periodic (the main thread) ------------------------------------------------------

    def tick(self, conn: Connection) -> None:
        now = time.monotonic()
        lost: list[m.NodeState] = []
        with self._lock:
            for rec, reason in self.registry.overdue(now):
                for change in self.registry.mark_lost(rec, reason, now):
                    self.changes.append(change)
                    log.warning("node %s: %s -> lost (%s)", change.node, change.old, reason)
                assert rec.session is not None
                lost.append(
                    m.NodeState(
                        node=rec.id,
                        state="lost",
                        session=rec.session,
                        ts=time.time(),
                        reason=reason,
                        by="coordinator",
                    )
                )
            forgotten = self._forget(now)
            actions = self.provisioner.step(self.registry, now)
            actions += self._restorations(actions)
            dispatch = self._sync(now) if self.provisioner.acting else []
            dispatch += self.dispatcher.tick(now)
            beat = self._heartbeat(now)
        for state in lost:  # retained, so `mqinfer status` and a successor see it too
            conn.publish(self.topics.node_state(state.node), codec.encode(state), retain=True)
        for node in forgotten:
            for topic in (
                self.topics.node_caps(node),
                self.topics.node_heartbeat(node),
                self.topics.node_state(node),
            ):
                conn.publish(topic, b"", retain=True)
        # Statuses before commands: what a status says is true when a node acts on a command.
        for action in sorted(actions, key=lambda a: not isinstance(a, PublishStatus)):
            self._provision(conn, action)
        self._carry_out(conn, dispatch)
        if beat is not None:
            conn.publish(self.topics.coordinator_heartbeat(), beat, qos=0)

    def _sync(self, now: float) -> list[Dispatch]:
        """Tell the dispatcher the specs and the ready replicas the provisioner keeps."""
        out: list[Dispatch] = []
        for name, svc_rec in list(self.registry.services.items()):
            if self._specs.get(name) != svc_rec.spec:
                self._specs[name] = svc_rec.spec
                out += self.dispatcher.set_spec(name, svc_rec.spec, now)
        for name in [n for n in self._specs if n not in self.registry.services]:
            del self._specs[name]
            out += self.dispatcher.set_spec(name, None, now)
        for slot, svc in list(self.provisioner.services.items()):
            if svc.spec is None:
                continue
            ready = []
            for node, rep in svc.replicas.items():
                rec = self.registry.nodes.get(node)
                if rep.state != "ready" or rec is None or rec.state != "online" or not rec.session:
                    continue
                workers = svc.spec.workers
                if rec.caps is not None and rec.caps.max_workers:
                    workers = min(workers, rec.caps.max_workers)
                beat = rec.heartbeat
                stats = beat.stats.get(slot) if beat and beat.session == rec.session else None
                reported = (stats.service_ms or stats.inference_ms) if stats else None
                ready.append(ReadyReplica(node, rec.session, workers, reported))
            out += self.dispatcher.set_ready(slot, ready, now)
        for slot in [s for s in self.dispatcher.slots if s not in self.provisioner.services]:
            out += self.dispatcher.set_ready(slot, [], now)
        if not self.dispatcher.opened:  # what came while the retained state was read
            out += self.dispatcher.open(now)
        return out

    def _heartbeat(self, now: float) -> bytes | None:
        if now < self._next_beat:
            return None
        self._next_beat = now + HEARTBEAT
        beat = m.CoordinatorHeartbeat(
            id=self.id,
            session=self._session,
            seq=self._beat,
            ts=time.time(),
            interval=HEARTBEAT,
            dispatch=self.dispatcher.figures(),
        )
        self._beat += 1
        return codec.encode(beat)

    def _provision(self, conn: Connection, action: Action) -> None:
        if isinstance(action, SendCommand):
            conn.publish(self.topics.node_cmd(action.node), codec.encode(action.command))
            log.info(
                "-> %s: %s %s",
                action.node,
                action.command.op,
                action.command.args.get("service")
                or action.command.args.get("spec", {}).get("name", ""),
            )
        elif isinstance(action, PublishStatus):
            topic = self.topics.service_status(action.name)
            status = action.status
            if status is not None:  # [T-STATUS-2] ours: our session, the next seq
                self._seq += 1
                status = status.model_copy(update={"session": self._session, "seq": self._seq})
            payload = codec.encode(status) if status else b""
            with self._lock:
                published = self._published.setdefault(action.name, _Published())
                published.own = status
                published.recent.append(payload)
            conn.publish(topic, payload, retain=True)
            if status:
                log.info("service %s: %s %s", action.name, status.state, status.reason or "")

    def _ours(self, service: str, payload: bytes) -> bool:
        """Whether a status read back is one this coordinator published; if it is not and
        the provisioner has started acting, ours is put back on the next tick."""
        published = self._published.get(service)
        if published is not None and payload in published.recent:
            return True
        if self.provisioner.acting:
            self._restore.add(service)
        return False

    def _restorations(self, actions: list[Action]) -> list[Action]:
        """[T-STATUS-2] a status this coordinator did not publish is overwritten with its
        own (cleared if it has none) within a tick."""
        out: list[Action] = []
        going = {a.name for a in actions if isinstance(a, PublishStatus)}
        for name in sorted(self._restore - going):
            published = self._published.get(name)
            own = published.own if published else None
            log.warning("service %s: a status this coordinator did not publish; restoring", name)
            out.append(PublishStatus(name, own))
        self._restore.clear()
        return out

    def _forget(self, now: float) -> list[str]:
        """Nodes lost or offline for longer than forget_after are forgotten, and their
        retained topics cleared (a node id that was only ever spoofed included)."""
        gone = []
        for rec in self.registry.forgettable(now, self.forget_after):
            log.info(
                "node %s: %s for over %.0f s; forgetting it", rec.id, rec.state, self.forget_after
            )
            del self.registry.nodes[rec.id]
            gone.append(rec.id)
        return gone


def hub_client_id(topics: Topics, urls: Brokers | None = None) -> str:
    """The one client id of the active coordinator's session on the broker: whoever
    connects with it takes the session (and the requests waiting in it) over. So it is
    derived from the coordinator's credentials too (its password, or its TLS key), not
    only from the prefix: an account that may merely connect cannot work it out and kick
    the hub off. Every coordinator of a site (the active one and its standbys) uses the
    same credentials and so the same id."""
    h = hashlib.blake2b(topics.prefix.encode(), digest_size=6)
    first = urls if isinstance(urls, BrokerURL) else (urls[0] if urls else None)
    if first is not None:
        h.update(f"\0{first.username or ''}\0{first.password or ''}\0".encode())
        if first.tls_files.key:
            # An unreadable key: the connection itself says what is wrong with the file.
            with contextlib.suppress(OSError):
                h.update(Path(first.tls_files.key).read_bytes())
    return f"mqinfer-hub-{h.hexdigest()}"
