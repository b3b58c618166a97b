"""Serving when things go wrong: bad input, a node killed mid-stream, a tampered artifact,
a node that comes back after it was given up on. Real brokers, real models, real processes.

Ids in brackets are the MUSTs of topics.md that a test checks.
"""

from __future__ import annotations

import hashlib
import io
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from mqinfer.protocol import messages as m
from mqinfer.protocol.topics import Topics
from tests.integration.harness import (
    Broker,
    CuttingProxy,
    InProcessCoordinator,
    Observer,
    Procs,
    start_coordinator,
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
    mqinfer_started,
    png,
)
from tests.integration.test_discovery import status_json
from tests.integration.test_serving import ready_on, status

MOBILENET = REPO / "models" / "mobilenet_v2" / "mobilenet_v2_int8.tflite"


def npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


def test_bad_input_gets_the_right_error_and_the_node_keeps_serving(
    broker: Broker, prefix: str, procs: Procs, coordinator: InProcessCoordinator, observer: Observer
) -> None:
    """[T-REQ-1] [T-RES-1] each kind of bad request gets its own error code in an
    ok:false result; after each, a good request is still answered by the same node."""
    node = procs.node(broker, prefix, "n1")
    wait_for(lambda: coordinator.state("n1") == "online", "n1 online")
    deploy(broker, prefix, "--model", str(DIGITS / "digits_int8.tflite"), "--name", "digits")
    ready_on(observer, prefix, "digits", 1)
    images, labels = digits_test_set()
    good = png(images[0])
    valid_png = png(images[1])
    rng = np.random.default_rng(7)
    bad: dict[str, tuple[bytes, str]] = {
        "raw-wrong-size": (bytes(63), "bad_payload"),  # 1 byte short of int8 [1,8,8,1]
        "npy-wrong-size": (npy(np.zeros((9, 9), np.float32)), "wrong_shape"),
        "npy-wrong-dtype": (npy(np.zeros((1, 8, 8, 1), np.complex64)), "wrong_dtype"),
        "garbage": (rng.integers(0, 256, 1000, dtype=np.uint8).tobytes(), "bad_payload"),
        "truncated-png": (valid_png[: len(valid_png) // 2], "bad_image"),
        "json-wrong-shape": (orjson.dumps({"inputs": [[0.5] * 8] * 7}), "wrong_shape"),
        "json-not-json": (b'{"inputs": [1, 2', "bad_encoding"),
        "huge": (bytes(20 * 1024 * 1024), "too_large"),
    }
    req = Requester(broker, prefix, "digits")
    try:
        for name, (payload, code) in bad.items():
            req.send(name, payload)
            result = req.wait(name)
            assert result["ok"] is False, (name, result)
            assert result["error"]["code"] == code, (name, result["error"])
            assert result["request_id"] == name
            # A request too large is refused by the hub at once and never sent to a node.
            assert result.get("node") == (None if code == "too_large" else "n1"), result
            assert result["error"]["message"]
            req.send(f"{name}-then-good", good)
            after = req.wait(f"{name}-then-good")
            assert after["ok"] and int(after["top"][0]["label"]) == int(labels[0]), after
        req.single([*bad, *(f"{n}-then-good" for n in bad)])
    finally:
        req.close()
    assert node.proc.poll() is None, "the node died"
    # the messages say what was received and what was expected
    garbage = req.results["garbage"][0]["error"]["message"]
    assert "1000 bytes" in garbage and "int8" in garbage and "[1,8,8,1]" in garbage


def test_node_killed_with_requests_in_flight(
    broker: Broker, prefix: str, procs: Procs, coordinator: InProcessCoordinator, observer: Observer
) -> None:
    """[T-WORK-3] a replica killed mid-stream: its Will ends its leases, its work goes to
    the other replica at once, every request gets exactly one result, and the service is
    ready again on the other nodes."""
    nodes = {n: procs.node(broker, prefix, n) for n in ("n1", "n2", "n3")}
    wait_for(lambda: all(coordinator.state(n) == "online" for n in nodes), "nodes online")
    deploy(broker, prefix, str(DIGITS / "service.yaml"))
    first = ready_on(observer, prefix, "digits", 2)
    victim = first[0]
    images, _labels = digits_test_set()
    payloads = {f"r{i}": png(images[i % len(images)]) for i in range(400)}
    req = Requester(broker, prefix, "digits")
    results: dict[str, dict[str, Any]] = {}
    failure: list[BaseException] = []

    def stream() -> None:
        try:
            results.update(req.run(payloads, window=24, timeout=90))
        except BaseException as e:  # reported below
            failure.append(e)

    sender = threading.Thread(target=stream)
    sender.start()
    try:
        wait_for(lambda: req.count() >= 120, "120 results before the kill")
        served_by_victim = sum(
            1 for rs in list(req.results.values()) for r in rs if r.get("node") == victim
        )
        assert served_by_victim > 0, "the victim served nothing before it was killed"
        nodes[victim].kill9()
        sender.join(120)
    finally:
        req.close()
    assert not failure, failure
    assert set(results) == set(payloads)  # one result each (Requester.single checks twice)
    errors = [r["error"] for r in results.values() if not r["ok"]]
    assert errors == [], errors[:3]
    after = ready_on(observer, prefix, "digits", 2)
    assert victim not in after


def test_no_ready_replica_answers_unavailable(
    broker: Broker, prefix: str, procs: Procs, coordinator: InProcessCoordinator, observer: Observer
) -> None:
    """[T-SERVE-4] a service no node can run fails with the reason, and its requests get
    an 'unavailable' error from the coordinator instead of silence."""
    procs.node(broker, prefix, "n1")
    wait_for(lambda: coordinator.state("n1") == "online", "n1 online")
    out = mqinfer(
        "deploy",
        "--model",
        str(DIGITS / "digits_int8.tflite"),
        "--name",
        "tpu-digits",
        "--accelerator",
        "edgetpu",
        "--broker",
        broker.url,
        "--prefix",
        prefix,
        "--wait",
        "--timeout",
        "60",
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert "n1: no edgetpu accelerator" in out.stderr, out.stderr
    req = Requester(broker, prefix, "tpu-digits")
    try:
        req.send("u1", png(digits_test_set()[0][0]))
        result = req.wait("u1")
    finally:
        req.close()
    assert result["ok"] is False and result["error"]["code"] == "unavailable"
    assert "no ready replica" in result["error"]["message"] and "node" not in result


def test_tampered_artifact_is_refused(
    broker: Broker, prefix: str, procs: Procs, coordinator: InProcessCoordinator, observer: Observer
) -> None:
    """[T-ART-1] a node refuses an artifact whose bytes do not hash to its name; the
    service fails with the reason; a re-upload repairs it."""
    procs.node(broker, prefix, "n1")
    wait_for(lambda: coordinator.state("n1") == "online", "n1 online")
    model = (DIGITS / "digits_int8.tflite").read_bytes()
    sha = hashlib.sha256(model).hexdigest()
    tampered = bytearray(model)
    tampered[len(tampered) // 2] ^= 0xFF
    t = Topics(prefix)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        client.publish(t.artifact_chunk(sha, 0), bytes(tampered), qos=1, retain=True)
        meta = m.ArtifactMeta(
            sha256=sha,
            name="digits_int8.tflite",
            format="tflite",
            size=len(model),
            chunk_size=len(model),
            chunks=1,
        )
        client.publish(t.artifact_meta(sha), meta.model_dump_json(), qos=1, retain=True)
        info = client.publish(t.artifact_meta(sha), meta.model_dump_json(), qos=1, retain=True)
        info.wait_for_publish(10)
    finally:
        client.loop_stop()
        client.disconnect()
    base = [
        "--model",
        str(DIGITS / "digits_int8.tflite"),
        "--name",
        "digits",
        "--broker",
        broker.url,
        "--prefix",
        prefix,
        "--wait",
        "--timeout",
        "60",
    ]
    out = mqinfer("deploy", *base)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "already on the broker" in out.stderr
    assert "bad_artifact" in out.stderr and "refusing it" in out.stderr, out.stderr
    st = status(observer, prefix, "digits")
    assert st and st["state"] == "failed" and "n1" in st["reason"]
    assert not list((procs.tmp_path / "cache-n1").glob(f"{sha}*")), "tampered file cached"
    out = mqinfer("deploy", *base, "--reupload")
    assert out.returncode == 0, out.stdout + out.stderr
    cached = list((procs.tmp_path / "cache-n1").glob(f"{sha}*"))
    assert [hashlib.sha256(p.read_bytes()).hexdigest() for p in cached] == [sha]


def test_undeploy_frees_the_node(
    broker: Broker, prefix: str, procs: Procs, coordinator: InProcessCoordinator, observer: Observer
) -> None:
    """Undeploy stops every replica: the nodes report no service and stop answering."""
    procs.node(broker, prefix, "n1")
    procs.node(broker, prefix, "n2")
    wait_for(lambda: all(coordinator.state(n) == "online" for n in ("n1", "n2")), "online")
    deploy(broker, prefix, str(DIGITS / "service.yaml"))
    ready_on(observer, prefix, "digits", 2)
    t = Topics(prefix)
    out = mqinfer("undeploy", "digits", "--wait", "--broker", broker.url, "--prefix", prefix)
    assert out.returncode == 0, out.stdout + out.stderr
    for n in ("n1", "n2"):
        wait_for(
            lambda n=n: (b := observer.json(t.node_heartbeat(n))) and b["services"] == {},
            f"{n} reports no service",
        )
    wait_for(lambda: status(observer, prefix, "digits") is None, "the status cleared")


def test_returning_node_is_reconciled(
    broker: Broker, prefix: str, procs: Procs, observer: Observer
) -> None:
    """[T-COORD-5] a node given up on (heartbeat timeout) loses its replica to another
    node; when it comes back still running it, the coordinator has it undeploy it."""
    coordinator = start_coordinator(broker, prefix, missed_beats=3)
    try:
        nodes = {n: procs.node(broker, prefix, n) for n in ("n1", "n2")}
        wait_for(lambda: all(coordinator.state(n) == "online" for n in nodes), "online")
        deploy(broker, prefix, "--model", str(DIGITS / "digits_int8.tflite"), "--name", "d")
        (first,) = ready_on(observer, prefix, "d", 1)
        other = "n2" if first == "n1" else "n1"
        nodes[first].signal(signal.SIGSTOP)
        wait_for(lambda: coordinator.state(first) == "lost", f"{first} lost")
        wait_for(lambda: ready_on(observer, prefix, "d", 1) == [other], f"d moved to {other}")
        nodes[first].signal(signal.SIGCONT)
        wait_for(lambda: coordinator.state(first) == "online", f"{first} back")
        t = Topics(prefix)
        wait_for(
            lambda: (
                (b := observer.json(t.node_heartbeat(first)))
                and b["session"]
                and b["services"] == {}
            ),
            f"{first} told to stop serving d",
        )
        assert ready_on(observer, prefix, "d", 1) == [other]
    finally:
        coordinator.shutdown()


def test_coordinator_restart_keeps_the_placement(
    broker: Broker, prefix: str, procs: Procs, observer: Observer
) -> None:
    """[T-COORD-4] a new coordinator adopts the published placement: no redeploy."""
    coordinator = start_coordinator(broker, prefix)
    procs.node(broker, prefix, "n1")
    procs.node(broker, prefix, "n2")
    wait_for(lambda: all(coordinator.state(n) == "online" for n in ("n1", "n2")), "online")
    deploy(broker, prefix, str(DIGITS / "service.yaml"))
    ready_on(observer, prefix, "digits", 2)
    coordinator.shutdown()
    t = Topics(prefix)
    commands_before = len(observer.seen(t.node_cmd("n1"))) + len(observer.seen(t.node_cmd("n2")))
    again = start_coordinator(broker, prefix)
    try:
        wait_for(lambda: again.agent.provisioner.services.get("digits"), "digits adopted")
        wait_for(
            lambda: (svc := again.agent.provisioner.services["digits"]) and len(svc.replicas) == 2,
            "both replicas adopted",
        )
        req = Requester(broker, prefix, "digits")
        try:
            images, _labels = digits_test_set()
            res = req.run({f"a{i}": png(images[i]) for i in range(20)})
        finally:
            req.close()
        assert all(r["ok"] for r in res.values())
        commands = len(observer.seen(t.node_cmd("n1"))) + len(observer.seen(t.node_cmd("n2")))
        assert commands == commands_before, "the new coordinator deployed again"
        assert status(observer, prefix, "digits")["state"] == "ready"  # type: ignore[index]
    finally:
        again.shutdown()


def test_a_full_queue_answers_busy(
    broker: Broker, prefix: str, procs: Procs, coordinator: InProcessCoordinator, observer: Observer
) -> None:
    """[T-WORK-4] A burst larger than the service's queue at the hub: the overflow gets
    'busy' at once, the rest is served, and each request gets exactly one answer."""
    procs.node(broker, prefix, "n1")
    wait_for(lambda: coordinator.state("n1") == "online", "n1 online")
    model = REPO / "models" / "mobilenet_v2" / "mobilenet_v2_int8.tflite"
    spec = procs.tmp_path / "small-queue.yaml"
    spec.write_text(f"name: mnet\nmodel: {model}\nreplicas: 1\nqueue: 2\n")
    deploy(broker, prefix, str(spec))
    ready_on(observer, prefix, "mnet", 1)
    frame = bytes(224 * 224 * 3)  # raw uint8 [1,224,224,3]
    req = Requester(broker, prefix, "mnet")
    try:
        results = req.run({f"b{i}": frame for i in range(40)}, window=40)
    finally:
        req.close()
    codes = [r["error"]["code"] for r in results.values() if not r["ok"]]
    served = sum(r["ok"] for r in results.values())
    assert set(codes) == {"busy"} and served >= 2, (served, codes)
    assert "2 requests waiting for a replica (queue 2 per replica, 1 ready)" in next(
        r["error"]["message"] for r in results.values() if not r["ok"]
    )


def test_serving_goes_on_after_a_broker_restart(
    mosquitto: Broker, prefix: str, procs: Procs
) -> None:
    """Mosquitto restarts (persistence on): nodes and coordinator reconnect, the replicas
    subscribe again and the service answers as before. The models stay loaded: a node
    given its replica back takes it in place instead of loading the model again."""
    coordinator = start_coordinator(mosquitto, prefix)
    obs = Observer(mosquitto, prefix)
    try:
        procs.node(mosquitto, prefix, "n1")
        procs.node(mosquitto, prefix, "n2")
        wait_for(lambda: all(coordinator.state(n) == "online" for n in ("n1", "n2")), "online")
        deploy(mosquitto, prefix, str(DIGITS / "service.yaml"))
        ready_on(obs, prefix, "digits", 2)
        obs.close()
        registry = coordinator.agent.registry
        before = {n: registry.nodes[n].session for n in ("n1", "n2")}
        mosquitto.restart()  # Mosquitto publishes the Wills of its clients as it stops
        obs = Observer(mosquitto, prefix)

        def whole_again() -> bool:
            with coordinator.agent._lock:
                nodes = [registry.nodes[n] for n in ("n1", "n2")]
                back = all(r.state == "online" and r.session != before[r.id] for r in nodes)
                svc = coordinator.agent.provisioner.services.get("digits")
                placed = svc is not None and all(
                    svc.replicas.get(n) and svc.replicas[n].state == "ready" for n in before
                )
                rec = registry.services.get("digits")
                shown = rec and rec.status and rec.status.ready_nodes() == ["n1", "n2"]
            return bool(back and placed and shown)

        wait_for(whole_again, "digits whole again after the restart")
        images, _labels = digits_test_set()
        req = Requester(mosquitto, prefix, "digits")
        try:
            results = req.run({f"after-{i}": png(images[i]) for i in range(30)}, timeout=60)
        finally:
            req.close()
        assert all(r["ok"] for r in results.values())
        assert {r["node"] for r in results.values()} == {"n1", "n2"}
        logs = "".join(p.log() for p in procs.all)
        assert logs.count("serving digits") == 2, "deployed again after the restart"
    finally:
        obs.close()
        coordinator.shutdown()


def test_statuses_are_believed_again_after_the_coordinator_reconnects(
    broker: Broker, prefix: str, procs: Procs
) -> None:
    """[T-STATUS-2] The coordinator's connection drops while the node's stays up: it comes
    back in a new session with nothing changed, and publishes its statuses again under that
    session. A reader believes only the current session's statuses: before, `mqinfer
    status` showed the service 'unknown' until something about it changed."""
    proxy = CuttingProxy(broker.port)
    coordinator = start_coordinator(broker, prefix, url=proxy.url)
    try:
        procs.node(broker, prefix, "n1")
        wait_for(lambda: coordinator.state("n1") == "online", "n1 online")
        deploy(broker, prefix, "--model", str(DIGITS / "digits_int8.tflite"), "--name", "digits")
        before = coordinator.agent.session
        proxy.cut()
        wait_for(lambda: coordinator.agent.session != before, "the coordinator back", 60)

        def believed() -> dict[str, Any] | None:
            view = status_json(broker, prefix)
            if (view["coordinator"] or {}).get("session") != coordinator.agent.session:
                return None  # its new state not read yet: the old statuses still count
            return view

        view = wait_for(believed, "the coordinator's new session in mqinfer status")
        [svc] = view["services"]
        assert (svc["name"], svc["state"]) == ("digits", "ready"), svc
        assert [r["node"] for r in svc["replicas"]] == ["n1"]
        assert proxy.cuts == 1
    finally:
        coordinator.shutdown()
        proxy.close()


def test_a_deploy_cut_off_in_its_upload_connects_again_and_finishes(
    broker: Broker, prefix: str, procs: Procs, coordinator: InProcessCoordinator
) -> None:
    """A broker that drops the deploy's connection in the middle of the upload (a NATS
    cluster does, under load) costs a reconnect: the upload runs again, and the node gets
    the model whole."""
    procs.node(broker, prefix, "n1")
    wait_for(lambda: coordinator.state("n1") == "online", "n1 online")
    model = MOBILENET.read_bytes()
    proxy = CuttingProxy(broker.port)
    proxy.cut_after(len(model) // 4)
    try:
        out = mqinfer(
            "deploy",
            *("--model", str(MOBILENET), "--name", "mnv2", "--replicas", "1"),
            *("--broker", proxy.url, "--prefix", prefix, "--wait", "--timeout", "90"),
        )
    finally:
        proxy.close()
    assert out.returncode == 0, out.stdout + out.stderr
    assert proxy.cuts == 1
    assert "; connecting again (1 of 5)" in out.stderr, out.stderr
    assert "(2 of 5)" not in out.stderr, out.stderr
    assert out.stdout == "service mnv2: ready on n1\n"
    sha = hashlib.sha256(model).hexdigest()
    cached = list((procs.tmp_path / "cache-n1").glob(f"{sha}*"))
    assert [hashlib.sha256(p.read_bytes()).hexdigest() for p in cached] == [sha]


def test_deploy_wait_follows_the_status_across_a_reconnect(
    broker: Broker, prefix: str, procs: Procs
) -> None:
    """The connection of `deploy --wait` is dropped while it waits for the status: it
    connects again and still sees the service become ready. The coordinator starts only
    after the cut, so the status cannot have come before it."""
    procs.node(broker, prefix, "n1")
    proxy = CuttingProxy(broker.port)
    deploying = mqinfer_started(
        *("deploy", "--model", str(DIGITS / "digits_int8.tflite"), "--name", "digits"),
        *(
            "--replicas",
            "1",
            "--broker",
            proxy.url,
            "--prefix",
            prefix,
            "--wait",
            "--timeout",
            "90",
        ),
    )
    coordinator = None
    try:
        assert deploying.stderr is not None
        before = [deploying.stderr.readline() for _ in range(2)]
        assert before[1].startswith("service digits: spec published"), before
        proxy.cut()
        coordinator = start_coordinator(broker, prefix)
        out, err = deploying.communicate(timeout=120)
    finally:
        deploying.kill()
        proxy.close()
        if coordinator is not None:
            coordinator.shutdown()
    assert deploying.returncode == 0, out + err
    assert "; connecting again (1 of 5)" in err, err
    assert out == "service digits: ready on n1\n"


def test_infer_cut_off_before_its_results_sends_again_and_none_is_served_twice(
    broker: Broker,
    prefix: str,
    procs: Procs,
    coordinator: InProcessCoordinator,
    observer: Observer,
    tmp_path: Path,
) -> None:
    """[T-REQ-4] `mqinfer infer` loses its connection after its requests reached the hub
    and before their results came (the node is stopped meanwhile): it connects again and
    sends each request again under its id. Each is answered with the model's own output,
    and the hub counts every copy sent again as a repeat: none is served twice."""
    node = procs.node(broker, prefix, "n1")
    wait_for(lambda: coordinator.state("n1") == "online", "n1 online")
    digits = ("--model", str(DIGITS / "digits_int8.tflite"), "--name", "digits")
    deploy(broker, prefix, *digits, "--replicas", "1")
    ready_on(observer, prefix, "digits", 1)
    images, _ = digits_test_set()
    files = []
    for i in range(8):
        files.append(tmp_path / f"d{i}.png")
        files[-1].write_bytes(png(images[i]))
    under = Topics(prefix).service_request("digits") + "/"

    def requests_seen() -> int:
        with observer.lock:
            return sum(topic.startswith(under) for topic, _, _ in observer.log)

    node.signal(signal.SIGSTOP)
    proxy = CuttingProxy(broker.port)
    inferring = mqinfer_started(
        *("infer", "digits", *map(str, files), "--json"),
        *("--broker", proxy.url, "--prefix", prefix, "--timeout", "60"),
    )
    try:
        wait_for(lambda: requests_seen() == len(files), "the requests on the broker")
        proxy.cut()
        node.signal(signal.SIGCONT)
        out, err = inferring.communicate(timeout=120)
    finally:
        node.signal(signal.SIGCONT)
        inferring.kill()
        proxy.close()
    assert inferring.returncode == 0, out + err
    assert "; connecting again (1 of 5)" in err, err
    assert requests_seen() == 2 * len(files)
    results = [orjson.loads(line) for line in out.splitlines()]
    assert [r["file"] for r in results] == list(map(str, files))
    got = np.array([r["outputs"][0]["values"] for r in results]).reshape(len(files), -1)
    expected = direct("digits_int8.tflite", images[: len(files)])
    np.testing.assert_array_equal(got.astype(expected.dtype), expected)
    assert coordinator.agent.dispatcher.counters.repeats == len(files)
