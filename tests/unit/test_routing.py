"""Which replica answers a request, witnesses, and where the answer goes (no broker)."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import pytest

from mqinfer.protocol.replies import request_id, result_topic
from mqinfer.protocol.routing import Witness, Witnessed, owner, request_key
from mqinfer.protocol.topics import Topics

T = Topics()
REQUEST = T.service_request("digits")
KEYS = [request_key(REQUEST, f"img-{i}".encode(), None, None) for i in range(3000)]


def entry(key: str, own: str | None, deadline: float = 100.0, size: int = 10) -> Witnessed[str]:
    return Witnessed(key=key, owner=own, deadline=deadline, item=f"item-{key}", size=size)


# ---- request_key ----------------------------------------------------------------------


def test_request_key_is_24_hex_digits_and_stable() -> None:
    key = request_key(REQUEST, b"abc", b"c1", "reply/here")
    assert len(key) == 24 and int(key, 16) >= 0
    assert key == request_key(REQUEST, b"abc", b"c1", "reply/here")


def test_request_key_depends_on_every_part() -> None:
    base = request_key(REQUEST, b"abc", b"c1", "reply/here")
    variants = [
        request_key(T.service_request("digits", "r1"), b"abc", b"c1", "reply/here"),
        request_key(REQUEST, b"abd", b"c1", "reply/here"),
        request_key(REQUEST, b"abc", b"c2", "reply/here"),
        request_key(REQUEST, b"abc", None, "reply/here"),
        request_key(REQUEST, b"abc", b"c1", "reply/there"),
        request_key(REQUEST, b"abc", b"c1", None),
    ]
    assert base not in variants
    assert len(set(variants)) == len(variants)


# ---- owner ------------------------------------------------------------------------------


def test_every_replica_picks_the_same_owner_whatever_the_order() -> None:
    """[T-SERVE-1] the owner is a function of the key and the ready set, not its order."""
    nodes = ["n1", "n2", "n3", "edge-4", "edge-5"]
    rng = random.Random(7)
    for key in KEYS[:500]:
        expected = owner(key, nodes)
        assert expected in nodes
        for _ in range(3):
            shuffled = nodes[:]
            rng.shuffle(shuffled)
            assert owner(key, shuffled) == expected
            assert owner(key, tuple(shuffled)) == expected


def test_no_ready_replica_no_owner() -> None:
    assert owner(KEYS[0], []) is None
    assert owner(KEYS[0], ["only"]) == "only"


def test_removing_a_non_owner_never_moves_a_request() -> None:
    nodes = ["n1", "n2", "n3", "n4"]
    moved_when_owner_left = 0
    for key in KEYS:
        before = owner(key, nodes)
        for gone in nodes:
            rest = [n for n in nodes if n != gone]
            after = owner(key, rest)
            if gone != before:
                assert after == before, (key, gone)
            else:
                assert after in rest
                moved_when_owner_left += 1
    assert moved_when_owner_left == len(KEYS)


@pytest.mark.parametrize(
    ("nodes", "low", "high"),
    [(["n1", "n2"], 0.40, 0.60), (["n1", "n2", "n3"], 0.25, 0.42)],
)
def test_load_spreads_evenly(nodes: list[str], low: float, high: float) -> None:
    counts = Counter(owner(key, nodes) for key in KEYS)
    assert set(counts) == set(nodes)
    for node in nodes:
        assert low <= counts[node] / len(KEYS) <= high, counts


# ---- Witness ----------------------------------------------------------------------------


def test_done_removes_one_entry_per_key_listed() -> None:
    w: Witness[str] = Witness()
    a, b = KEYS[0], KEYS[1]
    w.add(entry(a, "n1"))
    w.add(entry(a, "n1"))  # two identical requests in flight
    w.add(entry(b, "n1"))
    assert len(w) == 3
    w.done([a])
    assert len(w) == 2
    w.done([a, "unknown-key"])
    assert len(w) == 1
    w.done([a])  # nothing left under that key
    assert len(w) == 1
    w.done([b])
    assert len(w) == 0
    assert w.reassign([], [], "n2") == []  # nothing left behind


def test_expire_drops_entries_past_their_deadline() -> None:
    w: Witness[str] = Witness()
    w.add(entry(KEYS[0], "n1", deadline=5.0, size=3))
    w.add(entry(KEYS[0], "n1", deadline=9.0, size=4))
    w.add(entry(KEYS[1], "n1", deadline=5.0, size=5))
    assert w.expire(4.9) == []
    gone = w.expire(5.0)
    assert sorted((e.key, e.deadline) for e in gone) == sorted([(KEYS[0], 5.0), (KEYS[1], 5.0)])
    assert len(w) == 1
    # What is left is the later entry of the first key: a done for it empties the witness.
    w.done([KEYS[0]])
    assert len(w) == 0
    assert w.expire(100.0) == []


def test_bounded_by_count_oldest_first() -> None:
    w: Witness[str] = Witness(max_items=3)
    for key in KEYS[:5]:
        w.add(entry(key, "n1"))
    assert len(w) == 3
    assert w.evicted == 2
    gone = w.expire(1e9)
    assert sorted(e.key for e in gone) == sorted(KEYS[2:5])


def test_bounded_by_bytes_oldest_first() -> None:
    w: Witness[str] = Witness(max_bytes=100)
    w.add(entry(KEYS[0], "n1", size=40))
    w.add(entry(KEYS[1], "n1", size=40))
    assert w.evicted == 0
    w.add(entry(KEYS[2], "n1", size=40))
    assert (len(w), w.evicted) == (2, 1)
    w.add(entry(KEYS[3], "n1", size=100))  # alone it fills the budget
    assert (len(w), w.evicted) == (1, 3)
    assert [e.key for e in w.expire(1e9)] == [KEYS[3]]


def test_eviction_takes_the_oldest_entry_even_with_duplicate_keys() -> None:
    w: Witness[str] = Witness(max_items=2)
    w.add(entry(KEYS[0], "n1", deadline=10.0))  # oldest
    w.add(entry(KEYS[1], "n1", deadline=11.0))
    w.add(entry(KEYS[0], "n1", deadline=12.0))  # the same request again, later
    w.add(entry(KEYS[2], "n1", deadline=13.0))
    assert w.evicted == 2
    assert sorted(e.deadline for e in w.expire(1e9)) == [12.0, 13.0]


@dataclass
class Replica:
    """One serving replica: owns some requests, witnesses the rest."""

    me: str
    ready: list[str]
    witness: Witness[int] = field(default_factory=Witness)
    served: list[str] = field(default_factory=list)

    def on_request(self, key: str, n: int) -> None:
        own = owner(key, self.ready)
        if own == self.me:
            self.served.append(key)
        else:
            self.witness.add(Witnessed(key, own, deadline=1e9, item=n, size=1))

    def on_status(self, ready: list[str], listed: list[str]) -> list[str]:
        self.ready = ready
        mine = self.witness.reassign(ready, listed, self.me)
        self.served += [e.key for e in mine]
        return [e.key for e in mine]


def test_orphans_of_a_lost_owner_are_served_by_exactly_one_survivor() -> None:
    """[T-SERVE-2] when a status drops the owner, every witness recomputes the owner among
    the replicas still ready, and exactly that one serves the request."""
    nodes = ["n1", "n2", "n3"]
    replicas = {n: Replica(n, nodes) for n in nodes}
    keys = KEYS[:200]
    for i, key in enumerate(keys):
        for r in replicas.values():
            r.on_request(key, i)
    owned = {n: {k for k in keys if owner(k, nodes) == n} for n in nodes}
    assert all(owned[n] for n in nodes)
    for n in nodes:
        assert set(replicas[n].served) == owned[n]
        assert len(replicas[n].witness) == 200 - len(owned[n])

    survivors = ["n2", "n3"]  # n1 was lost: the next status lists only these
    taken = {n: replicas[n].on_status(survivors, survivors) for n in survivors}
    assert set(taken["n2"]).isdisjoint(taken["n3"])
    assert set(taken["n2"]) | set(taken["n3"]) == owned["n1"]
    assert len(taken["n2"]) + len(taken["n3"]) == len(owned["n1"])
    for n in survivors:
        assert all(owner(k, survivors) == n for k in taken[n])
        assert not set(taken[n]) & (owned["n2"] | owned["n3"])
    # Each survivor still witnesses what the other one owns, orphans included.
    assert len(replicas["n2"].witness) == len(owned["n3"]) + len(taken["n3"])
    assert len(replicas["n3"].witness) == len(owned["n2"]) + len(taken["n2"])
    # The owners' done notices empty the witnesses.
    replicas["n2"].witness.done(replicas["n3"].served)
    replicas["n3"].witness.done(replicas["n2"].served)
    assert len(replicas["n2"].witness) == len(replicas["n3"].witness) == 0


def test_an_owner_listed_but_not_ready_keeps_its_requests() -> None:
    w: Witness[str] = Witness()
    keys = KEYS[:50]
    for key in keys:
        w.add(entry(key, "n1"))
    # n1 is being redeployed: listed, no longer ready.
    assert w.reassign(["n2", "n3"], ["n1", "n2", "n3"], "n2") == []
    assert len(w) == 50
    # It answers what it had queued: its done notices still clear the witness.
    w.done(keys)
    assert len(w) == 0


def test_entries_without_an_owner_are_dropped_on_reassign() -> None:
    w: Witness[str] = Witness()
    w.add(entry(KEYS[0], None))
    w.add(entry(KEYS[1], "n3"))
    assert w.reassign(["n2", "n3"], ["n2", "n3"], "n2") == []
    assert len(w) == 1
    assert [e.key for e in w.expire(1e9)] == [KEYS[1]]


def test_with_no_ready_replica_a_listed_one_takes_the_orphan() -> None:
    listed = ["n2", "n3"]  # both deploying: it will answer 'unavailable'
    keys = KEYS[:100]
    taken: dict[str, list[str]] = {}
    for me in listed:
        w: Witness[str] = Witness()
        for key in keys:
            w.add(entry(key, "n1"))
        taken[me] = [e.key for e in w.reassign([], listed, me)]
        assert len(w) == len(keys) - len(taken[me])
    assert set(taken["n2"]).isdisjoint(taken["n3"])
    assert set(taken["n2"]) | set(taken["n3"]) == set(keys)
    assert taken["n2"] and taken["n3"]


def test_reassign_to_another_survivor_keeps_the_entry_under_its_new_owner() -> None:
    w: Witness[str] = Witness()
    key = next(k for k in KEYS if owner(k, ["n2", "n3"]) == "n3")
    w.add(entry(key, "n1"))
    assert w.reassign(["n2", "n3"], ["n2", "n3"], "n2") == []
    # n3 is the owner now: dropping n3 too hands it to n2.
    [mine] = w.reassign(["n2"], ["n2"], "n2")
    assert (mine.key, mine.owner) == (key, "n2")
    assert len(w) == 0


# ---- replies ----------------------------------------------------------------------------


def test_request_id_precedence() -> None:
    """[T-REQ-2] topic id, then a correlation data that is a valid id, then the body's id,
    then the first 16 hex digits of the key."""
    key = KEYS[0]
    with_id = T.parse(T.service_request("digits", "from-topic"))
    plain = T.parse(REQUEST)
    assert request_id(with_id, b"from-corr", "from-body", key) == "from-topic"
    assert request_id(plain, b"from-corr", "from-body", key) == "from-corr"
    assert request_id(plain, None, "from-body", key) == "from-body"
    assert request_id(plain, None, None, key) == key[:16]
    assert request_id(plain, b"", None, key) == key[:16]


@pytest.mark.parametrize(
    "correlation",
    [b"\xff\xfe not utf-8", b"has space", b"a/b", b"-leading-dash", b"x" * 65],
)
def test_request_id_skips_correlation_that_is_not_a_valid_id(correlation: bytes) -> None:
    key = KEYS[1]
    plain = T.parse(REQUEST)
    assert request_id(plain, correlation, "from-body", key) == "from-body"
    assert request_id(plain, correlation, None, key) == key[:16]


def test_result_topic() -> None:
    """[T-SERVE-3] the response topic wins; else result/{id} when the request topic had an
    id; else result."""
    with_id = T.parse(T.service_request("digits", "r1"))
    plain = T.parse(REQUEST)
    assert result_topic(T, "digits", with_id, "my/inbox") == "my/inbox"
    assert result_topic(T, "digits", plain, "my/inbox") == "my/inbox"
    assert result_topic(T, "digits", with_id, None) == "mqinfer/services/digits/result/r1"
    assert result_topic(T, "digits", plain, None) == "mqinfer/services/digits/result"
    assert result_topic(T, "digits", plain, "") == "mqinfer/services/digits/result"


# ---- weighted routing ---------------------------------------------------------------------


def test_weights_give_each_replica_its_share_of_the_requests() -> None:
    """[T-SERVE-5] weighted rendezvous: shares follow the weights, and every replica
    computes the same owner."""
    weights = {"fast": 4.0, "slow": 1.0}
    keys = [request_key("t", str(i).encode(), None, None) for i in range(20_000)]
    counts = Counter(owner(k, ["fast", "slow"], weights) for k in keys)
    assert 0.77 < counts["fast"] / len(keys) < 0.83  # 4 / (4 + 1) = 0.8
    assert [owner(k, ["slow", "fast"], weights) for k in keys[:500]] == [
        owner(k, ["fast", "slow"], weights) for k in keys[:500]
    ]


def test_equal_weights_route_exactly_as_no_weights() -> None:
    keys = [request_key("t", str(i).encode(), None, None) for i in range(2000)]
    nodes = ["a", "b", "c"]
    assert [owner(k, nodes, {"a": 7.0, "b": 7.0, "c": 7.0}) for k in keys] == [
        owner(k, nodes) for k in keys
    ]


def test_a_weight_change_moves_only_requests_towards_the_node_that_gained() -> None:
    """Raising one node's weight only moves requests to it, never between the others."""
    keys = [request_key("t", str(i).encode(), None, None) for i in range(5000)]
    nodes = ["a", "b", "c"]
    before = {k: owner(k, nodes, {"a": 1.0, "b": 1.0, "c": 1.0}) for k in keys}
    after = {k: owner(k, nodes, {"a": 3.0, "b": 1.0, "c": 1.0}) for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(after[k] == "a" for k in moved)
