"""Models split into segments and served as pipelines over real brokers and nodes.

Ids in brackets are the MUSTs of topics.md that a test checks.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from mqinfer.protocol import tensors, work
from mqinfer.protocol.manifest import TensorInfo
from mqinfer.protocol.topics import Kind, Topics
from mqinfer.split import pipeline_file
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
    mqinfer,
    png,
    predictions,
)

MOBILENET = REPO / "models" / "mobilenet_v2" / "mobilenet_v2_int8.tflite"


def pipeline_status(obs: Observer, prefix: str, service: str) -> dict[str, Any] | None:
    return obs.json(Topics(prefix).service_status(service))


def stages_ready(obs: Observer, prefix: str, service: str, stages: int) -> dict[int, str]:
    """Wait until every stage has a ready replica; return stage -> node."""

    def check() -> dict[int, str] | None:
        st = pipeline_status(obs, prefix, service)
        if not st or st["state"] != "ready" or st.get("stages") != stages:
            return None
        ready = {r["stage"]: r["node"] for r in st["replicas"] if r["state"] == "ready"}
        return ready if len(ready) == stages else None

    return wait_for(check, f"{service}: {stages} stages ready", timeout=90)  # type: ignore[no-any-return]


def start_nodes(
    broker: Broker, prefix: str, procs: Procs, coordinator: InProcessCoordinator, count: int
) -> dict[str, Any]:
    nodes = {f"n{i}": procs.node(broker, prefix, f"n{i}") for i in range(1, count + 1)}
    wait_for(lambda: all(coordinator.state(n) == "online" for n in nodes), "nodes online")
    return nodes


def run_tflite(path: Path, arrays: list[np.ndarray]) -> list[np.ndarray]:
    """The model file run directly by LiteRT, one input tensor at a time."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    outs = []
    for a in arrays:
        it.set_tensor(inp["index"], a)
        it.invoke()
        outs.append(it.get_tensor(out["index"]).copy())
    return outs


# ---- results equal to the whole model ------------------------------------------------


@pytest.mark.parametrize("broker", ["mosquitto"], indirect=True)
@pytest.mark.parametrize(
    ("model", "segments"),
    [
        ("digits_int8.tflite", 2),
        ("digits_int8.tflite", 3),
        ("digits_f32.tflite", 3),
        ("digits.onnx", 2),
        ("digits.onnx", 3),
    ],
)
def test_digits_pipeline_equals_the_whole_model(
    broker: Broker,
    prefix: str,
    procs: Procs,
    coordinator: InProcessCoordinator,
    observer: Observer,
    model: str,
    segments: int,
) -> None:
    """[T-PIPE-1] [T-PIPE-2] a model deployed with --segments runs as a chain of stages on
    different nodes; every held-out image's result equals the whole model run directly."""
    start_nodes(broker, prefix, procs, coordinator, 3)
    out = deploy(
        broker, prefix, "--model", str(DIGITS / model), "--name", "pd", "--segments", str(segments)
    )
    assert "segment" in out.stderr, out.stderr
    placed = stages_ready(observer, prefix, "pd", segments)
    assert len(set(placed.values())) == segments, f"stages share a node: {placed}"
    images, labels = digits_test_set()
    req = Requester(broker, prefix, "pd")
    try:
        ids = [f"p{i}" for i in range(len(images))]
        results = req.run({rid: png(img) for rid, img in zip(ids, images, strict=True)})
    finally:
        req.close()
    failed = {i: r["error"] for i, r in results.items() if not r["ok"]}
    assert not failed, f"{len(failed)} errors, e.g. {next(iter(failed.items()))}"
    expected = direct(model, images)
    got = predictions(results, ids).astype(expected.dtype)
    np.testing.assert_array_equal(got, expected)
    assert float(np.mean(got.argmax(axis=1) == labels)) >= 0.97
    last = placed[segments - 1]
    assert {r["node"] for r in results.values()} == {last}  # the last stage answers
    trace = results[ids[0]]["timing"]["stages"]
    assert [(t["stage"], t["node"]) for t in trace] == sorted(placed.items())
    assert int(results[ids[0]]["top"][0]["label"]) == int(got[0].argmax())


@pytest.mark.parametrize("segments", [2, 3])
def test_mobilenet_pipeline_equals_the_whole_model(
    broker: Broker,
    prefix: str,
    procs: Procs,
    coordinator: InProcessCoordinator,
    observer: Observer,
    tmp_path: Path,
    segments: int,
) -> None:
    """[T-PIPE-2] MobileNetV2 (uint8, 3.9 MB) split beforehand into 2 and 3 stages: raw
    frames in, outputs bitwise equal to the whole model, and every intermediate tensor the
    hub gave a later stage as work equal to the segments run directly, chained by hand.
    (With random weights the final uint8 outputs vary little; the intermediate tensors
    do.)"""
    manifest = split_beside_a_copy(MOBILENET, tmp_path / "split", segments)
    pipeline = orjson.loads(manifest.read_bytes())
    start_nodes(broker, prefix, procs, coordinator, segments)
    deploy(broker, prefix, "--model", str(manifest), "--name", "mnv2")
    placed = stages_ready(observer, prefix, "mnv2", segments)
    assert len(set(placed.values())) == segments
    rng = np.random.default_rng(7)
    frames = [rng.integers(0, 256, (1, 224, 224, 3), dtype=np.uint8) for _ in range(12)]
    req = Requester(broker, prefix, "mnv2")
    try:
        ids = [f"m{i}" for i in range(len(frames))]
        results = req.run({rid: f.tobytes() for rid, f in zip(ids, frames, strict=True)}, window=4)
    finally:
        req.close()
    failed = {i: r["error"] for i, r in results.items() if not r["ok"]}
    assert not failed, failed
    expected = np.concatenate(run_tflite(MOBILENET, frames))
    got = predictions(results, ids).astype(np.uint8)
    np.testing.assert_array_equal(got, expected)
    seen = stage_work(observer, prefix, "mnv2")
    assert len(seen) == len(ids) * (segments - 1)
    files = [manifest.parent / s["manifest"]["file"] for s in pipeline["segments"]]
    for rid, f in zip(ids, frames, strict=True):
        x = f
        for k in range(1, segments):
            (x,) = run_tflite(files[k - 1], [x])
            [(_, boundary)] = seen[(k, rid)]  # raw bytes, one tensor per cut
            np.testing.assert_array_equal(boundary, x)
        (final,) = run_tflite(files[-1], [x])
        np.testing.assert_array_equal(final, expected[ids.index(rid)][None])


def stage_work(obs: Observer, prefix: str, service: str) -> dict[tuple[int, str], Any]:
    """The tensors the hub gave each later stage, by (stage, request id), from the work
    messages on the nodes' work topics."""
    t = Topics(prefix)
    seen = {}
    for topic, payload, _ in list(obs.log):
        if t.parse(topic).kind is not Kind.NODE_WORK:
            continue
        header, body = work.decode_work(payload)
        if header.service == service and header.kind == "tensors":
            assert header.stage is not None
            seen[(header.stage, header.request_id)] = tensors.decode(body)
    return seen


# ---- the data between stages as a person sees it ------------------------------------


def split_beside_a_copy(model: Path, out: Path, segments: int) -> Path:
    """`mqinfer split` as a user runs it, next to a copy of the model and its manifest."""
    out.mkdir()
    shutil.copy(model, out / model.name)
    shutil.copy(model.with_suffix(".json"), out / model.with_suffix(".json").name)
    done = mqinfer("split", str(out / model.name), "--segments", str(segments), "-o", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    manifest = out / pipeline_file(model)
    assert manifest.is_file(), sorted(p.name for p in out.iterdir())
    return manifest


def test_mosquitto_sub_sees_the_intermediate_tensors(
    broker: Broker,
    prefix: str,
    procs: Procs,
    coordinator: InProcessCoordinator,
    observer: Observer,
    tmp_path: Path,
) -> None:
    """[T-PIPE-2] segments split beforehand deploy as they are; `mosquitto_sub` on the
    work topic of stage 1's node reads each request's boundary tensor, as raw bytes, equal
    to segment 0 run directly, with the request id in the work's header."""
    sub_tool = need_client_tool("mosquitto_sub")
    manifest = split_beside_a_copy(DIGITS / "digits_int8.tflite", tmp_path / "split", 2)
    start_nodes(broker, prefix, procs, coordinator, 2)
    deploy(broker, prefix, "--model", str(manifest), "--name", "pre")
    placed = stages_ready(observer, prefix, "pre", 2)
    t = Topics(prefix)
    sub = subprocess.Popen(
        [
            "stdbuf",
            "-oL",
            sub_tool,
            "-h",
            "127.0.0.1",
            "-p",
            str(broker.port),
            "-V",
            "mqttv311",
            "-R",
            "-t",
            t.node_work(placed[1]),
            "-C",
            "5",
            "-F",
            "%t %x",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1.0)  # subscribed
        images, _ = digits_test_set()
        req = Requester(broker, prefix, "pre")
        try:
            ids = [f"s{i}" for i in range(5)]
            results = req.run({rid: png(images[i]) for i, rid in enumerate(ids)}, window=1)
        finally:
            req.close()
        lines, _ = sub.communicate(timeout=30)
    finally:
        if sub.poll() is None:
            sub.kill()
    assert all(r["ok"] for r in results.values())
    check_status_shows_stages(broker, prefix, "pre", 2, served=5)
    seen = [line.split(" ", 1) for line in lines.splitlines()]
    assert len(seen) == 5 and all(topic == t.node_work(placed[1]) for topic, _ in seen)
    pipeline = orjson.loads(manifest.read_bytes())
    seg0 = manifest.parent / pipeline["segments"][0]["manifest"]["file"]
    boundary = pipeline["segments"][0]["manifest"]["outputs"]
    for i, (_, hexed) in enumerate(seen):
        header, body = work.decode_work(bytes.fromhex(hexed))
        assert (header.request_id, header.stage, header.kind) == (ids[i], 1, "tensors")
        assert [tr.stage for tr in header.trace] == [0]
        passed = tensors.decode(body)
        assert [(info.name, info.dtype, info.shape) for info, _ in passed] == [
            (b["name"], b["dtype"], b["shape"]) for b in boundary
        ]
        x = (images[i].astype(np.int16) - 128).astype(np.int8).reshape(1, 8, 8, 1)
        (expected,) = run_tflite(seg0, [x])
        np.testing.assert_array_equal(passed[0][1], expected)


def check_status_shows_stages(
    broker: Broker, prefix: str, service: str, stages: int, served: int
) -> None:
    """`mqinfer status` lists each stage, its node and the run time its node measured."""
    common = ["--broker", broker.url, "--prefix", prefix]

    def counted() -> dict[str, Any] | None:
        out = mqinfer("status", "--json", *common)
        assert out.returncode == 0, out.stderr
        (svc,) = [s for s in orjson.loads(out.stdout)["services"] if s["name"] == service]
        done = all(r.get("served", 0) >= served for r in svc["replicas"])
        return svc if done else None

    svc = wait_for(counted, "heartbeats with the stages' costs", timeout=20)
    assert svc["spec"]["stages"] == stages
    assert sorted(r["stage"] for r in svc["replicas"]) == list(range(stages))
    assert all(r["inference_ms"] > 0 for r in svc["replicas"])

    def line() -> str | None:
        # The embedded broker can hand over the retained messages more slowly than
        # `status` waits for them: ask again until the service's line is there.
        text = mqinfer("status", *common).stdout
        return next((x for x in text.splitlines() if x.startswith(service + " ")), None)

    shown = wait_for(line, f"{service} in `mqinfer status`", timeout=20)
    assert f"{stages} stages" in shown and "[0] " in shown and " ms" in shown, shown


# ---- failures ---------------------------------------------------------------------------


def test_forged_work_reaches_no_requester_and_the_stages_serve_on(
    broker: Broker,
    prefix: str,
    procs: Procs,
    coordinator: InProcessCoordinator,
    observer: Observer,
) -> None:
    """[T-WORK-3] [T-PIPE-5] garbage on a stage node's work topic is refused by the node;
    well-formed work the hub never gave (wrong tensors, under a job of no lease) is answered
    to the hub, which drops it: nothing reaches any requester, and the pipeline serves on."""
    start_nodes(broker, prefix, procs, coordinator, 2)
    deploy(
        broker,
        prefix,
        "--model",
        str(DIGITS / "digits_int8.tflite"),
        "--name",
        "pm",
        "--segments",
        "2",
    )
    placed = stages_ready(observer, prefix, "pm", 2)
    t = Topics(prefix)
    req = Requester(broker, prefix, "pm")
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        target = t.node_work(placed[1])
        client.publish(target, b"not work", qos=1).wait_for_publish(10)
        wrong = tensors.encode(
            [(TensorInfo(name="x", dtype="float32", shape=[1, 3]), np.zeros((1, 3), np.float32))]
        )
        header = work.Work(
            job="forged-1",
            service="pm",
            stage=1,
            kind="tensors",
            lease_ms=5000,
            deadline_ms=5000,
            request_id="bad2",
        )
        client.publish(target, work.encode_work(header, wrong), qos=1).wait_for_publish(10)

        def answered() -> list[work.Answer]:
            out = []
            for topic, payload, _ in list(observer.log):
                if topic == t.node_answer(placed[1]):
                    answer, _ = work.decode_answer(payload)
                    if answer.job == "forged-1":
                        out.append(answer)
            return out

        [answer] = wait_for(answered, "the node's answer to the forged work")
        assert (answer.kind, answer.ok, answer.code) == ("result", False, "bad_tensor")
        images, _ = digits_test_set()
        results = req.run({f"ok{i}": png(images[i]) for i in range(20)})
        assert all(r["ok"] for r in results.values())
        assert "bad2" not in req.results
        assert not [p for tp, p, _ in list(observer.log) if "/result" in tp and b"bad2" in p]
    finally:
        client.loop_stop()
        client.disconnect()
        req.close()


@pytest.mark.parametrize("broker", ["mosquitto"], indirect=True)
def test_a_stage_node_killed_mid_stream(
    broker: Broker,
    prefix: str,
    procs: Procs,
    coordinator: InProcessCoordinator,
    observer: Observer,
    tmp_path: Path,
) -> None:
    """[T-PIPE-1] [T-PIPE-4] kill -9 the node of stage 1 while requests flow: the stage is
    placed again on the spare node, the hub gives that stage's work to it, and every request
    gets exactly one answer: a result or an explicit error."""
    nodes = start_nodes(broker, prefix, procs, coordinator, 3)
    spec = tmp_path / "pipe.yaml"
    spec.write_text(
        f"name: pk\nmodel: {DIGITS / 'digits_int8.tflite'}\nsegments: 2\ndeadline_ms: 3000\n"
    )
    deploy(broker, prefix, str(spec))
    placed = stages_ready(observer, prefix, "pk", 2)
    victim = placed[1]
    images, _ = digits_test_set()
    payloads = {f"k{i}": png(images[i % len(images)]) for i in range(400)}
    req = Requester(broker, prefix, "pk")
    failure: list[BaseException] = []

    def send_all() -> None:
        try:
            ids = list(payloads)
            for i, rid in enumerate(ids):
                req.send(rid, payloads[rid])
                while i - req.count_of(ids) > 8:
                    time.sleep(0.002)
                time.sleep(0.004)
        except BaseException as e:  # reported by the test thread
            failure.append(e)

    sender = threading.Thread(target=send_all)
    sender.start()
    try:
        wait_for(lambda: req.count() >= 80, "80 results before the kill")
        nodes[victim].kill9()
        sender.join(120)
        wait_for(lambda: req.count() == len(payloads), "an answer to every request", 60)
        results = req.single(list(payloads), settle=1.0)
    finally:
        req.close()
    assert not failure, failure
    errors = {r["error"]["code"] for r in results.values() if not r["ok"]}
    assert errors <= {"timeout", "unavailable"}, errors
    assert sum(r["ok"] for r in results.values()) >= 80
    again = stages_ready(observer, prefix, "pk", 2)
    assert victim not in again.values()
    req = Requester(broker, prefix, "pk")
    try:
        after = req.run({f"a{i}": png(images[i]) for i in range(20)})
    finally:
        req.close()
    assert all(r["ok"] for r in after.values()), after
    assert {r["node"] for r in after.values()} == {again[1]}
