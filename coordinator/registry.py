"""The cluster registry: what the coordinator (and `mqinfer status`) knows of nodes and services.

Pure logic with no I/O: feed it decoded messages with the local monotonic time, ask it which
nodes have gone quiet. The coordinator and the status command share it, so both read the
retained state the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mqinfer.protocol import messages as m
from mqinfer.protocol.statuses import Statuses
from mqinfer.protocol.topics import Kind, Ref

DEFAULT_INTERVAL = 5.0  # assumed heartbeat interval until a node's first heartbeat says otherwise


@dataclass
class NodeRecord:
    id: str
    state: str = "unknown"  # online | offline | lost | unknown (caps or heartbeat, no state yet)
    session: int | None = None
    reason: str | None = None
    by: str | None = None
    caps: m.Capabilities | None = None
    heartbeat: m.Heartbeat | None = None
    last_seen: float | None = None  # local monotonic time of the last sign of life
    since: float = 0.0  # local monotonic time of the last change of state (or first sight)

    @property
    def interval(self) -> float:
        return self.heartbeat.interval if self.heartbeat else DEFAULT_INTERVAL


@dataclass(frozen=True)
class Change:
    node: str
    old: str
    new: str
    session: int | None
    reason: str


@dataclass
class ServiceRecord:
    name: str
    spec: m.ServiceSpec | None = None
    statuses: Statuses = field(default_factory=Statuses)  # [T-STATUS-2]

    @property
    def status(self) -> m.ServiceStatus | None:
        return self.statuses.status


@dataclass
class Registry:
    missed_beats: float = 3.0  # a node is lost after this many heartbeat intervals of silence
    nodes: dict[str, NodeRecord] = field(default_factory=dict)
    services: dict[str, ServiceRecord] = field(default_factory=dict)
    coordinator: m.CoordinatorState | None = None
    ignored: list[str] = field(default_factory=list)  # why messages were not applied (last 100)
    rejected: dict[str, str] = field(default_factory=dict)  # service -> why its spec was refused

    def _node(self, node_id: str, now: float) -> NodeRecord:
        rec = self.nodes.get(node_id)
        if rec is None:
            rec = self.nodes[node_id] = NodeRecord(node_id, since=now)
        return rec

    def _ignore(self, why: str) -> list[Change]:
        self.ignored.append(why)
        del self.ignored[:-100]
        return []

    def apply(self, ref: Ref, msg: m.Wire | None, now: float, retained: bool) -> list[Change]:
        """Apply one decoded message (None: the retained message was cleared)."""
        if ref.kind is Kind.COORDINATOR_STATE:
            self.coordinator = msg if isinstance(msg, m.CoordinatorState) else None
            session = self.coordinator.session if self.coordinator else None
            for svc in self.services.values():
                svc.statuses.current = session
            return []
        if ref.service is not None:
            return self._apply_service(ref, msg)
        if ref.node is None:
            return []
        if msg is None:
            if ref.kind is Kind.NODE_STATE:  # clearing the state forgets the node
                self.nodes.pop(ref.node, None)
            elif ref.kind is Kind.NODE_CAPS and ref.node in self.nodes:
                self.nodes[ref.node].caps = None
            return []
        rec = self._node(ref.node, now)
        if isinstance(msg, m.NodeState):
            return self._apply_state(rec, msg, now)
        if isinstance(msg, m.Heartbeat):
            return self._apply_heartbeat(rec, msg, now, retained)
        if isinstance(msg, m.Capabilities) and (
            rec.caps is None or msg.session >= rec.caps.session
        ):
            rec.caps = msg
        return []

    def _apply_state(self, rec: NodeRecord, msg: m.NodeState, now: float) -> list[Change]:
        current = rec.session
        if current is not None and msg.session < current:
            # [T-STATE-3] a late Will (or stale state) of an older session changes nothing.
            return self._ignore(
                f"{rec.id}: '{msg.state}' of old session {msg.session} (current {current}) ignored"
            )
        if (
            current is not None
            and msg.session == current
            and msg.state == "online"
            and (rec.state == "lost" and rec.by == "will")
        ):
            return self._ignore(f"{rec.id}: 'online' of session {current} after its Will ignored")
        return self._set(rec, msg.state, msg.session, now, msg.reason, msg.by)

    def _apply_heartbeat(
        self, rec: NodeRecord, msg: m.Heartbeat, now: float, retained: bool
    ) -> list[Change]:
        if (
            rec.heartbeat is None
            or msg.session > rec.heartbeat.session
            or (msg.session == rec.heartbeat.session and msg.seq >= rec.heartbeat.seq)
        ):
            rec.heartbeat = msg
        if retained:  # a retained heartbeat says the node *was* alive, not that it is
            if rec.state == "online" and rec.last_seen is None:
                rec.last_seen = now  # grace: a full timeout from when we started watching
            return []
        if rec.session is not None and msg.session < rec.session:
            return []
        if rec.state == "lost" and rec.by == "will" and msg.session == rec.session:
            return []  # cannot be: that connection is closed; a late delivery
        if rec.state != "online":
            return self._set(rec, "online", msg.session, now, "heartbeat", "node")
        rec.last_seen = now
        return []

    def _set(
        self,
        rec: NodeRecord,
        state: str,
        session: int,
        now: float,
        reason: str | None,
        by: str | None,
    ) -> list[Change]:
        old = rec.state
        rec.state, rec.session, rec.reason, rec.by = state, session, reason, by
        if state == "online":
            rec.last_seen = now
        if old == state:
            return []
        rec.since = now
        return [Change(rec.id, old, state, session, reason or by or "")]

    def _apply_service(self, ref: Ref, msg: m.Wire | None) -> list[Change]:
        assert ref.service is not None
        rec = self.services.get(ref.service)
        if rec is None:
            rec = self.services[ref.service] = ServiceRecord(ref.service)
            rec.statuses.current = self.coordinator.session if self.coordinator else None
        if ref.kind is Kind.SERVICE_SPEC:
            rec.spec = msg if isinstance(msg, m.ServiceSpec) else None
            self.rejected.pop(ref.service, None)
        elif ref.kind is Kind.SERVICE_STATUS:
            status = msg if isinstance(msg, m.ServiceStatus) else None
            if not rec.statuses.take(status):
                return self._ignore(
                    f"{ref.service}: status seq {getattr(msg, 'seq', None)} is stale"
                )
        if rec.spec is None and not rec.statuses.by_session:
            del self.services[ref.service]
        return []

    def reject_spec(self, service: str, why: str) -> None:
        """A spec that could not be read: the service has no spec we can act on."""
        self.rejected[service] = why
        rec = self.services.get(service)
        if rec is not None:
            rec.spec = None
            if not rec.statuses.by_session:
                del self.services[service]

    def overdue(self, now: float) -> list[tuple[NodeRecord, str]]:
        """Online nodes whose heartbeats stopped for longer than missed_beats intervals."""
        late = []
        for rec in self.nodes.values():
            if rec.state != "online" or rec.last_seen is None:
                continue
            limit = self.missed_beats * rec.interval
            silent = now - rec.last_seen
            if silent > limit:
                late.append((rec, f"no heartbeat for {silent:.1f} s (limit {limit:.1f} s)"))
        return late

    def forgettable(self, now: float, after: float) -> list[NodeRecord]:
        """Nodes lost or offline (or never seen online) for longer than `after` seconds."""
        return [
            rec for rec in self.nodes.values() if rec.state != "online" and now - rec.since > after
        ]

    def mark_lost(self, rec: NodeRecord, reason: str, now: float) -> list[Change]:
        assert rec.session is not None
        return self._set(rec, "lost", rec.session, now, reason, "coordinator")
