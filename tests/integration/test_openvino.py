"""OpenVINO as a runtime: its answers against ONNX Runtime's and LiteRT's on the committed
models, a node limited to it serving through Mosquitto, and a node with several runtimes
serving with the one it measured fastest.

Ids in brackets are the MUSTs of topics.md that a test checks.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mqinfer.protocol.topics import Topics
from tests.integration.harness import (
    Broker,
    InProcessCoordinator,
    Observer,
    Procs,
    start_coordinator,
    wait_for,
)
from tests.integration.requests import (
    DIGITS,
    Requester,
    deploy,
    digits_test_set,
    direct,
    png,
    predictions,
)


@pytest.fixture
def hub(mosquitto: Broker, prefix: str) -> Iterator[InProcessCoordinator]:
    c = start_coordinator(mosquitto, prefix)
    yield c
    c.shutdown()


@pytest.fixture
def watcher(mosquitto: Broker, prefix: str) -> Iterator[Observer]:
    obs = Observer(mosquitto, prefix)
    yield obs
    obs.close()


def run_openvino(openvino: Any, path: Path, inputs: list[np.ndarray]) -> np.ndarray:
    """The model compiled straight with OpenVINO on the CPU (f32, one thread), one input
    array at a time."""
    core = openvino.Core()
    config = {"INFERENCE_NUM_THREADS": 1, "INFERENCE_PRECISION_HINT": "f32"}
    compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
    request = compiled.create_infer_request()
    outs = []
    for x in inputs:
        request.infer([x])
        outs.append(request.get_output_tensor(0).data.copy())
    return np.concatenate(outs)


def digits_inputs(model: str, images: np.ndarray) -> list[np.ndarray]:
    """The held-out images as each committed digits model takes them (as `direct` does)."""
    if model.endswith(".onnx"):
        return [(img.astype(np.float32) / 255.0).reshape(1, 1, 8, 8) for img in images]
    if model == "digits_int8.tflite":
        return [(img.astype(np.int16) - 128).astype(np.int8).reshape(1, 8, 8, 1) for img in images]
    return [(img.astype(np.float32) / 255.0).reshape(1, 8, 8, 1) for img in images]


# ---- the runtime's answers --------------------------------------------------------------


def test_float_onnx_equals_onnx_runtime(openvino: Any) -> None:
    """digits.onnx on the held-out set: OpenVINO's probabilities equal ONNX Runtime's to
    float32 rounding. Both compute in f32 but sum in another order (and OpenVINO fuses
    the softmax), so the results differ in the last bits: on probabilities in [0, 1] a
    relative 1e-5 with an absolute floor of 1e-6 is ~10 f32 ulps, and a real difference
    (a wrong layout, bf16 arithmetic: 3 significant digits) is orders larger."""
    images, labels = digits_test_set()
    ours = run_openvino(openvino, DIGITS / "digits.onnx", digits_inputs("digits.onnx", images))
    theirs = direct("digits.onnx", images)
    assert ours.shape == theirs.shape == (len(images), 10)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    assert float(np.mean(ours.argmax(axis=1) == labels)) >= 0.97


def test_float_tflite_equals_litert(openvino: Any) -> None:
    """digits_f32.tflite: equal to LiteRT within float32 rounding, as above."""
    images, _ = digits_test_set()
    inputs = digits_inputs("digits_f32.tflite", images)
    ours = run_openvino(openvino, DIGITS / "digits_f32.tflite", inputs)
    np.testing.assert_allclose(ours, direct("digits_f32.tflite", images), rtol=1e-5, atol=1e-6)


def test_int8_tflite_gives_litert_top_class(openvino: Any) -> None:
    """digits_int8.tflite on the held-out set: the same top class as LiteRT for every
    image. The int8 scores themselves may differ by a quantum (the runtimes requantize
    intermediate results with different rounding), never more."""
    images, labels = digits_test_set()
    inputs = digits_inputs("digits_int8.tflite", images)
    ours = run_openvino(openvino, DIGITS / "digits_int8.tflite", inputs)
    theirs = direct("digits_int8.tflite", images)
    assert ours.dtype == theirs.dtype == np.int8
    np.testing.assert_array_equal(ours.argmax(axis=1), theirs.argmax(axis=1))
    assert int(np.abs(ours.astype(np.int16) - theirs.astype(np.int16)).max()) <= 1
    assert float(np.mean(ours.argmax(axis=1) == labels)) >= 0.97


# ---- nodes ------------------------------------------------------------------------------


def ready_replicas(obs: Observer, prefix: str, service: str, count: int) -> list[dict[str, Any]]:
    def check() -> list[dict[str, Any]] | None:
        st = obs.json(Topics(prefix).service_status(service))
        if not st or st["state"] != "ready":
            return None
        ready = [r for r in st["replicas"] if r["state"] == "ready"]
        return ready if len(ready) == count else None

    return wait_for(check, f"{service} ready on {count} node(s)", timeout=90)  # type: ignore[no-any-return]


def deploy_reply(obs: Observer, prefix: str, node: str) -> dict[str, Any]:
    (reply,) = [r for r in obs.seen(Topics(prefix).node_reply(node)) if r["ok"]]
    return reply["result"]  # type: ignore[no-any-return]


def status_text(broker: Broker, prefix: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "mqinfer", "status", "--broker", broker.url, "--prefix", prefix],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return out.stdout


def serve_held_out_set(broker: Broker, prefix: str, service: str) -> tuple[np.ndarray, np.ndarray]:
    """Every held-out image as a PNG request; (returned int8 scores, top labels)."""
    images, _ = digits_test_set()
    req = Requester(broker, prefix, service)
    try:
        ids = [f"{service}-{i}" for i in range(len(images))]
        results = req.run({rid: png(img) for rid, img in zip(ids, images, strict=True)})
    finally:
        req.close()
    failed = {i: r["error"] for i, r in results.items() if not r["ok"]}
    assert not failed, f"{len(failed)} errors, e.g. {next(iter(failed.items()))}"
    tops = np.array([int(results[i]["top"][0]["label"]) for i in ids])
    return predictions(results, ids), tops


def test_a_node_limited_to_openvino_serves_with_it(
    openvino: Any,
    mosquitto: Broker,
    prefix: str,
    procs: Procs,
    hub: InProcessCoordinator,
    watcher: Observer,
) -> None:
    """`mqinfer node --runtime openvino`: it announces OpenVINO alone (the others are
    absent, not used), serves the int8 digits model through Mosquitto with LiteRT's top
    class for every held-out image, and the status and `mqinfer status` say openvino."""
    procs.node(mosquitto, prefix, "ov1", "--runtime", "openvino")
    wait_for(lambda: hub.state("ov1") == "online", "ov1 online")
    caps = watcher.json(Topics(prefix).node_caps("ov1"))
    assert caps is not None
    assert list(caps["runtimes"]) == ["openvino"]
    assert "CPU" in caps["runtimes"]["openvino"]["providers"]
    assert sorted(caps["formats"]) == ["onnx", "tflite"]
    cpu = caps["accelerators"][0]
    assert (cpu["kind"], cpu["runtime"], cpu["detail"]["runtimes"]) == (
        "cpu",
        "openvino",
        ["openvino"],
    )
    assert caps["absent"]["litert"] == "not used on this node (--runtime openvino)"
    assert caps["absent"]["onnxruntime"] == "not used on this node (--runtime openvino)"

    deploy(mosquitto, prefix, "--model", str(DIGITS / "digits_int8.tflite"), "--name", "digits")
    (replica,) = ready_replicas(watcher, prefix, "digits", 1)
    assert replica["runtime"] == "openvino"
    result = deploy_reply(watcher, prefix, "ov1")
    assert result["runtime"] == "openvino" and "measured_ms" not in result
    assert result["inputs"][0]["quantization"] == {
        "scale": pytest.approx(1 / 255),
        "zero_point": -128,
    }

    scores, tops = serve_held_out_set(mosquitto, prefix, "digits")
    images, labels = digits_test_set()
    litert = direct("digits_int8.tflite", images)
    np.testing.assert_array_equal(tops, litert.argmax(axis=1))
    assert int(np.abs(scores.astype(np.int16) - litert.astype(np.int16)).max()) <= 1
    assert float(np.mean(tops == labels)) >= 0.97
    text = status_text(mosquitto, prefix)
    assert "1/1: ov1 (openvino)" in text, text


def test_a_node_with_several_runtimes_serves_with_the_measured_fastest(
    openvino: Any,
    mosquitto: Broker,
    prefix: str,
    procs: Procs,
    hub: InProcessCoordinator,
    watcher: Observer,
) -> None:
    """[T-DEPLOY-2] A node with LiteRT, ONNX Runtime and OpenVINO measures the two that run
    each format, serves with the faster (the preferred one unless the other is 10% faster),
    and its reply, its log, the status and `mqinfer status` all name that runtime; the
    answers are right whichever it is."""
    node = procs.node(mosquitto, prefix, "both")
    wait_for(lambda: hub.state("both") == "online", "both online")
    caps = watcher.json(Topics(prefix).node_caps("both"))
    assert caps is not None and {"litert", "onnxruntime", "openvino"} <= set(caps["runtimes"])

    deploy(mosquitto, prefix, "--model", str(DIGITS / "digits.onnx"), "--name", "digits")
    (replica,) = ready_replicas(watcher, prefix, "digits", 1)
    result = deploy_reply(watcher, prefix, "both")
    measured = result["measured_ms"]
    assert set(measured) == {"onnxruntime", "openvino"}
    assert all(isinstance(ms, float) and ms > 0 for ms in measured.values())
    chosen = "openvino" if measured["openvino"] < 0.9 * measured["onnxruntime"] else "onnxruntime"
    assert result["runtime"] == replica["runtime"] == chosen

    logged = re.search(
        r"digits: onnxruntime ([0-9.]+) ms, openvino ([0-9.]+) ms: serving with (\w+)", node.log()
    )
    assert logged is not None, node.log()
    assert logged.group(3) == chosen
    text = status_text(mosquitto, prefix)
    assert f"1/1: both ({chosen})" in text, text

    images, labels = digits_test_set()
    req = Requester(mosquitto, prefix, "digits")
    try:
        ids = [f"d-{i}" for i in range(len(images))]
        results = req.run({rid: png(img) for rid, img in zip(ids, images, strict=True)})
    finally:
        req.close()
    got = predictions(results, ids).astype(np.float32)
    np.testing.assert_allclose(got, direct("digits.onnx", images), rtol=1e-5, atol=1e-6)
    assert float(np.mean(got.argmax(axis=1) == labels)) >= 0.97
