"""The registry's rules for states, sessions and heartbeats (no broker)."""

from __future__ import annotations

from mqinfer.coordinator.registry import Registry
from mqinfer.protocol import messages as m
from mqinfer.protocol.topics import Ref, Topics

T = Topics()


def state(node: str, st: m.NodeStateName, session: int, by: str = "node") -> tuple[Ref, m.Wire]:
    return T.parse(T.node_state(node)), m.NodeState(node=node, state=st, session=session, by=by)  # type: ignore[arg-type]


def beat(node: str, session: int, seq: int = 0, interval: float = 1.0) -> tuple[Ref, m.Wire]:
    hb = m.Heartbeat(
        node=node,
        session=session,
        seq=seq,
        ts=0.0,
        interval=interval,
        uptime=0,
        load=(0, 0, 0),
        memory_available_mb=1,
    )
    return T.parse(T.node_heartbeat(node)), hb


def test_late_will_of_older_session_is_ignored() -> None:
    """[T-STATE-3]"""
    r = Registry()
    r.apply(*state("a", "online", 10), now=0, retained=False)
    r.apply(*state("a", "online", 20), now=1, retained=False)
    changes = r.apply(*state("a", "lost", 10, by="will"), now=2, retained=False)
    assert changes == []
    assert (r.nodes["a"].state, r.nodes["a"].session) == ("online", 20)
    assert "old session 10" in r.ignored[-1]


def test_will_of_current_session_marks_lost() -> None:
    """[T-STATE-1]"""
    r = Registry()
    r.apply(*state("a", "online", 10), now=0, retained=False)
    [change] = r.apply(*state("a", "lost", 10, by="will"), now=1, retained=False)
    assert (change.old, change.new, change.session) == ("online", "lost", 10)


def test_heartbeat_silence_is_overdue_after_missed_beats() -> None:
    """[T-COORD-1]"""
    r = Registry(missed_beats=3)
    r.apply(*state("a", "online", 10), now=0, retained=False)
    r.apply(*beat("a", 10, interval=1.0), now=0, retained=False)
    assert r.overdue(2.9) == []
    [(rec, reason)] = r.overdue(3.1)
    assert rec.id == "a" and "no heartbeat for 3.1 s (limit 3.0 s)" in reason
    [change] = r.mark_lost(rec, reason, 3.1)
    assert change.new == "lost" and r.nodes["a"].by == "coordinator"
    # The node was only slow: a live heartbeat of the same session brings it back.
    [back] = r.apply(*beat("a", 10, seq=1), now=4, retained=False)
    assert back.new == "online"


def test_retained_heartbeat_is_not_a_sign_of_life() -> None:
    r = Registry()
    r.apply(*state("a", "lost", 10, by="will"), now=0, retained=True)
    assert r.apply(*beat("a", 10), now=0, retained=True) == []
    assert r.nodes["a"].state == "lost"
    assert r.nodes["a"].heartbeat is not None  # still shown by status


def test_rebuilt_online_node_gets_a_full_timeout_before_it_is_lost() -> None:
    """[T-COORD-2] after a restart the coordinator waits before it judges silence."""
    r = Registry(missed_beats=3)
    r.apply(*state("a", "online", 10), now=100, retained=True)
    r.apply(*beat("a", 10, interval=1.0), now=100, retained=True)
    assert r.overdue(102) == []
    assert [rec.id for rec, _ in r.overdue(103.5)] == ["a"]


def test_clearing_the_state_forgets_the_node() -> None:
    r = Registry()
    r.apply(*state("a", "offline", 10), now=0, retained=True)
    r.apply(T.parse(T.node_state("a")), None, now=1, retained=True)
    assert "a" not in r.nodes


def test_caps_of_newer_session_win() -> None:
    r = Registry()
    ref = T.parse(T.node_caps("a"))
    host = m.Host(hostname="h", os="Linux", arch="x86_64", cores=2, memory_total_mb=1, python="3")
    caps = [
        m.Capabilities(
            node="a",
            session=s,
            ts=0,
            agent="0",
            host=host,
            runtimes={},
            accelerators=[],
            formats=[],
        )
        for s in (20, 10)
    ]
    for c in caps:
        r.apply(ref, c, now=0, retained=True)
    assert r.nodes["a"].caps is caps[0]


def test_services_spec_and_status() -> None:
    r = Registry()
    spec = m.ServiceSpec(
        name="digits", model="d.tflite", artifact="a" * 64, format="tflite", replicas=2
    )
    r.apply(T.parse(T.service_spec("digits")), spec, now=0, retained=True)
    assert r.services["digits"].spec == spec
    r.apply(T.parse(T.service_spec("digits")), None, now=0, retained=True)
    assert "digits" not in r.services


def coordinator(session: int) -> tuple[Ref, m.Wire]:
    return T.parse(T.coordinator_state()), m.CoordinatorState(
        id="hub", state="online", session=session
    )


def status(session: int | None, seq: int | None, state: str = "ready") -> tuple[Ref, m.Wire]:
    msg = m.ServiceStatus(name="digits", state=state, session=session, seq=seq)  # type: ignore[arg-type]
    return T.parse(T.service_status("digits")), msg


def test_a_status_counts_only_from_the_coordinators_current_session() -> None:
    """[T-STATUS-2] a status written under another session (forged, or a previous
    coordinator's) is not believed; within the session the highest seq wins."""
    r = Registry()
    r.apply(*status(7, 5), now=0, retained=True)  # before the coordinator's state is known
    assert r.services["digits"].status is None
    r.apply(*coordinator(7), now=0, retained=True)
    assert r.services["digits"].status is not None
    assert r.services["digits"].status.seq == 5
    r.apply(*status(99, 100, "failed"), now=0, retained=False)  # a stranger's
    assert r.services["digits"].status.state == "ready"
    r.apply(*status(None, None, "failed"), now=0, retained=False)  # no session at all
    assert r.services["digits"].status.state == "ready"
    r.apply(*status(7, 4, "failed"), now=0, retained=False)  # replayed by a bridge
    assert r.services["digits"].status.seq == 5
    assert "is stale" in r.ignored[-1]
    r.apply(*status(7, 6, "degraded"), now=0, retained=False)
    assert r.services["digits"].status.state == "degraded"
    r.apply(*coordinator(8), now=0, retained=False)  # a new coordinator: its own, once sent
    assert r.services["digits"].status is None
    r.apply(*status(8, 1), now=0, retained=False)
    assert r.services["digits"].status.session == 8


def test_nodes_not_online_are_forgettable_after_a_while() -> None:
    r = Registry()
    r.apply(*state("gone", "online", 10), now=0, retained=False)
    r.apply(*state("gone", "lost", 10, by="will"), now=5, retained=False)
    r.apply(*state("here", "online", 10), now=0, retained=False)
    r.apply(*beat("spoofed", 10), now=1, retained=True)  # caps or a beat, never a state
    assert [n.id for n in r.forgettable(now=50, after=100)] == []
    assert sorted(n.id for n in r.forgettable(now=106, after=100)) == ["gone", "spoofed"]
