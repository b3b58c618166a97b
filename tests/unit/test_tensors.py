"""The binary encoding of the tensors a pipeline stage passes on."""

from __future__ import annotations

import struct

import numpy as np
import orjson
import pytest

from mqinfer.protocol import tensors
from mqinfer.protocol.errors import Code, ProtocolError
from mqinfer.protocol.manifest import Quantization, TensorInfo


def message(*arrays: np.ndarray) -> tensors.Tensors:
    infos = [
        TensorInfo(
            name=f"t{i}",
            dtype=a.dtype.name,
            shape=list(a.shape),
            quantization=Quantization(scale=0.5, zero_point=-3) if a.dtype == np.int8 else None,
        )
        for i, a in enumerate(arrays)
    ]
    return list(zip(infos, arrays, strict=True))


def test_round_trip_keeps_every_tensor_bit_for_bit() -> None:
    rng = np.random.default_rng(1)
    a = rng.integers(-128, 128, (1, 14, 14, 64), dtype=np.int8)
    b = rng.standard_normal((1, 7, 7, 3)).astype(np.float32)
    c = np.arange(5, dtype=np.int64)
    got = tensors.decode(tensors.encode(message(a, b, c)))
    assert [x.tobytes() for _, x in got] == [a.tobytes(), b.tobytes(), c.tobytes()]
    assert [x.shape for _, x in got] == [a.shape, b.shape, c.shape]
    assert got[0][0].quantization == Quantization(scale=0.5, zero_point=-3)


def test_tensor_bytes_are_raw_not_json() -> None:
    a = np.zeros((1, 14, 14, 64), np.int8)
    payload = tensors.encode(message(a))
    (header_len,) = struct.unpack_from("<I", payload, 4)
    assert len(payload) == 8 + header_len + a.nbytes
    assert header_len < 200  # one tensor's description


def test_match_orders_tensors_by_name() -> None:
    a, b = np.zeros((1, 2), np.float32), np.ones((1, 3), np.float32)
    got = tensors.decode(tensors.encode(message(a, b)))
    want = [
        TensorInfo(name="t1", dtype="float32", shape=[1, 3]),
        TensorInfo(name="t0", dtype="float32", shape=[-1, 2]),
    ]
    x, y = tensors.match(got, want)
    assert x.shape == (1, 3) and y.shape == (1, 2)


@pytest.mark.parametrize(
    ("want", "why"),
    [
        (TensorInfo(name="other", dtype="float32", shape=[1, 2]), "no tensor named 'other'"),
        (TensorInfo(name="t0", dtype="int8", shape=[1, 2]), "expected int8 \\[1, 2\\]"),
        (TensorInfo(name="t0", dtype="float32", shape=[1, 3]), "is float32 \\[1, 2\\]"),
    ],
)
def test_match_refuses_a_tensor_the_segment_cannot_take(want: TensorInfo, why: str) -> None:
    got = tensors.decode(tensors.encode(message(np.zeros((1, 2), np.float32))))
    with pytest.raises(ProtocolError, match=why) as e:
        tensors.match(got, [want])
    assert e.value.code is Code.BAD_TENSOR


def _header(payload: bytes) -> dict[str, object]:
    (n,) = struct.unpack_from("<I", payload, 4)
    value = orjson.loads(payload[8 : 8 + n])
    assert isinstance(value, dict)
    return value


def _with_header(payload: bytes, header: dict[str, object]) -> bytes:
    (n,) = struct.unpack_from("<I", payload, 4)
    raw = orjson.dumps(header)
    return payload[:4] + struct.pack("<I", len(raw)) + raw + payload[8 + n :]


GOOD = tensors.encode(message(np.zeros((1, 4), np.float32)))


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (b"", "expected the magic bytes"),
        (b"\x89PNG\r\n\x1a\n....", "expected the magic bytes"),
        (GOOD[:-1], "needs 16 bytes; only 15 are left"),
        (GOOD + b"x", "1 bytes follow the last tensor"),
        (GOOD[:8] + b"x" + GOOD[9:], "header is not JSON"),
        (b"MQT2" + struct.pack("<I", 10**6) + b"{}", "header length 1000000"),
        (_with_header(GOOD, {"tensors": []}), "'tensors' must be a list of 1-64"),
        (_with_header(GOOD, {"tensors": [{"name": "t0"}] * 65}), "'tensors' must be a list"),
        (
            _with_header(
                GOOD,
                {**_header(GOOD), "tensors": [{"name": "t0", "dtype": "object", "shape": [1, 4]}]},
            ),
            "dtype 'object' is not one of",
        ),
        (
            _with_header(
                GOOD,
                {**_header(GOOD), "tensors": [{"name": "t0", "dtype": "float32", "shape": [-1]}]},
            ),
            "shape must be a list of up to 8 sizes",
        ),
    ],
)
def test_malformed_messages_are_refused_with_what_was_wrong(payload: bytes, why: str) -> None:
    with pytest.raises(ProtocolError, match=why) as e:
        tensors.decode(payload)
    assert e.value.code is Code.BAD_TENSOR
