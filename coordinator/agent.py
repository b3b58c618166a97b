"""The coordinator agent: keeps the registry from retained and live messages.

On every (re)connection it subscribes before it announces itself, so the broker's retained
messages rebuild the whole registry ([T-COORD-2]).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque

from coordinator.registry import Change, Registry
from mqinfer.client import Connection, Message, NotConnected, Will
from protocol import codec
from protocol import messages as m
from protocol.errors import ProtocolError
from protocol.topics import Kind, Ref, TopicError, Topics

log = logging.getLogger("mqinfer.coordinator")

# What the coordinator reads: every node and service control topic.
WATCHED = (
    Kind.NODE_CAPS,
    Kind.NODE_STATE,
    Kind.NODE_HEARTBEAT,
    Kind.NODE_REPLY,
)
WATCHED_SERVICES = (Kind.SERVICE_SPEC, Kind.SERVICE_STATUS)


def subscriptions(topics: Topics) -> list[tuple[str, int]]:
    subs = [(topics.all_nodes(k), 1) for k in WATCHED]
    subs += [(topics.all_services(k), 1) for k in WATCHED_SERVICES]
    return subs


def read(
    topics: Topics, registry: Registry, message: Message, now: float
) -> tuple[Ref, list[Change]]:
    """Decode and apply one message; raise ProtocolError/TopicError when it is malformed."""
    ref = topics.parse(message.topic)
    if ref.kind is Kind.NODE_REPLY:
        return ref, []
    msg = codec.decode_for(ref, message.payload) if message.payload else None
    return ref, registry.apply(ref, msg, now, message.retain)


class CoordinatorAgent:
    def __init__(self, topics: Topics, registry: Registry, coordinator_id: str) -> None:
        self.topics = topics
        self.registry = registry
        self.id = coordinator_id
        self.name = f"coordinator {coordinator_id}"
        self._lock = threading.Lock()
        self._session = 0
        self._conn: Connection | None = None
        self._asked: set[tuple[str, int]] = set()  # (node, session) asked to re-announce
        self.changes: deque[Change] = deque(maxlen=1000)  # recent state changes, newest last

    def client_id(self, session: int) -> str:
        return f"mqinfer-coordinator-{self.id}-{session:x}"

    def _state(self, state: m.NodeStateName, session: int) -> bytes:
        ts = None if state == "lost" else time.time()
        return codec.encode(m.CoordinatorState(id=self.id, state=state, session=session, ts=ts))

    def will(self, session: int) -> Will:
        return Will(self.topics.coordinator_state(), self._state("lost", session))

    def start(self, conn: Connection, session: int) -> None:
        self._session, self._conn = session, conn
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
                ref, changes = read(self.topics, self.registry, message, now)
        except (ProtocolError, TopicError) as e:
            # [T-COORD-3] malformed input is logged with the reason and ignored.
            log.warning("ignored message on %s: %s", message.topic, e)
            return
        for change in changes:
            self.changes.append(change)
            log.info("node %s: %s -> %s (%s)", change.node, change.old, change.new, change.reason)
        if not message.retain and ref.node is not None:
            self._ask_for_caps(ref.node)

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
