"""A node's replica doing the hub's work, with the real digits model and no broker: the
test plays the hub, handing work to the node's intake and reading its answers."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from mqinfer.mqtt import Connection, Message
from mqinfer.node.intake import Intake
from mqinfer.node.replica import INLINE_MS, Replica
from mqinfer.node.runtimes import available_backends
from mqinfer.protocol import messages as m
from mqinfer.protocol import work as w
from mqinfer.protocol.topics import Topics
from mqinfer.servicefile import read_model

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "models" / "digits" / "digits_int8.tflite"
T = Topics()


class Hub:
    """Takes what the node publishes (as its connection would)."""

    def __init__(self) -> None:
        self.answers: list[tuple[w.Answer, bytes]] = []
        self.lock = threading.Lock()
        self.session = 1

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        assert topic == T.node_answer("n1")
        with self.lock:
            self.answers.append(w.decode_answer(payload))

    def connection(self) -> tuple[Connection | None, int]:
        return self, self.session  # type: ignore[return-value]

    def wait(self, count: int) -> list[tuple[w.Answer, bytes]]:
        deadline = time.monotonic() + 10
        while True:
            with self.lock:
                if len(self.answers) >= count:
                    return list(self.answers)
            assert time.monotonic() < deadline, f"{len(self.answers)} of {count} answers"
            time.sleep(0.005)


def spec(**kw: object) -> m.ServiceSpec:
    model = read_model(MODEL)
    return m.ServiceSpec(
        name="d",
        model=MODEL.name,
        artifact=model.sha256,
        format="tflite",
        size=len(model.data),
        manifest=model.manifest,
        **kw,  # type: ignore[arg-type]
    )


def node(hub: Hub, **kw: object) -> tuple[Intake, Replica]:
    replicas: dict[str, Replica] = {}
    intake = Intake("n1", T, replicas, hub.connection)
    r = Replica(
        node_id="n1",
        spec=spec(**kw),
        path=MODEL,
        backend=available_backends()["tflite"],
        answer=intake.answer,
    )
    r.load()
    r.start()
    replicas["d"] = r
    return intake, r


def work(job: str, body: bytes, lease_ms: float = 5000, **kw: object) -> Message:
    header = w.Work(
        job=job,
        service="d",
        kind="request",
        lease_ms=lease_ms,
        deadline_ms=10_000,
        request_id=f"id-{job}",
        **kw,  # type: ignore[arg-type]
    )
    return Message(T.node_work("n1"), w.encode_work(header, body), 1, False)


def direct(image: np.ndarray) -> list[int]:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(MODEL))
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    it.set_tensor(inp["index"], image)
    it.invoke()
    return list(it.get_tensor(out["index"]).reshape(-1))


def test_work_is_answered_with_the_result_the_requester_gets() -> None:
    """[T-WORK-2] the answer names the job and carries the result JSON as the requester
    gets it, outputs equal to the model run directly."""
    hub = Hub()
    intake, r = node(hub)
    try:
        image = np.arange(64, dtype=np.int8).reshape(1, 8, 8, 1)
        intake.on_work(work("e1-1", image.tobytes()), session=1)
        [(answer, body)] = hub.wait(1)
        assert (answer.job, answer.kind, answer.ok) == ("e1-1", "result", True)
        assert answer.node_ms is not None and answer.inference_ms is not None
        result = orjson.loads(body)
        assert (result["request_id"], result["service"], result["node"]) == ("id-e1-1", "d", "n1")
        assert result["outputs"][0]["values"][0] == direct(image)
        assert set(result["timing"]) == {"queue_ms", "inference_ms", "total_ms"}
    finally:
        r.stop()


def test_a_json_body_names_its_request_id_only_when_the_topic_did_not() -> None:
    """[T-REQ-2] the body's request_id counts only when the hub says the id is not fixed."""
    hub = Hub()
    intake, r = node(hub)
    try:
        body = orjson.dumps({"inputs": [[[0.5]] * 8] * 8, "request_id": "from-body"})
        intake.on_work(work("e1-1", body, id_fixed=False), session=1)
        intake.on_work(work("e1-2", body, id_fixed=True), session=1)
        ids = sorted(orjson.loads(b)["request_id"] for _, b in hub.wait(2))
        assert ids == ["from-body", "id-e1-2"]
    finally:
        r.stop()


def test_bad_input_is_an_error_result_and_the_replica_goes_on() -> None:
    hub = Hub()
    intake, r = node(hub)
    try:
        intake.on_work(work("e1-1", b"\x00" * 63), session=1)
        intake.on_work(work("e1-2", bytes(64)), session=1)
        answers = {a.job: (a, orjson.loads(b)) for a, b in hub.wait(2)}
        bad, result = answers["e1-1"]
        assert (bad.kind, bad.ok, bad.code) == ("result", False, "bad_payload")
        assert result["error"]["code"] == "bad_payload" and "64 bytes" in result["error"]["message"]
        assert answers["e1-2"][0].ok
    finally:
        r.stop()


def test_work_whose_lease_ran_out_is_released_not_done() -> None:
    """[T-WORK-3] the hub has given it to another replica: the node answers nothing but a
    release."""
    hub = Hub()
    intake, r = node(hub, artificial_slowdown=1.0)
    try:
        r.artificial_slowdown = 2000.0  # one run now takes ~0.2 s or more
        intake.on_work(work("e1-1", bytes(64), lease_ms=30_000), session=1)
        intake.on_work(work("e1-2", bytes(64), lease_ms=1), session=1)  # behind it
        answers = {a.job: a for a, _ in hub.wait(2)}
        assert answers["e1-1"].kind == "result"
        assert (answers["e1-2"].kind, answers["e1-2"].code) == ("released", "lease_expired")
    finally:
        r.artificial_slowdown = 1.0
        r.stop()


def test_work_for_a_slot_it_does_not_run_is_released_and_a_redelivery_is_not_done_twice() -> None:
    hub = Hub()
    intake, r = node(hub)
    try:
        other = w.Work(
            job="e1-9",
            service="other",
            kind="request",
            lease_ms=1000,
            deadline_ms=1000,
            request_id="x",
        )
        intake.on_work(Message(T.node_work("n1"), w.encode_work(other, b""), 1, False), 1)
        msg = work("e1-1", bytes(64))
        intake.on_work(msg, session=1)
        intake.on_work(msg, session=1)  # the broker redelivered it
        answers = hub.wait(2)
        time.sleep(0.2)
        assert len(hub.answers) == 2
        kinds = {a.job: (a.kind, a.code) for a, _ in answers}
        assert kinds == {"e1-9": ("released", "not_deployed"), "e1-1": ("result", None)}
    finally:
        r.stop()


def test_no_answer_goes_out_on_a_session_other_than_the_works() -> None:
    """[T-WORK-3] after a reconnect the hub counts the old session's leases as ended."""
    hub = Hub()
    intake, r = node(hub)
    try:
        hub.session = 2  # the node reconnected while the work was queued
        intake.on_work(work("e1-1", bytes(64)), session=1)
        intake.on_work(work("e1-2", bytes(64)), session=2)
        [(answer, _)] = hub.wait(1)
        time.sleep(0.2)
        assert answer.job == "e1-2" and len(hub.answers) == 1
    finally:
        r.stop()


def test_malformed_work_is_refused_and_the_node_goes_on() -> None:
    hub = Hub()
    intake, r = node(hub)
    try:
        for payload in (b"", b"garbage", b"MQW1\xff\xff\xff\xff{}", b"MQW1\x02\x00\x00\x00[]"):
            intake.on_work(Message(T.node_work("n1"), payload, 1, False), session=1)
        assert intake.refused == 4
        intake.on_work(work("e1-1", bytes(64)), session=1)
        [(answer, _)] = hub.wait(1)
        assert answer.ok
    finally:
        r.stop()


def test_short_jobs_are_done_on_the_network_thread_and_long_ones_by_the_workers() -> None:
    """A replica whose jobs take INLINE_MS or less (the digits model: a fraction of a
    millisecond) answers before `offer` returns, on the thread that read the work; one made
    slower than that hands its work to a worker thread, and the reading thread goes on."""
    hub = Hub()
    intake, r = node(hub, workers=2)
    threads: list[str] = []
    answer = r.answer

    def recording(job: Any, served: Any) -> None:
        threads.append(threading.current_thread().name)
        answer(job, served)

    r.answer = recording
    try:
        assert r.service_ms is None and r.inference_ms is not None
        assert r.inference_ms <= INLINE_MS
        intake.on_work(work("e1-1", bytes(64)), session=1)
        assert len(hub.answers) == 1 and hub.answers[0][0].kind == "result"  # already
        assert threads == [threading.current_thread().name]
        r.artificial_slowdown = 2000.0  # a run now takes ~0.2 s or more
        intake.on_work(work("e1-2", bytes(64)), session=1)
        assert len(hub.answers) == 1  # not yet: a worker has it
        hub.wait(2)
        assert threads[1].startswith("d-worker-")
    finally:
        r.artificial_slowdown = 1.0
        r.stop()
