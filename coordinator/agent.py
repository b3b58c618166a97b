"""The coordinator agent: keeps the registry from retained and live messages.

On every (re)connection it subscribes before it announces itself, so the broker's retained
messages rebuild the whole registry ([T-COORD-2]).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

from mqinfer.coordinator.provision import Action, Provisioner, PublishStatus, SendCommand
from mqinfer.coordinator.registry import Change, Registry
from mqinfer.mqtt import Connection, Message, MQTTError, NotConnected, Will
from mqinfer.protocol import codec, replies
from mqinfer.protocol import messages as m
from mqinfer.protocol.errors import Code, ProtocolError
from mqinfer.protocol.payload import result_json
from mqinfer.protocol.routing import request_key
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


def subscriptions(topics: Topics) -> list[tuple[str, int]]:
    subs = [(topics.all_nodes(k), 1) for k in WATCHED]
    subs += [(topics.all_services(k), 1) for k in WATCHED_SERVICES]
    return subs


def read(
    topics: Topics, registry: Registry, message: Message, now: float
) -> tuple[Ref, m.Wire | None, list[Change]]:
    """Decode and apply one message; raise ProtocolError/TopicError when it is malformed."""
    ref = topics.parse(message.topic)
    if ref.kind not in REGISTERED:
        return ref, None, []  # replies and requests are read by the caller; not the rest
    try:
        msg = codec.decode_for(ref, message.payload) if message.payload else None
    except ProtocolError:
        if ref.kind is Kind.SERVICE_SPEC and ref.service is not None:
            registry.reject_spec(ref.service)  # nothing to act on until a good one comes
        raise
    return ref, msg, registry.apply(ref, msg, now, message.retain)


RECENT = 16  # statuses per service the coordinator remembers having published


@dataclass
class _Published:
    """The statuses of one service this coordinator published, to tell them from others'."""

    own: m.ServiceStatus | None = None  # the newest; None: cleared
    recent: deque[bytes] = field(default_factory=lambda: deque(maxlen=RECENT))


class CoordinatorAgent:
    def __init__(
        self,
        topics: Topics,
        registry: Registry,
        coordinator_id: str,
        forget_after: float = FORGET_AFTER,
    ) -> None:
        self.topics = topics
        self.forget_after = forget_after
        self.registry = registry
        self.id = coordinator_id
        self.name = f"coordinator {coordinator_id}"
        self._lock = threading.Lock()
        self._session = 0
        self._conn: Connection | None = None
        self._asked: set[tuple[str, int]] = set()  # (node, session) asked to re-announce
        self.changes: deque[Change] = deque(maxlen=1000)  # recent state changes, newest last
        self.provisioner = Provisioner()
        self._unavailable: set[str] = set()  # services whose requests we answer 'unavailable'
        self._seq = 0  # the newest status seq seen or given, so ours always counts higher
        self._published: dict[str, _Published] = {}  # service -> what we published
        self._restore: set[str] = set()  # services whose status someone else overwrote

    @property
    def session(self) -> int:
        return self._session

    def client_id(self, session: int) -> str:
        return f"mqinfer-coordinator-{self.id}-{session:x}"

    def _state(self, state: m.NodeStateName, session: int) -> bytes:
        ts = None if state == "lost" else time.time()
        return codec.encode(m.CoordinatorState(id=self.id, state=state, session=session, ts=ts))

    def will(self, session: int) -> Will:
        return Will(self.topics.coordinator_state(), self._state("lost", session))

    def start(self, conn: Connection, session: int) -> None:
        self._session, self._conn = session, conn
        self._unavailable.clear()
        with self._lock:  # the statuses to believe are this session's own ([T-STATUS-2])
            own = m.CoordinatorState(id=self.id, state="online", session=session)
            self.registry.apply(self.topics.parse(self.topics.coordinator_state()), own, 0, False)
        conn.subscribe(subscriptions(self.topics))
        conn.publish_wait(
            self.topics.coordinator_state(), self._state("online", session), retain=True
        )

    def shutdown(self, conn: Connection) -> None:
        conn.publish_wait(
            self.topics.coordinator_state(), self._state("offline", self._session), retain=True
        )

    def on_message(self, message: Message) -> None:
        now = time.monotonic()
        try:
            with self._lock:
                ref, msg, changes = read(self.topics, self.registry, message, now)
                self._provisioning_input(ref, msg, message, now)
        except (ProtocolError, TopicError) as e:
            # [T-COORD-3] malformed input is logged with the reason and ignored; a spec is
            # answered with a failed status naming what was wrong, where its sender looks.
            log.warning("ignored message on %s: %s", message.topic, e)
            self._refused_spec(message, e)
            return
        for change in changes:
            self.changes.append(change)
            log.info("node %s: %s -> %s (%s)", change.node, change.old, change.new, change.reason)
        if not message.retain and ref.node is not None:
            self._ask_for_caps(ref.node)

    def _refused_spec(self, message: Message, error: Exception) -> None:
        try:
            ref = self.topics.parse(message.topic)
        except TopicError:
            return
        if ref.kind is not Kind.SERVICE_SPEC or ref.service is None:
            return
        why = f"{error.code}: {error.message}" if isinstance(error, ProtocolError) else str(error)
        with self._lock:
            self.provisioner.reject(ref.service, why)

    def _provisioning_input(
        self, ref: Ref, msg: m.Wire | None, message: Message, now: float
    ) -> None:
        if ref.kind is Kind.SERVICE_REQUEST:
            self._answer_unavailable(ref, message)
            return
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

    def _answer_unavailable(self, ref: Ref, message: Message) -> None:
        """[T-SERVE-4] while a service has no ready replica, the coordinator answers its
        requests with an 'unavailable' error (as the broker delivered the status, like the
        replicas decide)."""
        assert ref.service is not None
        rec = self.registry.services.get(ref.service)
        status = rec.status if rec else None
        conn = self._conn
        if conn is None or rec is None or rec.spec is None or (status and status.head_ready()):
            return
        key = request_key(
            message.topic, message.payload, message.correlation_data, message.response_topic
        )
        why = f"{status.state}: {status.reason}" if status and status.reason else "deploying"
        payload = result_json(
            request_id=replies.request_id(ref, message.correlation_data, None, key),
            service=ref.service,
            node=None,
            ok=False,
            error=(str(Code.UNAVAILABLE), f"service {ref.service} has no ready replica ({why})"),
        )
        topic = replies.result_topic(self.topics, ref.service, ref, message.response_topic)
        with contextlib.suppress(NotConnected):
            conn.publish(topic, payload, correlation_data=message.correlation_data)

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

    def tick(self, conn: Connection) -> None:
        now = time.monotonic()
        with self._lock:
            late = self.registry.overdue(now)
            for rec, reason in late:
                for change in self.registry.mark_lost(rec, reason, now):
                    self.changes.append(change)
                    log.warning("node %s: %s -> lost (%s)", change.node, change.old, reason)
                assert rec.session is not None
                lost = m.NodeState(
                    node=rec.id,
                    state="lost",
                    session=rec.session,
                    ts=time.time(),
                    reason=reason,
                    by="coordinator",
                )
                # Retained, so `mqinfer status` and a restarted coordinator see it too.
                conn.publish(self.topics.node_state(rec.id), codec.encode(lost), retain=True)
            self._forget(conn, now)
            actions = self.provisioner.step(self.registry, now)
            actions += self._restorations(actions)
            wanted = {
                name
                for name, rec in self.registry.services.items()
                if rec.spec is not None and not (rec.status and rec.status.head_ready())
            }
        # Subscribed before a status without ready replicas goes out: a request the replicas
        # stop taking from then on is one the coordinator sees ([T-SERVE-4]).
        wanted |= {
            a.name
            for a in actions
            if isinstance(a, PublishStatus)
            and a.status is not None
            and a.status.state != "removed"
            and not a.status.head_ready()
        }
        self._follow_unavailable(conn, wanted)
        # Statuses before commands: a replica that a command takes out of service (a new
        # model to load) is out of every other replica's ready set before it stops reading.
        for action in sorted(actions, key=lambda a: not isinstance(a, PublishStatus)):
            self._carry_out(conn, action)

    def _carry_out(self, conn: Connection, action: Action) -> None:
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
            if action.status:
                log.info(
                    "service %s: %s %s",
                    action.name,
                    action.status.state,
                    action.status.reason or "",
                )

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
            log.warning(
                "service %s: a status not published by this coordinator; restoring ours", name
            )
            out.append(PublishStatus(name, own))
        self._restore.clear()
        return out

    def _forget(self, conn: Connection, now: float) -> None:
        """Nodes lost or offline for longer than forget_after are forgotten, and their
        retained topics cleared (a node id that was only ever spoofed included)."""
        for rec in self.registry.forgettable(now, self.forget_after):
            log.info(
                "node %s: %s for over %.0f s; forgetting it", rec.id, rec.state, self.forget_after
            )
            del self.registry.nodes[rec.id]
            for topic in (
                self.topics.node_caps(rec.id),
                self.topics.node_heartbeat(rec.id),
                self.topics.node_state(rec.id),
            ):
                conn.publish(topic, b"", retain=True)

    def _follow_unavailable(self, conn: Connection, wanted: set[str]) -> None:
        """Subscribe to the requests of services with no ready replica, and only those."""
        try:
            for name in sorted(wanted - self._unavailable):
                conn.subscribe([(f, 1) for f in self.topics.service_requests(name)])
                self._unavailable.add(name)
            for name in sorted(self._unavailable - wanted):
                conn.unsubscribe(self.topics.service_requests(name))
                self._unavailable.discard(name)
        except MQTTError as e:
            log.warning("could not follow requests: %s", e)
