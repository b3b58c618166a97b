"""Deploying models and serving them over real brokers, with real models and real clients.

Ids in brackets are the MUSTs of topics.md that a test checks.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from mqinfer.protocol import work
from mqinfer.protocol.topics import Kind, Topics
from tests.integration.harness import (
    Broker,
    InProcessCoordinator,
    Observer,
    Procs,
    need_client_tool,
    wait_for,
)
from tests.integration.requests import (
    DIGITS,
    REPO,
    Requester,
    deploy,
    digits_test_set,
    direct,
    png,
    predictions,
)


def status(obs: Observer, prefix: str, service: str) -> dict[str, Any] | None:
    return obs.json(Topics(prefix).service_status(service))


def ready_on(obs: Observer, prefix: str, service: str, count: int) -> list[str]:
    """Wait for the service to be ready with `count` ready replicas; return their nodes."""

    def check() -> list[str] | None:
        st = status(obs, prefix, service)
        if not st or st["state"] != "ready":
            return None
        nodes = [r["node"] for r in st["replicas"] if r["state"] == "ready"]
        return nodes if len(nodes) == count else None

    return wait_for(check, f"{service} ready on {count} nodes", timeout=60)  # type: ignore[no-any-return]


def check_digits(broker: Broker, prefix: str, service: str, model: str, nodes: set[str]) -> None:
    """The whole held-out set through the system: accuracy >= 97%, outputs equal to the
    committed model run directly, every request answered once, both replicas used."""
    images, labels = digits_test_set()
    req = Requester(broker, prefix, service)
    try:
        ids = [f"{service}-{i}" for i in range(len(images))]
        results = req.run({rid: png(img) for rid, img in zip(ids, images, strict=True)})
    finally:
        req.close()
    failed = {i: r["error"] for i, r in results.items() if not r["ok"]}
    assert not failed, f"{len(failed)} errors, e.g. {next(iter(failed.items()))}"
    expected = direct(model, images)
    got = predictions(results, ids).astype(expected.dtype)
    np.testing.assert_array_equal(got, expected)
    accuracy = float(np.mean(got.argmax(axis=1) == labels))
    assert accuracy >= 0.97, accuracy
    tops = [int(results[i]["top"][0]["label"]) for i in ids]
    assert tops == list(got.argmax(axis=1))
    served = {r["node"] for r in results.values()}
    assert served == nodes, f"served by {served}, expected every replica of {nodes}"


def test_digits_on_two_nodes(
    broker: Broker, prefix: str, procs: Procs, coordinator: InProcessCoordinator, observer: Observer
) -> None:
    """[T-WORK-1] [T-WORK-2] [T-REQ-1] [T-DEPLOY-1] the spec file deploys 2 replicas, each
    node answering its deploy once loaded and warmed up; the held-out set through the
    system is as accurate as, and equal to, the model run directly; each request went to
    one node only, as one work message, and no request is answered twice."""
    procs.node(broker, prefix, "n1")
    procs.node(broker, prefix, "n2")
    wait_for(lambda: all(coordinator.state(n) == "online" for n in ("n1", "n2")), "nodes online")
    deploy(broker, prefix, str(DIGITS / "service.yaml"))
    nodes = ready_on(observer, prefix, "digits", 2)
    assert set(nodes) == {"n1", "n2"}
    t = Topics(prefix)
    for n in ("n1", "n2"):
        (reply,) = [r for r in observer.seen(t.node_reply(n)) if r["ok"]]
        assert reply["result"]["state"] == "ready" and reply["result"]["warmup_ms"] >= 0
        assert reply["result"]["inputs"][0]["shape"] == [1, 8, 8, 1]
    check_digits(broker, prefix, "digits", "digits_int8.tflite", {"n1", "n2"})
    given: dict[str, list[str]] = {}
    for topic, payload, _ in list(observer.log):
        ref = t.parse(topic)
        if ref.kind is Kind.NODE_WORK:
            header, _body = work.decode_work(payload)
            given.setdefault(header.request_id, []).append(str(ref.node))
    images, _ = digits_test_set()
    assert len(given) == len(images)
    assert all(len(nodes) == 1 for nodes in given.values()), "work given twice"


def test_onnx_and_tflite_services_side_by_side(
    broker: Broker, prefix: str, procs: Procs, coordinator: InProcessCoordinator, observer: Observer
) -> None:
    """A mixed service set on the same two nodes: the ONNX model and the float TFLite one."""
    procs.node(broker, prefix, "n1")
    procs.node(broker, prefix, "n2")
    wait_for(lambda: all(coordinator.state(n) == "online" for n in ("n1", "n2")), "nodes online")
    deploy(
        broker,
        prefix,
        "--model",
        str(DIGITS / "digits.onnx"),
        "--name",
        "onnx-digits",
        "--replicas",
        "2",
    )
    deploy(
        broker,
        prefix,
        "--model",
        str(DIGITS / "digits_f32.tflite"),
        "--name",
        "tflite-digits",
        "--replicas",
        "2",
    )
    ready_on(observer, prefix, "onnx-digits", 2)
    ready_on(observer, prefix, "tflite-digits", 2)
    check_digits(broker, prefix, "onnx-digits", "digits.onnx", {"n1", "n2"})
    check_digits(broker, prefix, "tflite-digits", "digits_f32.tflite", {"n1", "n2"})
    beat = observer.json(Topics(prefix).node_heartbeat("n1"))
    assert beat and beat["services"] == {"onnx-digits": "ready", "tflite-digits": "ready"}


def test_mosquitto_pub_png_and_mosquitto_sub(
    broker: Broker, prefix: str, procs: Procs, coordinator: InProcessCoordinator, observer: Observer
) -> None:
    """A PNG file sent with the real mosquitto_pub -f; the result read with mosquitto_sub.
    [T-REQ-4] the same file sent again under the same id gets the same answer, byte for
    byte, without being served again; another file under that id is served."""
    pub, sub = need_client_tool("mosquitto_pub"), need_client_tool("mosquitto_sub")
    procs.node(broker, prefix, "n1")
    wait_for(lambda: coordinator.state("n1") == "online", "n1 online")
    deploy(broker, prefix, "--model", str(DIGITS / "digits_int8.tflite"), "--name", "digits")
    ready_on(observer, prefix, "digits", 1)
    samples = sorted((DIGITS / "samples").glob("digit_*.png"))
    sample, other = (
        samples[0],
        next(p for p in samples if p.name.split("_")[1] != samples[0].name.split("_")[1]),
    )
    label = sample.name.split("_")[1]
    t = Topics(prefix)
    conn = ["-h", "127.0.0.1", "-p", str(broker.port), "-V", "mqttv311"]
    reader = subprocess.Popen(
        # line-buffered (stdbuf): -d tells when the subscription is in place
        [
            "stdbuf",
            "-oL",
            sub,
            *conn,
            "-d",
            "-R",  # amqtt also sends other clients' retained messages: skip retained ones
            "-t",
            t.service_result("digits", "cam-1"),
            "-C",
            "3",
            "-W",
            "60",
        ],
        stdout=subprocess.PIPE,
        text=True,
        errors="replace",
    )
    assert reader.stdout is not None
    for line in reader.stdout:
        if "SUBACK" in line:
            break

    def send(path: Path) -> str:
        subprocess.run(
            [pub, *conn, "-t", t.service_request("digits", "cam-1"), "-f", str(path), "-q", "1"],
            check=True,
            timeout=30,
        )
        assert reader.stdout is not None
        return next((line for line in reader.stdout if line.startswith("{")), "")

    line = send(sample)
    result = orjson.loads(line)
    assert result["ok"] and result["request_id"] == "cam-1" and result["node"] == "n1"
    assert result["top"][0]["label"] == label
    assert set(result["timing"]) == {"queue_ms", "inference_ms", "total_ms"}
    assert send(sample) == line
    third = orjson.loads(send(other))
    reader.wait(30)
    assert third["ok"] and third["top"][0]["label"] == other.name.split("_")[1]
    assert third["timing"] != result["timing"]


@pytest.mark.mosquitto
def test_mosquitto_rr_uses_the_response_topic(
    mosquitto: Broker, prefix: str, procs: Procs, tmp_path: Any
) -> None:
    """[T-SERVE-3] MQTT 5: the result goes to the request's response topic with its
    correlation data, so mosquitto_rr gets the answer."""
    from tests.integration.harness import start_coordinator

    rr = need_client_tool("mosquitto_rr")
    coordinator = start_coordinator(mosquitto, prefix)
    obs = Observer(mosquitto, prefix)
    try:
        procs.node(mosquitto, prefix, "n1")
        wait_for(lambda: coordinator.state("n1") == "online", "n1 online")
        deploy(mosquitto, prefix, "--model", str(DIGITS / "digits_int8.tflite"), "--name", "d")
        ready_on(obs, prefix, "d", 1)
        images, labels = digits_test_set()
        # mosquitto_rr 2.0.11 sends -f and -s as empty messages: JSON with -m works.
        pixels = (images[0].astype(np.float32) / 255.0).reshape(1, 8, 8, 1)
        body = orjson.dumps({"inputs": pixels.tolist(), "request_id": "rr-1"}).decode()
        out = subprocess.run(
            [
                rr,
                "-h",
                "127.0.0.1",
                "-p",
                str(mosquitto.port),
                "-t",
                Topics(prefix).service_request("d"),
                "-e",
                f"{prefix}/replies/rr",
                "-m",
                body,
                "-W",
                "20",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        result = orjson.loads(out.stdout)
        assert result["ok"] and result["request_id"] == "rr-1"
        assert int(result["top"][0]["label"]) == int(labels[0])
        # nothing went to the shared result topics
        assert not obs.seen(Topics(prefix).service_result("d"))
    finally:
        obs.close()
        coordinator.shutdown()


def test_mobilenet_jpeg_through_a_chunked_artifact(
    broker: Broker, prefix: str, procs: Procs, coordinator: InProcessCoordinator, observer: Observer
) -> None:
    """[T-ART-1] a 3.9 MB model travels in 16 chunks and arrives intact; a JPEG camera
    frame of another size is decoded and resized as its manifest says, and the output
    equals the model run directly on the same pixels."""
    import io

    from ai_edge_litert.interpreter import Interpreter
    from PIL import Image

    procs.node(broker, prefix, "n1")
    wait_for(lambda: coordinator.state("n1") == "online", "n1 online")
    model = REPO / "models" / "mobilenet_v2" / "mobilenet_v2_int8.tflite"
    out = deploy(broker, prefix, "--model", str(model), "--name", "mnet")
    assert "uploaded" in out.stderr
    ready_on(observer, prefix, "mnet", 1)
    chunks = [t for t, _, _ in observer.log if "/chunk/" in t]
    assert len(set(chunks)) == 16
    rng = np.random.default_rng(3)
    frame = Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8), "RGB")
    jpeg = io.BytesIO()
    frame.save(jpeg, format="JPEG", quality=90)
    req = Requester(broker, prefix, "mnet")
    try:
        result = req.run({"frame-1": jpeg.getvalue()})["frame-1"]
    finally:
        req.close()
    assert result["ok"], result
    pixels = Image.open(io.BytesIO(jpeg.getvalue())).convert("RGB")
    pixels = pixels.resize((224, 224), Image.Resampling.BILINEAR)
    it = Interpreter(model_path=str(model))
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], np.asarray(pixels, np.uint8)[None])
    it.invoke()
    expected = it.get_tensor(it.get_output_details()[0]["index"])
    got = np.array(result["outputs"][0]["values"], dtype=np.uint8)
    np.testing.assert_array_equal(got, expected)
    assert "top" not in result  # no labels in this manifest
