"""Pipeline stages with real split segments of the digits model and no broker: the test
plays the hub, carrying each stage's tensors to the next stage as work."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest

from mqinfer.mqtt import Message
from mqinfer.node.intake import Intake
from mqinfer.node.replica import Replica
from mqinfer.node.runtimes import available_backends
from mqinfer.protocol import messages as m
from mqinfer.protocol import tensors
from mqinfer.protocol import work as w
from mqinfer.protocol.manifest import Pipeline, TensorInfo
from mqinfer.protocol.topics import Topics
from mqinfer.servicefile import read_model
from mqinfer.split import split_model
from tests.unit.test_serving import Hub, direct

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "models" / "digits" / "digits_int8.tflite"
T = Topics()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> tuple[Pipeline, Path]:
    out = tmp_path_factory.mktemp("split")
    return split_model(MODEL, 2, out), out


@pytest.fixture
def stages(pipeline: tuple[Pipeline, Path]) -> Iterator[tuple[Hub, Intake]]:
    """Both stages on one node, as the hub may place them when it has one node."""
    pipe, out = pipeline
    whole = read_model(MODEL)
    spec = m.ServiceSpec(
        name="p",
        model=MODEL.name,
        artifact=whole.sha256,
        format="tflite",
        size=len(whole.data),
        manifest=whole.manifest,
        pipeline=pipe,
    )
    hub = Hub()
    replicas: dict[str, Replica] = {}
    intake = Intake("n1", T, replicas, hub.connection)
    for k in range(2):
        r = Replica(
            node_id="n1",
            spec=spec,
            path=out / pipe.segments[k].manifest.file,
            backend=available_backends()["tflite"],
            answer=intake.answer,
            stage=k,
        )
        r.load()
        r.start()
        replicas[m.slot("p", k)] = r
    yield hub, intake
    for r in replicas.values():
        r.stop()


def work(job: str, stage: int, body: bytes, **kw: object) -> Message:
    header = w.Work(
        job=job,
        service="p",
        stage=stage,
        kind="tensors" if stage else "request",
        lease_ms=5000,
        deadline_ms=10_000,
        request_id="r1",
        **kw,  # type: ignore[arg-type]
    )
    return Message(T.node_work("n1"), w.encode_work(header, body), 1, False)


def test_stages_chained_through_the_hub_give_the_whole_models_result(
    stages: tuple[Hub, Intake],
) -> None:
    """[T-PIPE-2] stage 0 answers with its tensors, as raw bytes; given to stage 1 they
    give the whole model's output, and the result lists each stage's timing."""
    hub, intake = stages
    image = np.arange(64, dtype=np.int8).reshape(1, 8, 8, 1)
    intake.on_work(work("e1-1", 0, image.tobytes()), session=1)
    [(answer, body)] = hub.wait(1)
    assert answer.kind == "tensors" and answer.trace is not None
    assert (answer.trace.stage, answer.trace.node) == (0, "n1")
    passed = tensors.decode(body)
    assert len(passed) == 1 and passed[0][1].dtype == np.int8
    intake.on_work(work("e1-2", 1, body, trace=[answer.trace]), session=1)
    [_, (last, result_body)] = hub.wait(2)
    result = orjson.loads(result_body)
    assert last.kind == "result" and result["ok"]
    assert result["outputs"][0]["values"][0] == direct(image)
    assert [s["stage"] for s in result["timing"]["stages"]] == [0, 1]


def test_a_stage_refuses_tensors_it_cannot_take(stages: tuple[Hub, Intake]) -> None:
    """[T-PIPE-5] wrong or malformed tensors: a bad_tensor result for the requester, through
    the hub; the stage runs on."""
    hub, intake = stages
    info = TensorInfo(name="nope", dtype="int8", shape=[1, 10])
    wrong = tensors.encode([(info, np.zeros((1, 10), np.int8))])
    intake.on_work(work("e1-1", 1, wrong), session=1)
    intake.on_work(work("e1-2", 1, b"\x00" * 40), session=1)
    answers = {a.job: (a, orjson.loads(b)) for a, b in hub.wait(2)}
    for job, why in (("e1-1", "no tensor named"), ("e1-2", "expected the magic bytes")):
        answer, result = answers[job]
        assert (answer.kind, answer.ok, answer.code) == ("result", False, "bad_tensor")
        assert result["error"]["code"] == "bad_tensor" and why in result["error"]["message"]
