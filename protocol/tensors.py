"""The binary encoding of the tensors a pipeline stage passes on. No I/O.

A stage's output goes to the hub in an answer, and from there as work to one replica of the
next stage (topics.md §8); the body of both is this encoding:

    b"MQT2"                     4 bytes, magic and version
    header length               4 bytes, unsigned, little-endian
    header                      UTF-8 JSON object: {"tensors": [{name, dtype, shape,
                                quantization}]}
    tensor bytes                each tensor's raw bytes, C order, little-endian, back to back

Tensor data is never JSON or base64; the tensors follow in header order, and their sizes
follow from dtype and shape.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson

from mqinfer.protocol.errors import Code, ProtocolError
from mqinfer.protocol.manifest import TensorInfo

MAGIC = b"MQT2"
_LEN = struct.Struct("<I")
MAX_HEADER_BYTES = 64 * 1024
DTYPES = frozenset(
    {"float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool"}
)


Tensors = list[tuple[TensorInfo, np.ndarray]]
MAX_TENSORS = 64


def _bad(message: str) -> ProtocolError:
    return ProtocolError(Code.BAD_TENSOR, message)


def encode(tensors: Tensors) -> bytes:
    infos: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for info, array in tensors:
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
    header = orjson.dumps({"tensors": infos})
    return b"".join([MAGIC, _LEN.pack(len(header)), header, *blobs])


def decode(payload: bytes) -> Tensors:
    """Read a stage's tensors; raise ProtocolError(BAD_TENSOR) saying what is wrong."""
    if len(payload) < 8 or payload[:4] != MAGIC:
        raise _bad(
            f"not stage tensors: expected the magic bytes {MAGIC!r}, got {payload[:4]!r} "
            f"({len(payload)} bytes)"
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
    specs = header.get("tensors")
    if not isinstance(specs, list) or not specs or len(specs) > MAX_TENSORS:
        raise _bad(f"header field 'tensors' must be a list of 1-{MAX_TENSORS} tensors")
    tensors: Tensors = []
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
    return tensors


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
