"""Pipeline stages with real split segments of the digits model and no broker: the test
plays the broker, carrying each stage's messages to the next and collecting answers."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest

from mqinfer.mqtt import Message, Outgoing
from mqinfer.node.runtimes import available_backends
from mqinfer.node.serving import Replica
from mqinfer.protocol import messages as m
from mqinfer.protocol import tensors
from mqinfer.protocol.manifest import Pipeline, TensorInfo
from mqinfer.protocol.routing import owner, request_key
from mqinfer.protocol.topics import Kind, Topics
from mqinfer.servicefile import read_model
from mqinfer.split import split_model
from tests.unit import test_serving as serving_tests

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "models" / "digits" / "digits_int8.tflite"
T = Topics()


class Bus(serving_tests.Bus):
    def on(self, topic: str) -> list[Outgoing]:
        return [o for o in self.sent if o.topic == topic]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> tuple[Pipeline, Path]:
    out = tmp_path_factory.mktemp("split")
    return split_model(MODEL, 2, out), out


def stage(
    node: str, k: int, bus: Bus, pipeline: tuple[Pipeline, Path], deadline_ms: int = 10_000
) -> Replica:
    pipe, out = pipeline
    whole = read_model(MODEL)
    spec = m.ServiceSpec(
        name="p",
        model=MODEL.name,
        artifact=whole.sha256,
        format="tflite",
        size=len(whole.data),
        deadline_ms=deadline_ms,
        manifest=whole.manifest,
        pipeline=pipe,
    )
    r = Replica(
        node_id=node,
        spec=spec,
        path=out / pipe.segments[k].manifest.file,
        backend=available_backends()["tflite"],
        topics=T,
        send=bus.send,
        stage=k,
    )
    r.load()
    r.start()
    return r


def status(*placed: tuple[str, int]) -> m.ServiceStatus:
    replicas = [m.ReplicaStatus(node=n, state="ready", stage=k) for n, k in placed]
    return m.ServiceStatus(name="p", state="ready", replicas=replicas, stages=2)


def request(i: int) -> Message:
    return Message(T.service_request("p", f"q{i}"), bytes([i % 256]) * 64, 1, False)


def wait(predicate: object, what: str) -> None:
    deadline = time.monotonic() + 10
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


@pytest.fixture
def bus() -> Iterator[Bus]:
    yield Bus()


def test_a_stage_message_is_run_by_exactly_one_replica_of_that_stage(
    bus: Bus, pipeline: tuple[Pipeline, Path]
) -> None:
    """[T-PIPE-3] two replicas of stage 1 see every message on its topic; the owner of
    each message's key runs it, the other ignores it; stage 0's outputs chained through
    stage 1 equal the whole model."""
    head = stage("a", 0, bus, pipeline)
    s1 = [stage("b", 1, bus, pipeline), stage("c", 1, bus, pipeline)]
    reps = [head, *s1]
    try:
        st = status(("a", 0), ("b", 1), ("c", 1))
        for r in reps:
            r.on_status(st)
        for i in range(30):
            msg = request(i)
            head.on_request(T.parse(msg.topic), msg)
        topic = T.service_stage("p", 1)
        wait(lambda: len(bus.on(topic)) == 30, "30 stage messages")
        owners = {}
        for o in bus.on(topic):
            msg = Message(o.topic, o.payload, 1, False)
            owners[tensors.decode(o.payload).request_id] = owner(
                request_key(o.topic, o.payload, None, None), ["b", "c"]
            )
            for r in s1:
                assert T.parse(o.topic).kind is Kind.SERVICE_STAGE
                r.on_stage(T.parse(o.topic), msg)
        wait(lambda: len(bus.results()) == 30, "30 results")
        time.sleep(0.1)
        results = bus.results()
        assert len(results) == 30
        assert {str(r["request_id"]): r["node"] for r in results} == owners
        assert set(owners.values()) == {"b", "c"}
        from ai_edge_litert.interpreter import Interpreter

        it = Interpreter(model_path=str(MODEL))
        it.allocate_tensors()
        for r in results:
            i = int(str(r["request_id"])[1:])
            x = np.frombuffer(bytes([i % 256]) * 64, np.int8).reshape(1, 8, 8, 1)
            it.set_tensor(it.get_input_details()[0]["index"], x)
            it.invoke()
            want = it.get_tensor(it.get_output_details()[0]["index"])
            assert r["outputs"][0]["values"] == want.tolist()  # type: ignore[index]
    finally:
        for r in reps:
            r.stop()


def test_the_head_answers_timeout_for_what_the_pipeline_never_finished(
    bus: Bus, pipeline: tuple[Pipeline, Path]
) -> None:
    """[T-PIPE-4] stage 1 died with the requests: after the deadline and the grace
    period the head answers each 'timeout', once, and nothing for those that finished."""
    head = stage("a", 0, bus, pipeline, deadline_ms=100)
    try:
        head.on_status(status(("a", 0), ("b", 1)))
        for i in range(6):
            msg = request(i)
            head.on_request(T.parse(msg.topic), msg)
        wait(lambda: len(bus.on(T.service_stage("p", 1))) == 6, "6 stage messages")
        finished = tensors.decode(bus.on(T.service_stage("p", 1))[0].payload)
        head.on_done(m.Done(node="b", keys=[finished.key], stage=1))
        head.tick(time.monotonic() + 1.0)
        assert bus.results() == []  # not yet: the grace period is 2 s
        head.tick(time.monotonic() + 2.5)
        head.tick(time.monotonic() + 3.0)
        results = bus.results()
        unfinished = {f"q{i}" for i in range(6)} - {finished.request_id}
        assert sorted(str(r["request_id"]) for r in results) == sorted(unfinished)
        assert {r["error"]["code"] for r in results} == {"timeout"}  # type: ignore[index]
        assert all("pipeline did not finish" in r["error"]["message"] for r in results)  # type: ignore[index]
    finally:
        head.stop()


def test_the_head_answers_unavailable_while_a_later_stage_has_no_ready_replica(
    bus: Bus, pipeline: tuple[Pipeline, Path]
) -> None:
    """[T-PIPE-4] stage 1's node was lost and is being placed again: stage 0 does not
    pass requests into the void."""
    head = stage("a", 0, bus, pipeline)
    try:
        head.on_status(
            m.ServiceStatus(
                name="p",
                state="deploying",
                stages=2,
                replicas=[
                    m.ReplicaStatus(node="a", state="ready", stage=0),
                    m.ReplicaStatus(node="c", state="deploying", stage=1),
                ],
            )
        )
        msg = request(1)
        head.on_request(T.parse(msg.topic), msg)
        wait(lambda: bus.results(), "an answer")
        [result] = bus.results()
        assert result["error"]["code"] == "unavailable"  # type: ignore[index]
        assert "stage(s) 1" in result["error"]["message"]  # type: ignore[index]
        assert bus.on(T.service_stage("p", 1)) == []
    finally:
        head.stop()


def test_a_later_stage_refuses_tensors_it_cannot_take_on_their_route(
    bus: Bus, pipeline: tuple[Pipeline, Path]
) -> None:
    """[T-PIPE-5] wrong tensors: 'bad_tensor' on the header's reply topic, with the
    correlation data; garbage: on the service's result topic. The stage runs on."""
    s1 = stage("b", 1, bus, pipeline)
    try:
        s1.on_status(status(("a", 0), ("b", 1)))
        topic = T.service_stage("p", 1)
        garbage = Message(topic, b"\x00" * 40, 1, False)
        s1.on_stage(T.parse(topic), garbage)
        [bad] = bus.results()
        assert bad["error"]["code"] == "bad_tensor"  # type: ignore[index]
        assert bus.sent[-1].topic == T.service_result("p")
        info = TensorInfo(name="nope", dtype="int8", shape=[1, 10])
        wrong = tensors.StageMessage(
            request_id="w1",
            key="k" * 24,
            reply="mine/reply",
            correlation=b"c1",
            deadline_ms=1000,
            tensors=[(info, np.zeros((1, 10), np.int8))],
        )
        s1.on_stage(T.parse(topic), Message(topic, tensors.encode(wrong), 1, False))
        wait(lambda: bus.on("mine/reply"), "the error on the reply topic")
        [answer] = bus.on("mine/reply")
        assert answer.correlation == b"c1"
        body = orjson.loads(answer.payload)
        assert (
            body["error"]["code"] == "bad_tensor" and "no tensor named" in body["error"]["message"]
        )
    finally:
        s1.stop()
