"""What a sensor or a test script does: plain paho clients sending requests and reading
results, and direct runs of the committed models to compare against."""

from __future__ import annotations

import io
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from PIL import Image

from mqinfer.protocol.topics import Topics
from tests.integration.harness import Broker, wait_for

REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO / "models" / "digits"


def digits_test_set() -> tuple[np.ndarray, np.ndarray]:
    data = np.load(DIGITS / "digits_test.npz")
    return data["images"], data["labels"]


def png(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image.astype(np.uint8), mode="L").save(out, format="PNG")
    return out.getvalue()


def direct(model: str, images: np.ndarray) -> np.ndarray:
    """Each image run through the committed model by the runtime itself, preprocessed as
    its manifest says (written out here, independently of mqinfer's codec)."""
    path = str(DIGITS / model)
    outs = []
    if model.endswith(".onnx"):
        import onnxruntime as ort

        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        for img in images:
            x = (img.astype(np.float32) / 255.0).reshape(1, 1, 8, 8)
            outs.append(sess.run(None, {name: x})[0])
        return np.concatenate(outs)
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=path)
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    for img in images:
        if inp["dtype"] == np.int8:
            x = (img.astype(np.int16) - 128).astype(np.int8).reshape(1, 8, 8, 1)
        else:
            x = (img.astype(np.float32) / 255.0).reshape(1, 8, 8, 1)
        it.set_tensor(inp["index"], x)
        it.invoke()
        outs.append(it.get_tensor(out["index"]).copy())
    return np.concatenate(outs)


def mqinfer(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mqinfer", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def mqinfer_started(*args: str) -> subprocess.Popen[str]:
    """`mqinfer ARGS` running, its output piped, for a test that acts while it runs."""
    return subprocess.Popen(
        [sys.executable, "-m", "mqinfer", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


def deploy(broker: Broker, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`mqinfer deploy ... --wait` as a user runs it; the test fails unless it is ready."""
    out = mqinfer(
        "deploy", *args, "--wait", "--timeout", "90", "--broker", broker.url, "--prefix", prefix
    )
    assert out.returncode == 0, f"deploy failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    return out


class Requester:
    """Sends requests on services/{service}/request/{id} and collects every result, so a
    duplicate would show up as a second result for the same id."""

    def __init__(self, broker: Broker, prefix: str, service: str, port: int | None = None) -> None:
        """Requests through `broker` (or the broker on `port`: a cluster member, a site)."""
        self.topics = Topics(prefix)
        self.service = service
        self.lock = threading.Lock()
        self.results: dict[str, list[dict[str, Any]]] = {}
        # A session the broker keeps: results published while it reconnects (after a broker
        # restart) wait for it, as they would for a requester that cares about them.
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"requester-{uuid.uuid4().hex[:12]}",
            protocol=mqtt.MQTTv311,
            clean_session=False,
        )
        self.client.on_message = self._on_message
        self._granted = threading.Event()
        self._refused: list[str] = []
        self.client.on_subscribe = self._on_subscribe
        # Subscribed on every connect: paho reconnects by itself (after a broker restart).
        self.client.on_connect = lambda c, *a: self._subscribe()
        self.client.connect("127.0.0.1", port or broker.port)
        self.client.loop_start()
        # A NATS cluster refuses a QoS 1 SUBSCRIBE whose JetStream consumer takes over 4 s
        # to create (under load): subscribe again until it is granted.
        deadline = time.monotonic() + 60
        while not self._granted.wait(1.0):
            assert time.monotonic() < deadline, f"requester: no SUBACK granted: {self._refused}"
            if self._refused:
                self._refused.clear()
                self._subscribe()

    def _subscribe(self) -> None:
        self.client.subscribe(self.topics.service_result(self.service) + "/+", qos=1)

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, reasons: list[Any], _p: Any) -> None:
        if reasons and reasons[0].is_failure:
            self._refused.append(str(reasons[0]))
        else:
            self._granted.set()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        base = self.topics.service_result(self.service) + "/"
        if not msg.topic.startswith(base):
            return  # amqtt also sends retained messages matching *other* clients' filters
        rid = msg.topic[len(base) :]
        with self.lock:
            self.results.setdefault(rid, []).append(orjson.loads(msg.payload))

    def send(self, rid: str, payload: bytes) -> None:
        self.client.publish(self.topics.service_request(self.service, rid), payload, qos=1)

    def count(self) -> int:
        with self.lock:
            return len(self.results)

    def run(
        self, payloads: dict[str, bytes], window: int = 16, timeout: float = 60
    ) -> dict[str, dict[str, Any]]:
        """Send all, at most `window` unanswered at a time; return the one result per id."""
        ids = list(payloads)
        sent = 0
        deadline = time.monotonic() + timeout
        while self.count_of(ids) < len(ids):
            while sent < len(ids) and sent - self.count_of(ids) < window:
                self.send(ids[sent], payloads[ids[sent]])
                sent += 1
            assert time.monotonic() < deadline, f"{self.count_of(ids)} of {len(ids)} results"
            time.sleep(0.002)
        return self.single(ids)

    def count_of(self, ids: list[str]) -> int:
        with self.lock:
            return sum(1 for i in ids if i in self.results)

    def single(self, ids: list[str], settle: float = 0.5) -> dict[str, dict[str, Any]]:
        """The result of each id, after checking (for `settle` s more) that none has two."""
        time.sleep(settle)
        with self.lock:
            doubles = {
                i: [(r.get("node"), r.get("ok"), r.get("timing")) for r in self.results[i]]
                for i in ids
                if len(self.results.get(i, [])) > 1
            }
            assert not doubles, f"requests answered more than once: {doubles}"
            return {i: self.results[i][0] for i in ids}

    def wait(self, rid: str, timeout: float = 30) -> dict[str, Any]:
        wait_for(lambda: rid in self.results, f"a result for {rid}", timeout)
        with self.lock:
            return self.results[rid][0]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def predictions(results: dict[str, dict[str, Any]], ids: list[str]) -> np.ndarray:
    """The output tensor of each result, in the order of `ids`."""
    return np.concatenate([np.array(results[i]["outputs"][0]["values"]) for i in ids])
