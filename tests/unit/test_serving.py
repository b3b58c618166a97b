"""Replicas of one service deciding among themselves who answers, with the real digits
model and no broker: the test plays the broker, delivering the same statuses, requests
and done notices to each replica and collecting what they publish."""

from __future__ import annotations

import time
from pathlib import Path

import orjson

from mqinfer.mqtt import Message, Outgoing
from mqinfer.node.runtimes import available_backends
from mqinfer.node.serving import Replica
from mqinfer.protocol import messages as m
from mqinfer.protocol.routing import owner, request_key
from mqinfer.protocol.topics import Kind, Topics
from mqinfer.servicefile import read_model

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "models" / "digits" / "digits_int8.tflite"
T = Topics()


class Bus:
    """What the replicas published, in order."""

    def __init__(self) -> None:
        self.sent: list[Outgoing] = []

    def send(self, messages: list[Outgoing]) -> None:
        self.sent.extend(messages)

    def results(self) -> list[dict[str, object]]:
        return [orjson.loads(o.payload) for o in self.sent if "/result" in o.topic]

    def dones(self) -> list[m.Done]:
        return [
            m.Done.model_validate_json(o.payload) for o in self.sent if o.topic.endswith("done")
        ]


def replica(node: str, bus: Bus, deadline_ms: int = 10_000) -> Replica:
    model = read_model(MODEL)
    spec = m.ServiceSpec(
        name="d",
        model=MODEL.name,
        artifact=model.sha256,
        format="tflite",
        size=len(model.data),
        deadline_ms=deadline_ms,
        manifest=model.manifest,
    )
    r = Replica(
        node_id=node,
        spec=spec,
        path=MODEL,
        backend=available_backends()["tflite"],
        topics=T,
        send=bus.send,
    )
    r.load()
    r.start()
    return r


def status(*ready: str, listed: tuple[str, ...] = ()) -> m.ServiceStatus:
    replicas = [m.ReplicaStatus(node=n, state="ready") for n in ready]
    replicas += [m.ReplicaStatus(node=n, state="deploying") for n in listed]
    return m.ServiceStatus(name="d", state="ready", replicas=replicas)


def request(i: int) -> tuple[Message, str]:
    topic = T.service_request("d", f"q{i}")
    payload = bytes([i % 256]) * 64  # raw int8 [1,8,8,1]
    return Message(topic, payload, 1, False), request_key(topic, payload, None, None)


def deliver(replicas: list[Replica], msg: Message) -> None:
    ref = T.parse(msg.topic)
    assert ref.kind is Kind.SERVICE_REQUEST
    for r in replicas:
        r.on_request(ref, msg)


def wait_for_results(bus: Bus, count: int) -> None:
    deadline = time.monotonic() + 10
    while len(bus.results()) < count:
        assert time.monotonic() < deadline, f"{len(bus.results())} of {count} results"
        time.sleep(0.01)


def test_each_request_is_answered_once_by_its_owner() -> None:
    """[T-SERVE-1] two replicas fed the same requests answer each exactly once, the owner."""
    bus = Bus()
    reps = [replica("n1", bus), replica("n2", bus)]
    try:
        for r in reps:
            r.on_status(status("n1", "n2"))
        keys = {}
        for i in range(40):
            msg, key = request(i)
            keys[f"q{i}"] = key
            deliver(reps, msg)
        wait_for_results(bus, 40)
        time.sleep(0.1)
        results = bus.results()
        assert sorted(r["request_id"] for r in results) == sorted(keys)
        for r in results:
            assert r["ok"] and r["node"] == owner(keys[str(r["request_id"])], ["n1", "n2"])
        assert {r["node"] for r in results} == {"n1", "n2"}
        assert len([k for d in bus.dones() for k in d.keys]) == 40
    finally:
        for r in reps:
            r.stop()


def test_a_lost_owners_requests_are_served_by_a_witness() -> None:
    """[T-SERVE-2] n1 receives nothing (it died); when the status drops it, n2 answers
    what n1 owned, and does not answer twice what n1 had answered before it died."""
    bus = Bus()
    n1, n2 = replica("n1", bus), replica("n2", bus)
    try:
        for r in (n1, n2):
            r.on_status(status("n1", "n2"))
        owned_by_n1 = []
        for i in range(40):
            msg, key = request(i)
            if i < 20:
                deliver([n1, n2], msg)  # both alive
            else:
                deliver([n2], msg)  # n1 is dead: it never reads these
                if owner(key, ["n1", "n2"]) == "n1":
                    owned_by_n1.append(f"q{i}")
        wait_for_results(bus, 40 - len(owned_by_n1))
        before = len(bus.results())
        n2.on_status(status("n2"))  # n1's Will: the coordinator drops it
        # n1's done notices arrive after that status (amqtt does not keep the order of
        # messages from different clients): they still count, within ORPHAN_SETTLE
        for done in bus.dones():
            n2.on_done(done)
        n2.tick(time.monotonic() + 1)
        wait_for_results(bus, before + len(owned_by_n1))
        time.sleep(0.1)
        late = bus.results()[before:]
        assert sorted(r["request_id"] for r in late) == sorted(owned_by_n1)
        assert all(r["node"] == "n2" and r["ok"] for r in late)
        assert len({r["request_id"] for r in bus.results()}) == len(bus.results()) == 40
    finally:
        n1.stop()
        n2.stop()


def test_an_owner_that_never_answers_gets_a_timeout_from_its_successor() -> None:
    """[T-SERVE-2] n1 stays listed but never answers (stuck): after the deadline and the
    grace period, exactly one witness answers each of its requests with 'timeout'."""
    bus = Bus()
    n2, n3 = replica("n2", bus, deadline_ms=100), replica("n3", bus, deadline_ms=100)
    try:
        for r in (n2, n3):
            r.on_status(status("n1", "n2", "n3"))
        stuck = []
        for i in range(30):
            msg, key = request(i)
            deliver([n2, n3], msg)
            if owner(key, ["n1", "n2", "n3"]) == "n1":
                stuck.append(f"q{i}")
        answered = 30 - len(stuck)
        wait_for_results(bus, answered)
        for done in bus.dones():
            for r in (n2, n3):
                r.on_done(done)
        later = time.monotonic() + 2.5  # deadline 0.1 s + grace 2 s
        for r in (n2, n3):
            r.tick(later)
        timeouts = [r for r in bus.results() if not r["ok"]]
        assert sorted(r["request_id"] for r in timeouts) == sorted(stuck)
        assert {r["error"]["code"] for r in timeouts} == {"timeout"}  # type: ignore[index]
        assert all("no answer from n1" in r["error"]["message"] for r in timeouts)  # type: ignore[index]
    finally:
        n2.stop()
        n3.stop()


def test_a_result_seen_on_the_result_topic_counts_as_done() -> None:
    """[T-SERVE-2] the lost owner's last result reached the requester but its done notice
    did not: the result itself, seen on the result topic, stops a second answer."""
    bus = Bus()
    n2 = replica("n2", bus)
    try:
        n2.on_status(status("n1", "n2"))
        owned = []
        for i in range(30):
            msg, key = request(i)
            deliver([n2], msg)
            if owner(key, ["n1", "n2"]) == "n1":
                owned.append(i)
        wait_for_results(bus, 30 - len(owned))
        answered = owned[0]  # n1 answered this one before it died
        result = Message(T.service_result("d", f"q{answered}"), b'{"ok":true}', 1, False)
        n2.on_result(T.parse(result.topic), result)
        before = len(bus.results())
        n2.on_status(status("n2"))
        n2.tick(time.monotonic() + 1)
        wait_for_results(bus, before + len(owned) - 1)
        time.sleep(0.1)
        again = {r["request_id"] for r in bus.results()[before:]}
        assert again == {f"q{i}" for i in owned[1:]}
    finally:
        n2.stop()


def test_an_idle_replica_of_a_fast_model_answers_on_the_receiving_thread() -> None:
    """The digits model runs in microseconds: an idle replica answers before on_request
    returns (no thread handoff). Once it measures slow, requests are still answered (by
    the workers)."""
    bus = Bus()
    r = replica("n1", bus)
    try:
        r.on_status(status("n1"))
        assert r.inference_ms is not None and r.inference_ms < 1.0
        msg, _ = request(1)
        deliver([r], msg)
        [result] = bus.results()  # already there: served inline
        assert result["ok"] and result["request_id"] == "q1"
        r.inference_ms = 50.0  # as a slow model measures
        msg, _ = request(2)
        deliver([r], msg)
        wait_for_results(bus, 2)
        assert [x["request_id"] for x in bus.results()] == ["q1", "q2"]
        assert r.served == 2
    finally:
        r.stop()
