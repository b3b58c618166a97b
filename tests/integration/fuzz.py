"""Seeded hostile messages for every topic an mqinfer component reads.

`messages(seed, count, prefix, ...)` yields (kind, topic, payload, qos, retain): malformed
and hostile payloads for requests (decompression bombs, huge .npy headers, deep JSON),
node commands, service specs, artifact metas and chunks, node announcements, statuses,
coordinator topics, work and answers, and topics outside the tree. Valid-looking
messages name only made-up nodes and services, so what a real node serves stays its own;
messages for real nodes and services are malformed or forged in ways the contract says
are dropped or corrected.
"""

from __future__ import annotations

import io
import json
import random
import struct
import zlib
from collections.abc import Callable, Iterator

import numpy as np
from PIL import Image

from mqinfer.protocol.topics import Topics

Message = tuple[str, str, bytes, int, bool]  # kind, topic, payload, qos, retain


def _dumps(value: object) -> bytes:
    """JSON as a hostile sender writes it: integers beyond 64 bits included."""
    return json.dumps(value).encode()


def _png(width: int, height: int, rng: random.Random) -> bytes:
    out = io.BytesIO()
    pixels = np.frombuffer(rng.randbytes(width * height), dtype=np.uint8).reshape(height, width)
    Image.fromarray(pixels, mode="L").save(out, format="PNG")
    return out.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` 8-bit gray pixels, with a few rows."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\0" * 4096)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", rows) + _chunk(b"IEND", b"")
    )


def _png_bomb() -> bytes:
    """A real 6000 x 6000 PNG of zeros: 36 MB of pixels in about 35 KB."""
    ihdr = struct.pack(">IIBBBBB", 6000, 6000, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\0" * (6001 * 6000), 9)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", rows) + _chunk(b"IEND", b"")
    )


def _npy(header: str, body: bytes = b"\0" * 64) -> bytes:
    raw = header.encode()
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(raw)) + raw + body


def _deep(depth: int) -> bytes:
    return b'{"inputs":' + b"[" * depth + b"0" + b"]" * depth + b"}"


class Fuzzer:
    def __init__(self, seed: int, prefix: str, nodes: list[str], services: list[str]) -> None:
        self.rng = random.Random(seed)
        self.t = Topics(prefix)
        self.prefix = prefix
        self.nodes = nodes
        self.services = services
        self.bomb = _png_bomb()
        self.real_png = _png(8, 8, self.rng)
        self.valid_specs = 0

    # ---- pieces ----------------------------------------------------------------------

    def fake_id(self) -> str:
        return f"fz{self.rng.randrange(10**6)}"

    def hostile_id(self) -> str:
        return self.rng.choice(
            ["..", "a" * 65, "-x", "x y", "ünï", "x\u0000y", "$SYS", "x.y", "CON", "_"]
        )

    def node(self, real: bool) -> str:
        return self.rng.choice(self.nodes) if real else self.fake_id()

    def junk(self) -> bytes:
        r = self.rng
        return r.choice(
            [
                b"",
                r.randbytes(r.randrange(1, 400)),
                b"{",
                b"null",
                b"[]",
                b'"x"',
                b"1e309",
                b'{"v":99}',
                b'{"v":1}',
                b"\xff\xfe\x00",
                _deep(r.choice([50, 5000, 20000])),
                _dumps({"v": 1, "x": "y" * r.randrange(10, 100_000)}),
            ]
        )

    def spec(self, name: str) -> dict[str, object]:
        r = self.rng
        spec: dict[str, object] = {
            "v": 1,
            "name": name,
            "model": r.choice(["m.tflite", "../../etc/passwd", "x" * 300]),
            "artifact": r.choice(
                ["0" * 64, "/etc/passwd", "../x", "g" * 64, r.randbytes(32).hex()]
            ),
            "format": r.choice(["tflite", "onnx", "exe", ""]),
            "size": r.choice([1, -1, 10**15, 2**63]),
            "replicas": r.choice([1, 0, -1, 10**6]),
            "workers": r.choice([1, 0, 10**6]),
            "queue": r.choice([1, 10**9]),
        }
        return spec

    # ---- kinds -----------------------------------------------------------------------

    def request(self) -> Message:
        r, t = self.rng, self.t
        service = r.choice([*self.services, self.fake_id()])
        topic = r.choice([t.service_request(service), t.service_request(service, self.fake_id())])
        payload = r.choice(
            [
                lambda: r.randbytes(r.randrange(0, 3000)),
                lambda: self.real_png[: r.randrange(1, len(self.real_png))],
                lambda: _png_claiming(r.choice([70000, 30000, 1]), r.choice([70000, 1])),
                lambda: self.bomb,
                lambda: _npy(
                    "{'descr': '<f4', 'fortran_order': False, 'shape': (100000, 100000), }"
                ),
                lambda: _npy("{'descr': '<f4', 'fortran_order': False, 'shape': (1, 8, 8, 1), }"),
                lambda: _npy("{'descr': 'O', 'fortran_order': False, 'shape': (1,), }"),
                lambda: _npy("x" * 60000),
                lambda: b"\x93NUMPY\x03\x00\xff\xff\xff\x7f",
                lambda: _deep(r.choice([10, 1000, 30000])),
                lambda: _dumps({"inputs": [[[[1] * 8] * 8]], "quantized": r.choice([1, "y"])}),
                lambda: _dumps({"inputs": [[0.5] * 64], "deadline_ms": r.choice([-1, 1e308])}),
                lambda: _dumps({"inputs": "x", "request_id": "../../etc"}),
                lambda: _dumps({"inputs": [[1e308] * 64] * r.choice([1, 5000])}),
                self.junk,
            ]
        )()
        return ("request", topic, payload, r.choice([0, 1]), False)

    def command(self) -> Message:
        r = self.rng
        node = self.node(real=r.random() < 0.8)
        op = r.choice(["deploy", "undeploy", "reload", "x" * 100, ""])
        args: object = r.choice(
            [
                {"spec": self.spec(self.fake_id())},
                {"service": self.fake_id()},
                {"service": self.hostile_id()},
                {"spec": "x"},
                None,
                [1, 2],
            ]
        )
        cmd_id = r.choice([self.fake_id(), self.hostile_id(), 7])
        payload = r.choice(
            [lambda: _dumps({"v": 1, "id": cmd_id, "op": op, "args": args}), self.junk]
        )()
        return ("command", self.t.node_cmd(node), payload, 1, False)

    def spec_message(self) -> Message:
        r = self.rng
        name = self.fake_id()
        if r.random() < 0.05 and self.valid_specs < 10:  # a few that decode: missing models
            self.valid_specs += 1
            body = {
                "v": 1,
                "name": name,
                "model": "m.tflite",
                "artifact": r.randbytes(32).hex(),
                "format": "tflite",
                "size": 1000,
            }
            return ("spec", self.t.service_spec(name), _dumps(body), 1, True)
        payload = r.choice([lambda: _dumps(self.spec(name)), self.junk])()
        return ("spec", self.t.service_spec(name), payload, 1, r.random() < 0.5)

    def artifact(self) -> Message:
        r = self.rng
        sha = r.randbytes(32).hex()
        if r.random() < 0.5:
            meta = {
                "v": 1,
                "sha256": r.choice([sha, "0" * 64]),
                "size": r.choice([10, 10**13, -5, 2**70]),
                "chunks": r.choice([1, 10**10, 0, -1]),
                "chunk_size": r.choice([1, 10**12, 0]),
                "format": "tflite",
            }
            payload = r.choice([lambda: _dumps(meta), self.junk])()
            return ("artifact", self.t.artifact_meta(sha), payload, 1, r.random() < 0.5)
        chunk = r.choice([0, 1, 10**6])
        return (
            "artifact",
            self.t.artifact_chunk(sha, chunk),
            r.randbytes(r.randrange(0, 5000)),
            1,
            False,
        )

    def node_topic(self) -> Message:
        r, t = self.rng, self.t
        real = r.random() < 0.3
        node = self.node(real)
        topic = r.choice(
            [t.node_caps(node), t.node_state(node), t.node_heartbeat(node), t.node_reply(node)]
        )
        if real:
            payload = self.junk()  # malformed: the real node's own messages stay its own
        else:
            payload = r.choice(
                [
                    self.junk,
                    lambda: _dumps(
                        {
                            "v": 1,
                            "node": node,
                            "state": r.choice(["online", "lost", "x"]),
                            "session": r.choice([1, 2**62, -1]),
                        }
                    ),
                    lambda: _dumps(
                        {
                            "v": 1,
                            "node": node,
                            "session": 2**62,
                            "seq": 1,
                            "ts": 0,
                            "interval": r.choice([1, 0, 1e9]),
                            "uptime": 0,
                            "load": [0, 0, 0],
                            "memory_available_mb": 1,
                            "services": {"digits": "ready"},
                        }
                    ),
                ]
            )()
        return ("node", topic, payload, r.choice([0, 1]), r.random() < 0.3)

    def work_or_answer(self) -> Message:
        r, t = self.rng, self.t
        node = self.node(real=r.random() < 0.7)
        header = _dumps(
            {
                "job": r.choice([f"{r.randrange(10**9)}-{r.randrange(99)}", "x" * 200, ""]),
                "service": r.choice([*self.services, self.fake_id()]),
                "kind": r.choice(["request", "tensors", "result", "released", "x"]),
                "lease_ms": r.choice([1, 1e12, -1]),
                "deadline_ms": 1000,
                "request_id": r.choice(["r1", self.hostile_id()]),
                "id_fixed": True,
                "ok": True,
            }
        )
        magic = r.choice([b"MQW1", b"MQA1", b"XXXX"])
        length = r.choice([len(header), 2**31, 0, len(header) + 5])
        body = r.choice([self.real_png, b"", r.randbytes(100), b'{"v":1,"ok":true}'])
        payload = r.choice([magic + struct.pack("<I", length) + header + body, self.junk()])
        topic = r.choice([t.node_work(node), t.node_answer(node)])
        return ("work", topic, payload, 1, False)

    def status_or_coordinator(self) -> Message:
        r, t = self.rng, self.t
        service = r.choice([*self.services, self.fake_id()])
        forged = {
            "v": 1,
            "name": service,
            "state": "ready",
            "session": r.choice([1, 2**62]),
            "replicas": [{"node": "ghost", "state": "ready"}],
        }
        topic, payload = r.choice(
            [
                (t.service_status(service), _dumps(forged)),
                (t.service_status(service), self.junk()),
                (t.coordinator_state(), self.junk()),
                (t.coordinator_heartbeat(), self.junk()),
            ]
        )
        return ("status", topic, payload, 1, r.random() < 0.5)

    def bad_topic(self) -> Message:
        r, p = self.rng, self.prefix
        topic = r.choice(
            [
                f"{p}/nodes",
                f"{p}/nodes/{self.hostile_id()}/cmd",
                f"{p}/services/{self.hostile_id()}/request",
                f"{p}/services/x/request/a/b/c",
                f"{p}/unknown/thing",
                f"{p}/" + "/".join(["x"] * 150),
                f"{p}/services/" + "y" * 5000 + "/request",
                f"{p}/artifacts/{'0' * 63}/meta",
                f"{p}/artifacts/{'0' * 64}/chunk/-1",
            ]
        )
        return ("bad_topic", topic, self.junk(), r.choice([0, 1]), False)

    def messages(self, count: int) -> Iterator[Message]:
        kinds: list[tuple[float, Callable[[], Message]]] = [
            (0.35, self.request),
            (0.12, self.command),
            (0.08, self.spec_message),
            (0.10, self.artifact),
            (0.12, self.node_topic),
            (0.10, self.work_or_answer),
            (0.05, self.status_or_coordinator),
            (0.08, self.bad_topic),
        ]
        weights = [w for w, _ in kinds]
        for _ in range(count):
            [(_, make)] = self.rng.choices(kinds, weights)
            yield make()
