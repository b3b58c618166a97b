"""The baseline mqinfer's latency is compared with: the node someone would write by hand with
paho-mqtt, Pillow and LiteRT, and nothing else.

    python -m bench.handwritten --broker HOST:PORT --model models/digits/digits_int8.tflite \\
        --request-topic 'b1/mqinfer/services/digits/request/+' \\
        --result-topic 'b1/mqinfer/services/digits/result/+'

It subscribes to one request topic at QoS 1 and, for each message, on paho's network thread:
takes the payload as the raw input tensor if it has exactly the input's size in bytes
(a MobileNetV2 uint8 frame), else decodes it as an image with Pillow and preprocesses it
as the model's manifest (the .json beside the .tflite file) says; runs the model with one
interpreter thread; publishes an orjson result at QoS 1. The levels the request topic's
wildcards matched fill the result topic's wildcards, in order: a request on
.../request/r7 is answered on .../result/r7. The result carries what mqinfer's does:
request id, the outputs with dequantized values, the top 5 and the timing. It prints
`ready` once its subscription is acknowledged, and stops on SIGTERM or SIGINT.

No presence, no queues, no worker threads, no error topics beyond a failed result: what it
costs is the floor under a node that runs a model for MQTT requests.
"""

from __future__ import annotations

import argparse
import io
import json
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import orjson
import paho.mqtt.client as mqtt
from ai_edge_litert.interpreter import Interpreter
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from PIL import Image

TOP = 5


@dataclass(frozen=True)
class Prep:
    """The manifest's preprocessing: image mode, (width, height), raw pixels or
    (pixel - mean) / std then quantized to the input."""

    mode: str
    size: tuple[int, int]
    pixels: bool
    mean: float
    std: float


class Runner:
    """One model: its interpreter (one thread), its manifest's preprocessing and labels."""

    def __init__(self, path: Path, threads: int = 1) -> None:
        manifest_path = path.with_suffix(".json")
        if not manifest_path.exists():
            raise SystemExit(f"no manifest {manifest_path} beside the model")
        manifest = json.loads(manifest_path.read_text())
        p = manifest["preprocessing"]
        if p.get("layout", "NHWC") != "NHWC":
            raise SystemExit(f"{manifest_path}: only NHWC inputs are handled here")
        self.prep = Prep(p["mode"], (p["size"][0], p["size"][1]), p["pixels"], p["mean"], p["std"])
        self.labels: list[str] = manifest.get("labels") or []
        self.interpreter = Interpreter(model_path=str(path), num_threads=threads)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self.dtype = np.dtype(self.input["dtype"])
        self.shape = tuple(int(d) for d in self.input["shape"])
        self.raw_bytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self.run(np.zeros(self.shape, self.dtype))  # warm-up

    def tensor(self, payload: bytes | bytearray) -> np.ndarray:
        """The input tensor for one request: raw bytes as they are, or a decoded image."""
        if len(payload) == self.raw_bytes:
            return np.frombuffer(payload, self.dtype).reshape(self.shape)
        image: Image.Image = Image.open(io.BytesIO(payload))
        if image.mode != self.prep.mode:
            image = image.convert(self.prep.mode)
        if image.size != self.prep.size:
            image = image.resize(self.prep.size, Image.Resampling.BILINEAR)
        pixels = np.asarray(image, dtype=np.uint8).reshape(self.shape)
        if self.prep.pixels:
            return pixels
        values = (pixels.astype(np.float64) - self.prep.mean) / self.prep.std
        if self.dtype.kind == "f":
            return values.astype(self.dtype)
        scale, zero_point = self.input["quantization"]
        q = np.round(values / scale) + zero_point
        info = np.iinfo(self.dtype)
        quantized: np.ndarray = np.clip(q, info.min, info.max).astype(self.dtype)
        return quantized

    def run(self, tensor: np.ndarray) -> np.ndarray:
        self.interpreter.set_tensor(self.input["index"], tensor)
        self.interpreter.invoke()
        output: np.ndarray = self.interpreter.get_tensor(self.output["index"])
        return output

    def result(self, request_id: str, output: np.ndarray, timing: dict[str, float]) -> bytes:
        """The result JSON: outputs (values and dequantized), top 5, timing."""
        scale, zero_point = self.output["quantization"]
        scores = (output.astype(np.float64) - zero_point) * scale if scale else output
        row = scores.reshape(-1)
        best = np.argsort(-row, kind="stable")[:TOP]
        top = [
            {
                "index": int(i),
                "label": self.labels[i] if i < len(self.labels) else str(i),
                "score": float(row[i]),
            }
            for i in best
        ]
        out = {"name": self.output["name"], "values": output, "dequantized": scores}
        return orjson.dumps(
            {"request_id": request_id, "ok": True, "outputs": [out], "top": top, "timing": timing},
            option=orjson.OPT_SERIALIZE_NUMPY,
        )


def result_topic(pattern: str, result: str, topic: str) -> str:
    """`result` with its wildcards filled by the levels that `pattern`'s wildcards matched
    in `topic` (`+` one level, `#` the rest)."""
    matched: list[str] = []
    levels = topic.split("/")
    for i, level in enumerate(pattern.split("/")):
        if level == "#":
            matched.append("/".join(levels[i:]))
            break
        if level == "+":
            matched.append(levels[i])
    filled = []
    for level in result.split("/"):
        if level in ("+", "#"):
            filled.append(matched.pop(0) if matched else "")
        else:
            filled.append(level)
    return "/".join(filled)


def _nodelay(_c: mqtt.Client, _u: Any, sock: Any) -> None:
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def serve(host: str, port: int, runner: Runner, request: str, result: str) -> None:
    """Connect, subscribe, and answer every request until SIGTERM/SIGINT."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.on_socket_open = _nodelay

    def on_connect(c: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Properties | None) -> None:
        if rc.is_failure:
            print(f"connect refused: {rc}", file=sys.stderr, flush=True)
            c.disconnect()
            return
        c.subscribe(request, qos=1)

    def on_subscribe(
        _c: mqtt.Client, _u: Any, _m: int, codes: list[ReasonCode], _p: Properties | None
    ) -> None:
        if any(code.is_failure for code in codes):
            print(f"subscription to {request} refused", file=sys.stderr, flush=True)
        else:
            print("ready", flush=True)

    def on_message(c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        received = time.perf_counter()
        request_id = msg.topic.rsplit("/", 1)[1]
        try:
            tensor = runner.tensor(msg.payload)
            start = time.perf_counter()
            output = runner.run(tensor)
            ran = time.perf_counter()
        except Exception as e:  # a bad payload gets a failed result; the node goes on
            body = orjson.dumps(
                {"request_id": request_id, "ok": False, "error": {"message": repr(e)[:300]}}
            )
        else:
            timing = {
                "inference_ms": round((ran - start) * 1000, 3),
                "total_ms": round((time.perf_counter() - received) * 1000, 3),
            }
            body = runner.result(request_id, output, timing)
        c.publish(result_topic(request, result, msg.topic), body, qos=1)

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message

    def stop(_sig: int, _frame: FrameType | None) -> None:
        client.disconnect()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    client.connect(host, port)
    client.loop_forever(retry_first_connection=False)


def parse_broker(text: str) -> tuple[str, int]:
    """HOST:PORT or mqtt://HOST:PORT."""
    text = text.removeprefix("mqtt://")
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.handwritten",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--broker", type=parse_broker, required=True, help="HOST:PORT")
    p.add_argument("--model", type=Path, required=True, help="a .tflite file with its .json")
    p.add_argument("--request-topic", required=True, help="may end in + (the request id)")
    p.add_argument("--result-topic", required=True, help="its wildcards take the request's")
    p.add_argument("--threads", type=int, default=1, help="interpreter threads")
    args = p.parse_args(argv)
    host, port = args.broker
    serve(host, port, Runner(args.model, args.threads), args.request_topic, args.result_topic)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
