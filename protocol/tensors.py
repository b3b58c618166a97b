"""The binary encoding of intermediate tensors on pipeline stage topics. No I/O.

A stage message carries the tensors that cross a cut plus what the next stage needs to
answer the caller as a whole-model service would ([T-PIPE-2] in topics.md):

    b"MQT1"                     4 bytes, magic and version
    header length               4 bytes, unsigned, little-endian
    header                      UTF-8 JSON object (below)
    tensor bytes                each tensor's raw bytes, C order, little-endian, back to back

The header is small JSON (a few hundred bytes); tensor data is never JSON or base64:

    {"request_id": "r1", "key": "<request key at the head>", "reply": "<result topic>",
     "correlation": "<hex of the MQTT 5 correlation data>" | null,
     "deadline_ms": 9871.5,            # what is left of the request's deadline when sent
     "trace": [{"stage": 0, "node": "a", "queue_ms": 0.1, "inference_ms": 4.2}],
     "tensors": [{"name": "x", "dtype": "int8", "shape": [1, 14, 14, 64],
                  "quantization": {"scale": 0.02, "zero_point": -3} | null}]}

The tensors follow in header order; their sizes follow from dtype and shape.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from mqinfer.protocol.errors import Code, ProtocolError
from mqinfer.protocol.manifest import TensorInfo

MAGIC = b"MQT1"
_LEN = struct.Struct("<I")
MAX_HEADER_BYTES = 64 * 1024
DTYPES = frozenset(
    {"float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool"}
)


@dataclass(frozen=True)
class StageMessage:
    request_id: str
    key: str  # the request's key at the head stage: the done notice names it
    reply: str  # topic the last stage answers on
    correlation: bytes | None
    deadline_ms: float  # left when the message was sent
    tensors: list[tuple[TensorInfo, np.ndarray]]
    trace: list[dict[str, Any]] = field(default_factory=list)


def _bad(message: str) -> ProtocolError:
    return ProtocolError(Code.BAD_TENSOR, message)


def encode(msg: StageMessage) -> bytes:
    infos: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for info, array in msg.tensors:
        a = np.ascontiguousarray(array)
        infos.append(
            {
                "name": info.name,
                "dtype": a.dtype.name,
                "shape": list(a.shape),
                "quantization": info.quantization.model_dump() if info.quantization else None,
            }
        )
        blobs.append(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())
    header = orjson.dumps(
        {
            "request_id": msg.request_id,
            "key": msg.key,
            "reply": msg.reply,
            "correlation": msg.correlation.hex() if msg.correlation is not None else None,
            "deadline_ms": round(msg.deadline_ms, 3),
            "trace": msg.trace,
            "tensors": infos,
        }
    )
    return b"".join([MAGIC, _LEN.pack(len(header)), header, *blobs])


def _str(header: dict[str, Any], name: str) -> str:
    value = header.get(name)
    if not isinstance(value, str) or not value:
        raise _bad(f"header field {name!r} must be a non-empty string, got {value!r}")
    return value


def decode(payload: bytes) -> StageMessage:
    """Read a stage message; raise ProtocolError(BAD_TENSOR) saying what is wrong."""
    if len(payload) < 8 or payload[:4] != MAGIC:
        raise _bad(
            f"not a stage tensor message: expected the magic bytes {MAGIC!r}, got "
            f"{payload[:4]!r} ({len(payload)} bytes)"
        )
    (size,) = _LEN.unpack_from(payload, 4)
    if size > MAX_HEADER_BYTES or 8 + size > len(payload):
        raise _bad(f"header length {size} does not fit a {len(payload)}-byte message")
    try:
        header = orjson.loads(payload[8 : 8 + size])
    except orjson.JSONDecodeError as e:
        raise _bad(f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise _bad("header must be a JSON object")
    deadline = header.get("deadline_ms")
    if not isinstance(deadline, int | float) or isinstance(deadline, bool):
        raise _bad(f"header field 'deadline_ms' must be a number, got {deadline!r}")
    correlation = header.get("correlation")
    try:
        corr = bytes.fromhex(correlation) if correlation is not None else None
    except (TypeError, ValueError):
        raise _bad(f"header field 'correlation' must be hex, got {correlation!r}") from None
    trace = header.get("trace", [])
    if not isinstance(trace, list):
        raise _bad("header field 'trace' must be a list")
    specs = header.get("tensors")
    if not isinstance(specs, list) or not specs:
        raise _bad("header field 'tensors' must be a non-empty list")
    tensors: list[tuple[TensorInfo, np.ndarray]] = []
    offset = 8 + size
    for i, spec in enumerate(specs):
        info = _tensor_info(i, spec)
        count = math.prod(info.shape)
        dtype = np.dtype(info.dtype).newbyteorder("<")
        end = offset + count * dtype.itemsize
        if end > len(payload):
            raise _bad(
                f"tensor {info.name!r} {info.dtype} {info.shape} needs "
                f"{count * dtype.itemsize} bytes; only {len(payload) - offset} are left"
            )
        array = np.frombuffer(payload, dtype, count, offset).reshape(info.shape)
        tensors.append((info, array.astype(array.dtype.newbyteorder("="), copy=False)))
        offset = end
    if offset != len(payload):
        raise _bad(f"{len(payload) - offset} bytes follow the last tensor; expected none")
    return StageMessage(
        request_id=_str(header, "request_id"),
        key=_str(header, "key"),
        reply=_str(header, "reply"),
        correlation=corr,
        deadline_ms=float(deadline),
        tensors=tensors,
        trace=[t for t in trace if isinstance(t, dict)],
    )


def _tensor_info(i: int, spec: Any) -> TensorInfo:
    if not isinstance(spec, dict):
        raise _bad(f"tensors[{i}] must be an object")
    name, dtype, shape = spec.get("name"), spec.get("dtype"), spec.get("shape")
    if not isinstance(name, str):
        raise _bad(f"tensors[{i}].name must be a string")
    if dtype not in DTYPES:
        raise _bad(f"tensor {name!r}: dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if (
        not isinstance(shape, list)
        or len(shape) > 8
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise _bad(f"tensor {name!r}: shape must be a list of up to 8 sizes >= 0, got {shape!r}")
    q = spec.get("quantization")
    try:
        return TensorInfo.model_validate(
            {"name": name, "dtype": dtype, "shape": shape, "quantization": q}
        )
    except ValueError as e:
        raise _bad(f"tensor {name!r}: {' '.join(str(e).split())[:200]}") from None


def match(
    got: Sequence[tuple[TensorInfo, np.ndarray]], expected: Sequence[TensorInfo]
) -> list[np.ndarray]:
    """The arrays for a segment's inputs, by name; raise BAD_TENSOR on any mismatch."""
    by_name = {info.name: array for info, array in got}
    names = [info.name for info, _ in got]
    arrays: list[np.ndarray] = []
    for spec in expected:
        array = by_name.get(spec.name)
        if array is None:
            raise _bad(
                f"no tensor named {spec.name!r}; got {names}, expected {[s.name for s in expected]}"
            )
        want = [d for d in spec.shape]
        if array.dtype.name != spec.dtype or not (
            len(array.shape) == len(want)
            and all(w < 0 or g == w for g, w in zip(array.shape, want, strict=True))
        ):
            raise _bad(
                f"tensor {spec.name!r} is {array.dtype.name} {list(array.shape)}; expected "
                f"{spec.dtype} {want}"
            )
        arrays.append(array)
    if len(got) != len(expected):
        raise _bad(f"got {len(got)} tensors {names}; expected {len(expected)}")
    return arrays
