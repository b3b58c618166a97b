"""The dispatcher's rules, with the test as the nodes and the clock (no broker)."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import replace

import orjson
import pytest

from mqinfer.coordinator.dispatch import (
    ERROR_REPEAT_S,
    LEASE_MIN_MS,
    REPEAT_S,
    Ack,
    Action,
    Dispatcher,
    Incoming,
    ReadyReplica,
    Reply,
    SendWork,
)
from mqinfer.protocol import messages as m
from mqinfer.protocol import work as w

SHA = hashlib.sha256(b"model").hexdigest()


def spec(name: str = "svc", **kw: object) -> m.ServiceSpec:
    fields: dict[str, object] = {
        "name": name,
        "model": "m.tflite",
        "artifact": SHA,
        "format": "tflite",
        **kw,
    }
    return m.ServiceSpec.model_validate(fields)


def request(rid: str, service: str = "svc", mid: int = 0, size: int = 10) -> Incoming:
    return Incoming(
        service=service,
        payload=b"x" * size,
        reply=f"p/services/{service}/result/{rid}",
        correlation=rid.encode(),
        request_id=rid,
        id_fixed=True,
        mid=mid,
    )


class Nodes:
    """What the nodes received, and their answers."""

    def __init__(self, d: Dispatcher) -> None:
        self.d = d
        self.work: list[tuple[str, w.Work, bytes]] = []
        self.replies: list[Reply] = []
        self.acks: list[int] = []

    def take(self, actions: list[Action]) -> list[tuple[str, w.Work, bytes]]:
        new = []
        for a in actions:
            if isinstance(a, SendWork):
                work, body = w.decode_work(a.payload)
                new.append((a.node, work, body))
            elif isinstance(a, Reply):
                self.replies.append(a)
            elif isinstance(a, Ack):
                self.acks.append(a.mid)
        self.work += new
        return new

    def answer(
        self, node: str, work: w.Work, now: float, kind: str = "result", body: bytes = b""
    ) -> list[tuple[str, w.Work, bytes]]:
        payload = body or orjson.dumps({"request_id": work.request_id, "node": node})
        answer = w.Answer(job=work.job, kind=kind, node_ms=1.0)  # type: ignore[arg-type]
        return self.take(self.d.on_answer(node, answer, payload, now))

    def results(self) -> Counter[str]:
        return Counter(r.topic.rsplit("/", 1)[-1] for r in self.replies)


def dispatcher(*replicas: ReadyReplica, **kw: object) -> tuple[Dispatcher, Nodes]:
    d = Dispatcher("e1")
    d.open(0.0)
    d.set_spec("svc", spec(**kw), 0.0)
    d.set_ready("svc", list(replicas), 0.0)
    return d, Nodes(d)


def test_a_request_goes_to_one_replica_and_its_answer_to_the_requester() -> None:
    """[T-WORK-1] one copy of the request, to one node; [T-WORK-2] its answer, as the node
    wrote it, to the requester's topic with the correlation data, then the broker's
    acknowledgement of the request."""
    d, n = dispatcher(ReadyReplica("a", 1), ReadyReplica("b", 1))
    [(node, work, body)] = n.take(d.on_request(request("r1", mid=7), 0.0))
    assert body == b"x" * 10 and work.request_id == "r1" and work.kind == "request"
    assert LEASE_MIN_MS <= work.lease_ms <= 10_000
    actions = d.on_answer(node, w.Answer(job=work.job, kind="result"), b'{"ok":true}', 0.01)
    assert actions == [Reply("p/services/svc/result/r1", b'{"ok":true}', b"r1"), Ack(7)]
    # The same answer again, or one naming the job from another node: not forwarded.
    assert d.on_answer(node, w.Answer(job=work.job, kind="result"), b"again", 0.02) == []
    assert d.counters.fenced == 1


def test_an_answer_from_another_node_than_the_lease_is_fenced() -> None:
    """[T-WORK-3] a node cannot answer for work given to another."""
    d, n = dispatcher(ReadyReplica("a", 1), ReadyReplica("b", 1))
    [(node, work, _)] = n.take(d.on_request(request("r1"), 0.0))
    other = "b" if node == "a" else "a"
    assert d.on_answer(other, w.Answer(job=work.job, kind="result"), b"forged", 0.01) == []
    n.answer(node, work, 0.02)
    assert n.results() == Counter({"r1": 1})


def test_unknown_services_unready_services_and_oversized_requests_are_refused_at_once() -> None:
    d = Dispatcher("e1", max_request_bytes=100)
    d.open(0.0)
    n = Nodes(d)
    d.set_spec("svc", spec(), 0.0)
    d.set_spec("other", spec("other"), 0.0)
    d.set_ready("other", [ReadyReplica("a", 1)], 0.0)
    n.take(d.on_request(request("r1", service="nope", mid=1), 0.0))
    n.take(d.on_request(request("r2", mid=2), 0.0))
    n.take(d.on_request(request("r3", service="other", mid=3, size=101), 0.0))
    errors = [orjson.loads(r.payload)["error"] for r in n.replies]
    assert [e["code"] for e in errors] == ["unavailable", "unavailable", "too_large"]
    assert "no service named nope" in errors[0]["message"]
    assert "services: other, svc" in errors[0]["message"]
    assert "has no ready replica" in errors[1]["message"]
    assert n.acks == [1, 2, 3] and n.work == []


def test_each_replica_takes_its_workers_plus_a_prefetch_and_the_rest_waits() -> None:
    """[T-WORK-4] bounded work per replica; a full queue (3 per ready replica) answers
    busy."""
    d, n = dispatcher(ReadyReplica("a", 1, workers=1), ReadyReplica("b", 1, workers=2), queue=3)
    sent = [n.take(d.on_request(request(f"r{i}", mid=i + 1), 0.0)) for i in range(12)]
    given = [s[0] for s in sent if s]
    assert Counter(node for node, _, _ in given) == Counter({"a": 2, "b": 3})
    assert [r.topic.rsplit("/", 1)[-1] for r in n.replies] == ["r11"]  # 5 out, 6 wait
    assert orjson.loads(n.replies[0].payload)["error"]["code"] == "busy"
    # An answer frees a place: the oldest waiting request goes out at once.
    node, work, _ = given[0]
    [(to, nxt, _)] = n.answer(node, work, 0.01)
    assert to == node and nxt.request_id == "r5"


def test_work_goes_where_it_finishes_first_by_what_the_hub_measured() -> None:
    """[T-WORK-4] one request at a time: the replica the hub saw answer faster gets them;
    what a node says of itself does not count against what the hub measured."""
    d, n = dispatcher(
        ReadyReplica("fast", 1, reported_ms=50.0), ReadyReplica("liar", 1, reported_ms=0.001)
    )
    now = 0.0
    seen: Counter[str] = Counter()
    for i in range(40):
        [(node, work, _)] = n.take(d.on_request(request(f"r{i}"), now))
        seen[node] += 1
        now += 0.005 if node == "fast" else 0.200  # the liar is 40x slower
        n.answer(node, work, now)
    assert seen["fast"] >= 35, seen
    assert n.results() == Counter({f"r{i}": 1 for i in range(40)})


def test_an_expired_lease_goes_to_another_replica_and_the_late_answer_is_dropped() -> None:
    """[T-WORK-3] a stalled node's work is given to another only after its lease; its late
    answer is fenced; it gets no new work until it answers again."""
    d, n = dispatcher(ReadyReplica("a", 1), ReadyReplica("b", 1))
    [(first, work, _)] = n.take(d.on_request(request("r1", mid=1), 0.0))
    other = "b" if first == "a" else "a"
    assert n.take(d.tick(work.lease_ms / 1000 - 0.01)) == []  # not before the lease ends
    [(to, again, _)] = n.take(d.tick(work.lease_ms / 1000 + 0.01))
    assert to == other and again.request_id == "r1" and again.job != work.job
    # The stalled one gets nothing new meanwhile.
    [(to2, _, _)] = n.take(d.on_request(request("r2", mid=2), 3.0))
    assert to2 == other
    assert n.answer(first, work, 3.1) == []  # late: fenced, not forwarded
    n.answer(to, again, 3.2)
    assert n.results()["r1"] == 1 and n.acks.count(1) == 1
    # Having answered, it is trusted with work again.
    assert not d.slots["svc"].replicas[first].suspect


def test_a_node_whose_session_ends_gives_its_work_to_another_at_once() -> None:
    """[T-WORK-3] a replica that leaves (its node lost, restarted) loses its leases at
    once; what it answers afterwards does not count."""
    d, n = dispatcher(ReadyReplica("a", 1), ReadyReplica("b", 1))
    [(first, work, _)] = n.take(d.on_request(request("r1"), 0.0))
    other = "b" if first == "a" else "a"
    moved = n.take(d.set_ready("svc", [ReadyReplica(other, 1)], 0.1))  # its node is lost
    assert [(node, wk.request_id) for node, wk, _ in moved] == [(other, "r1")]
    d.set_ready("svc", [ReadyReplica(other, 1), ReadyReplica(first, 2)], 0.15)  # back, anew
    assert n.answer(first, work, 0.2) == []  # its old session's lease
    n.answer(other, moved[0][1], 0.3)
    assert n.results() == Counter({"r1": 1})


def test_a_request_nobody_answers_gets_one_timeout_at_its_deadline() -> None:
    d, n = dispatcher(ReadyReplica("a", 1), deadline_ms=3000)
    n.take(d.on_request(request("r1", mid=5), 0.0))
    for t in range(1, 80):
        n.take(d.tick(t * 0.1))
    [reply] = n.replies
    error = orjson.loads(reply.payload)["error"]
    assert error["code"] == "timeout" and "deadline of 3000 ms" in error["message"]
    assert n.acks == [5] and d.requests == {}


def test_released_work_goes_to_another_replica() -> None:
    d, n = dispatcher(ReadyReplica("a", 1, workers=1), ReadyReplica("b", 1, workers=1))
    [(first, work, _)] = n.take(d.on_request(request("r1"), 0.0))
    released = w.Answer(job=work.job, kind="released", code="busy", reason="queue full")
    [(to, again, _)] = n.take(d.on_answer(first, released, b"", 0.01))
    assert again.request_id == "r1"
    n.answer(to, again, 0.02)
    assert n.results() == Counter({"r1": 1})


def test_a_pipeline_passes_tensors_through_the_hub_to_one_replica_per_stage() -> None:
    """[T-PIPE-2] [T-PIPE-3] stage k's tensors come back to the hub and go to one replica of stage
    k+1, with the trace so far; the last stage's result goes to the requester."""
    d = Dispatcher("e1")
    d.open(0.0)
    n = Nodes(d)
    d.set_spec("pipe", spec("pipe", pipeline=None), 0.0)
    pipe = spec("pipe").model_copy(update={"pipeline": _pipeline()})
    d.set_spec("pipe", pipe, 0.0)
    n.take(d.on_request(request("r0", service="pipe", mid=9), 0.0))
    assert orjson.loads(n.replies[0].payload)["error"]["code"] == "unavailable"
    d.set_ready("pipe:0", [ReadyReplica("a", 1)], 0.0)
    d.set_ready("pipe:1", [ReadyReplica("b", 1), ReadyReplica("c", 1)], 0.0)
    [(node, work, _body)] = n.take(d.on_request(request("r1", service="pipe", mid=10), 0.1))
    assert (node, work.stage, work.kind) == ("a", 0, "request")
    trace = w.StageTrace(stage=0, node="a", queue_ms=0.1, inference_ms=2.0)
    answer = w.Answer(job=work.job, kind="tensors", trace=trace)
    [(node1, work1, body1)] = n.take(d.on_answer("a", answer, b"TENSORS", 0.2))
    assert node1 in ("b", "c") and (work1.stage, work1.kind) == (1, "tensors")
    assert body1 == b"TENSORS" and work1.trace == [trace]
    n.answer(node1, work1, 0.3)
    assert n.results() == Counter({"r0": 1, "r1": 1}) and sorted(n.acks) == [9, 10]


@pytest.mark.parametrize("seed", range(5))
def test_every_request_is_answered_exactly_once_whatever_happens(seed: int) -> None:
    """Random answers, stalls, releases and replicas coming and going: every accepted
    request gets exactly one reply and one acknowledgement."""
    import random

    rng = random.Random(seed)
    d, n = dispatcher(*(ReadyReplica(x, 1, workers=2) for x in "abc"), deadline_ms=2500)
    sessions = {x: 1 for x in "abc"}
    now = 0.0
    outstanding: list[tuple[str, w.Work]] = []
    for i in range(300):
        now += rng.uniform(0, 0.05)
        outstanding += [
            (nd, wk) for nd, wk, _ in n.take(d.on_request(request(f"r{i}", mid=i + 1), now))
        ]
        roll = rng.random()
        if outstanding and roll < 0.6:
            node, work = outstanding.pop(rng.randrange(len(outstanding)))
            kind = "released" if rng.random() < 0.1 else "result"
            outstanding += [(nd, wk) for nd, wk, _ in n.answer(node, work, now, kind=kind)]
        elif roll < 0.62:
            victim = rng.choice("abc")
            sessions[victim] += 1
            ready = [ReadyReplica(x, s, workers=2) for x, s in sessions.items()]
            outstanding += [(nd, wk) for nd, wk, _ in n.take(d.set_ready("svc", ready, now))]
        outstanding += [(nd, wk) for nd, wk, _ in n.take(d.tick(now))]
    for _ in range(100):  # everything still out is answered, or times out
        now += 0.1
        while outstanding:
            node, work = outstanding.pop()
            outstanding += [(nd, wk) for nd, wk, _ in n.answer(node, work, now)]
        outstanding += [(nd, wk) for nd, wk, _ in n.take(d.tick(now))]
    assert n.results() == Counter({f"r{i}": 1 for i in range(300)})
    assert sorted(n.acks) == list(range(1, 301))
    assert d.requests == {} and d.held == 0


def _pipeline() -> object:
    from mqinfer.protocol.manifest import Manifest, Pipeline, Segment, Verification

    def seg(i: int) -> Segment:
        man = Manifest(
            name=f"s{i}",
            format="tflite",
            file=f"s{i}.tflite",
            sha256=SHA,
            size=1,
            inputs=[],
            outputs=[],
        )
        return Segment(manifest=man, ops=(i, i + 1))

    return Pipeline(
        name="p",
        model="p.tflite",
        sha256=SHA,
        format="tflite",
        segments=[seg(0), seg(1)],
        verification=Verification(inputs=1, exact=True, max_abs_diff=0, tolerance=0),
    )


def test_requests_that_come_before_the_replicas_are_known_wait_for_them() -> None:
    """A coordinator that just took over reads the retained state first: requests that
    arrive meanwhile (the broker's redeliveries included) are held, not refused."""
    d = Dispatcher("e1")
    n = Nodes(d)
    assert n.take(d.on_request(request("r1", mid=1), 0.0)) == [] and n.replies == []
    d.set_spec("svc", spec(), 0.5)
    d.set_ready("svc", [ReadyReplica("a", 1)], 0.5)
    [(node, work, _)] = n.take(d.open(0.5))
    assert work.request_id == "r1" and work.age_ms == 500.0
    n.answer(node, work, 0.6)
    assert n.results() == Counter({"r1": 1}) and n.acks == [1]


def test_error_codes_a_node_makes_up_are_counted_as_other() -> None:
    """A node chooses the code of its error results: a hostile one must not grow the
    counts the hub keeps (and sends in every heartbeat) without bound."""
    from mqinfer.coordinator.dispatch import Counters

    counters = Counters()
    for i in range(100):
        counters.answer("svc", f"made-up-{i}")
    counters.answer("svc", "busy")
    assert counters.errors == {"other": 100, "busy": 1}
    assert counters.services["svc"].errors == {"other": 100, "busy": 1}


def test_a_repeat_of_a_request_is_not_served_twice() -> None:
    """[T-REQ-4] the same request again (same id, reply topic, correlation and bytes: a
    sender's QoS 1 retry after the broker restarted) is acknowledged without being served:
    while the first copy is served, its answer is the answer; after, the same result is
    sent again. A request that differs in its bytes is a new one."""
    d, n = dispatcher(ReadyReplica("a", 1))
    [(node, work, _)] = n.take(d.on_request(request("r1", mid=1), 0.0))
    assert n.take(d.on_request(request("r1", mid=2), 0.1)) == [] and n.acks == [2]
    n.answer(node, work, 0.2)
    assert n.results() == Counter({"r1": 1}) and n.acks == [2, 1]
    first = n.replies[-1]
    assert n.take(d.on_request(request("r1", mid=3), 0.3)) == []
    assert n.replies[-1] == first and n.acks == [2, 1, 3]
    assert d.counters.repeats == 2 and d.counters.accepted == 1
    # Other bytes under the same id: a new request, served.
    [(_, _, body)] = n.take(d.on_request(request("r1", mid=4, size=11), 0.4))
    assert body == b"x" * 11 and d.counters.accepted == 2


def test_a_sender_that_keeps_asking_keeps_getting_the_same_result() -> None:
    """[T-REQ-4] each repeat of an answered request keeps its result another REPEAT_S:
    a requester whose results a cluster holds back, asking again every 40 s, never gets
    the request served twice."""
    d, n = dispatcher(ReadyReplica("a", 1))
    [(node, work, _)] = n.take(d.on_request(request("r1", mid=1), 0.0))
    n.answer(node, work, 0.1)
    first = n.replies[-1]
    for k, at in enumerate((40.0, 80.0, 120.0), start=2):
        assert n.take(d.on_request(request("r1", mid=k), at)) == []
        assert n.replies[-1] == first
    assert d.counters.repeats == 3 and d.counters.accepted == 1
    assert len(n.take(d.on_request(request("r1", mid=9), 120.0 + REPEAT_S + 1))) == 1


def test_a_repeat_after_an_error_gets_the_error_for_a_while_then_is_served_anew() -> None:
    """[T-REQ-4] the same request soon after an error (here a timeout) is a second copy
    of it (a cluster delivering twice): it gets the error again, not a result as well.
    Later it is a new try, and so is the same request long after a result."""
    d, n = dispatcher(ReadyReplica("a", 1), deadline_ms=1000)
    n.take(d.on_request(request("r1", mid=1), 0.0))
    n.take(d.tick(5.0))  # the lease and the deadline ran out unanswered
    error = n.replies[-1]
    assert orjson.loads(error.payload)["error"]["code"] == "timeout"
    d.set_ready("svc", [ReadyReplica("a", 2)], 5.0)  # the node began a new session
    assert n.take(d.on_request(request("r1", mid=2), 5.1)) == []
    assert n.replies[-1] == error and n.acks[-1] == 2 and d.counters.repeats == 1
    later = 5.0 + ERROR_REPEAT_S + 0.1
    [(node, work, _)] = n.take(d.on_request(request("r1", mid=3), later))
    n.answer(node, work, later + 0.1)
    assert orjson.loads(n.replies[-1].payload)["node"] == "a"
    assert len(n.take(d.on_request(request("r1", mid=4), later + REPEAT_S + 1))) == 1
    assert d.counters.repeats == 1 and d.counters.accepted == 3


def test_a_refused_request_gets_the_same_refusal_again_not_a_result() -> None:
    """[T-REQ-4] a request refused while its service had no ready replica, delivered a
    second time once a replica is back (a NATS cluster did this when one of its servers
    died), is not served after its refusal; after ERROR_REPEAT_S it is a new try."""
    d, n = dispatcher()
    assert n.take(d.on_request(request("r1", mid=1), 0.0)) == []
    refusal = n.replies[-1]
    assert orjson.loads(refusal.payload)["error"]["code"] == "unavailable"
    d.set_ready("svc", [ReadyReplica("a", 1)], 0.2)
    assert n.take(d.on_request(request("r1", mid=2), 0.3)) == []
    assert n.replies[-1] == refusal and n.acks == [1, 2]
    [(node, work, _)] = n.take(d.on_request(request("r1", mid=3), ERROR_REPEAT_S + 0.1))
    n.answer(node, work, ERROR_REPEAT_S + 0.2)
    assert orjson.loads(n.replies[-1].payload)["node"] == "a"


def test_requests_without_an_id_of_their_own_are_never_repeats() -> None:
    """Identical frames sent to `request` (no id in the topic or correlation data) are
    each served."""
    d, n = dispatcher(ReadyReplica("a", 1))
    plain = Incoming("svc", b"frame", "p/services/svc/result", None, "k1", False, mid=1)
    [(node, work, _)] = n.take(d.on_request(plain, 0.0))
    n.answer(node, work, 0.1)
    assert len(n.take(d.on_request(replace(plain, mid=2), 0.2))) == 1
    assert d.counters.repeats == 0
