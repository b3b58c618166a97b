"""Inference request payloads in, result payloads out. No I/O.

A request payload is recognised by its content, in this order:

| kind | recognised by | feeds |
|---|---|---|
| png | `\\x89PNG\\r\\n\\x1a\\n` | a single image input, preprocessed (`manifest.Preprocessing`) |
| jpeg | `\\xff\\xd8\\xff` | the same |
| npy | `\\x93NUMPY` | a single input; a leading batch dimension of 1 may be left out |
| json | first non-space byte `{` | `{"inputs": ..., "request_id", "deadline_ms", "quantized"}` |
| raw | anything else exactly as long as the single input's bytes | that input, little-endian |

Arrays are converted to the input's dtype only where nothing is lost: integers into
float inputs, floats into quantized integer inputs (quantized with the input's scale and
zero point), integers into integer inputs when every value fits. JSON has numbers, not
dtypes (JavaScript writes 1.0 as 1), so JSON numbers are real values, integers too, and
are quantized for a quantized input; only a request saying `"quantized": true` gives the
quantized integers themselves. A .npy array's dtype says which it holds. A JSON-looking
payload that does not parse but is exactly the raw input's size is taken as raw (pixel
bytes can start with whitespace and `{`).

A result is one JSON object (`result_json`) with the outputs (`encode_outputs`) and,
for classifiers with labels, the best classes (`top_k`).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from PIL import Image, UnidentifiedImageError

from mqinfer.protocol.errors import Code, ProtocolError
from mqinfer.protocol.manifest import Preprocessing, TensorInfo
from mqinfer.protocol.topics import TopicError, check_id

RESULT_VERSION = 1
# Images larger than this are refused before their pixels are decoded.
MAX_IMAGE_PIXELS = 4096 * 4096

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x93NUMPY", "npy"),
)
_KIND_NAMES = {"png": "PNG", "jpeg": "JPEG", "npy": ".npy", "json": "JSON", "raw": "raw"}
_WHITESPACE = b" \t\r\n"


@dataclass(frozen=True)
class Decoded:
    arrays: list[np.ndarray]  # one per model input, in its dtype and shape
    kind: str  # 'png', 'jpeg', 'npy', 'json' or 'raw'
    request_id: str | None = None
    deadline_ms: float | None = None


# ---- describing tensors and payloads ----------------------------------------------------


def _dims(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(int(d)) for d in shape) + "]"


def _spec(spec: TensorInfo) -> str:
    return f"'{spec.name}' {spec.dtype} {_dims(spec.shape)}"


def _said(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _fits(shape: Sequence[int], expected: Sequence[int]) -> bool:
    return len(shape) == len(expected) and all(
        want < 0 or got == want for got, want in zip(shape, expected, strict=True)
    )


def _raw_layout(inputs: Sequence[TensorInfo]) -> tuple[tuple[int, ...], int] | None:
    """(shape, byte size) a raw payload must have, when the model takes raw bytes at all:
    a single input whose shape is fixed, but for a dynamic batch dimension taken as 1."""
    if len(inputs) != 1:
        return None
    shape = list(inputs[0].shape)
    if shape and shape[0] < 0:
        shape[0] = 1
    if any(d < 0 for d in shape):
        return None
    return tuple(shape), math.prod(shape) * np.dtype(inputs[0].dtype).itemsize


# U+FFFD in UTF-8: what a byte that is not UTF-8 becomes when binary data is read as text.
_REPLACEMENT_CHARACTER = b"\xef\xbf\xbd"


def _unrecognised(payload: bytes, inputs: Sequence[TensorInfo]) -> ProtocolError:
    head = f" starting 0x{payload[:4].hex()}" if payload else ""
    what = f"received {len(payload)} bytes{head}: not PNG, JPEG, .npy or JSON"
    if payload.startswith(_REPLACEMENT_CHARACTER):
        return ProtocolError(
            Code.BAD_PAYLOAD,
            f"{what}; it starts with 0xefbfbd, the UTF-8 replacement character, so these"
            " bytes look like binary data read as text (a PNG's first byte 0x89 is not UTF-8),"
            " for example by a Node-RED 'file in' node set to output a UTF-8 string: send the"
            " file's bytes unchanged, as a single Buffer",
        )
    layout = _raw_layout(inputs)
    if layout is not None:
        shape, size = layout
        raw = f"raw {inputs[0].dtype} {_dims(shape)} ({size} bytes)"
        return ProtocolError(Code.BAD_PAYLOAD, f"{what}, and not {raw}; send one of those")
    if len(inputs) == 1:
        return ProtocolError(
            Code.BAD_PAYLOAD,
            f"{what}; raw bytes need a fixed input shape and input {_spec(inputs[0])} has"
            " dynamic dimensions; send one of those",
        )
    return ProtocolError(Code.BAD_PAYLOAD, f"{what}; {_takes(inputs)}: send JSON")


def _takes(inputs: Sequence[TensorInfo]) -> str:
    return f"this model takes {len(inputs)} inputs ({', '.join(_spec(s) for s in inputs)})"


def _single(inputs: Sequence[TensorInfo], what: str) -> TensorInfo:
    if len(inputs) != 1:
        raise ProtocolError(
            Code.BAD_PAYLOAD,
            f"{what} feeds a single-input model only; {_takes(inputs)}: send JSON"
            ' {"inputs": {name: nested list}}',
        )
    return inputs[0]


# ---- converting arrays ------------------------------------------------------------------


def _quantize(values: np.ndarray, spec: TensorInfo, dtype: np.dtype[Any]) -> np.ndarray:
    """q = round(value / scale) + zero_point (half to even), clipped to the dtype."""
    assert spec.quantization is not None
    q = np.round(values / spec.quantization.scale) + spec.quantization.zero_point
    info = np.iinfo(dtype)
    return np.clip(q, info.min, info.max).astype(dtype)


def _fit_shape(array: np.ndarray, spec: TensorInfo) -> np.ndarray:
    """The array in the input's shape, adding a leading batch dimension of 1 if that fits."""
    if _fits(array.shape, spec.shape):
        return array
    if _fits((1, *array.shape), spec.shape):
        return array.reshape((1, *array.shape))
    raise ProtocolError(
        Code.WRONG_SHAPE,
        f"input {_spec(spec)}: got shape {_dims(array.shape)} ({array.size} values),"
        f" expected {_dims(spec.shape)}",
    )


def _convert(array: np.ndarray, spec: TensorInfo) -> np.ndarray:
    """The array in the input's dtype, where that loses nothing (see the module doc)."""
    target = np.dtype(spec.dtype)
    source = array.dtype
    if source == target:
        return array
    if target.kind == "f":
        return array.astype(target)
    if target.kind in "iu":
        if source.kind == "f":
            if spec.quantization is None:
                raise ProtocolError(
                    Code.WRONG_DTYPE,
                    f"input {_spec(spec)} is not quantized, so {source} values cannot be"
                    f" converted without loss; send integers that fit {target}",
                )
            if not np.isfinite(array).all():
                raise ProtocolError(
                    Code.WRONG_DTYPE, f"input {_spec(spec)}: NaN or infinity cannot be quantized"
                )
            return _quantize(array.astype(np.float64), spec, target)
        if array.size:
            low, high = int(array.min()), int(array.max())
            info = np.iinfo(target)
            if low < info.min or high > info.max:
                raise ProtocolError(
                    Code.WRONG_DTYPE,
                    f"input {_spec(spec)}: values {low}..{high} do not fit {target}"
                    f" ({info.min}..{info.max})",
                )
        return array.astype(target)
    raise ProtocolError(
        Code.WRONG_DTYPE, f"input {_spec(spec)} takes {target} values; got {source}"
    )


_NOT_NUMBERS = {"U": "strings", "S": "byte strings", "O": "objects", "c": "complex numbers"}


def _feed(array: np.ndarray, spec: TensorInfo) -> np.ndarray:
    if array.dtype.kind not in "biuf":
        got = _NOT_NUMBERS.get(array.dtype.kind, f"{array.dtype} values")
        raise ProtocolError(Code.WRONG_DTYPE, f"input {_spec(spec)} takes numbers; got {got}")
    return np.ascontiguousarray(_convert(_fit_shape(array, spec), spec))


# ---- images -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _ImagePlan:
    mode: str  # 'L' or 'RGB'
    size: tuple[int, int] | None  # (width, height); None keeps the image's own size
    layout: str  # 'NHWC' or 'NCHW'


def _default_plan(spec: TensorInfo) -> _ImagePlan:
    """Mode, size and layout guessed from an input shape [1,H,W,C] or [1,C,H,W]."""
    shape = spec.shape
    if len(shape) == 4 and shape[0] in (1, -1):
        if shape[3] in (1, 3):
            layout, channels, height, width = "NHWC", shape[3], shape[1], shape[2]
        elif shape[1] in (1, 3):
            layout, channels, height, width = "NCHW", shape[1], shape[2], shape[3]
        else:
            layout = ""
        if layout:
            size = (width, height) if width > 0 and height > 0 else None
            return _ImagePlan("L" if channels == 1 else "RGB", size, layout)
    raise ProtocolError(
        Code.BAD_PAYLOAD,
        f"input {_spec(spec)} is not an image tensor ([1,H,W,C] or [1,C,H,W] with 1 or 3"
        " channels); send .npy or JSON",
    )


def _image_values(pixels: np.ndarray, spec: TensorInfo, prep: Preprocessing | None) -> np.ndarray:
    """uint8 pixels -> the input's values (Preprocessing's docstring)."""
    dtype = np.dtype(spec.dtype)
    if prep is None:
        if dtype.kind == "f":
            return (pixels.astype(np.float64) / 255.0).astype(dtype)
        if dtype == np.uint8:
            return pixels
        if dtype == np.int8:
            return (pixels.astype(np.int16) - 128).astype(np.int8)
        if dtype.kind in "iu":
            return pixels.astype(dtype)
    elif prep.pixels:
        if dtype == np.uint8:
            return pixels
        raise ProtocolError(
            Code.INTERNAL,
            f"the manifest feeds raw pixels, which needs a uint8 input; input {_spec(spec)}",
        )
    else:
        values = (pixels.astype(np.float64) - prep.mean) / prep.std
        if dtype.kind == "f":
            return values.astype(dtype)
        if dtype.kind in "iu" and spec.quantization is not None:
            return _quantize(values, spec, dtype)
        if dtype.kind in "iu":
            info = np.iinfo(dtype)
            return np.clip(np.round(values), info.min, info.max).astype(dtype)
    raise ProtocolError(Code.BAD_PAYLOAD, f"input {_spec(spec)} cannot take an image")


def _decode_image(
    payload: bytes, kind: str, inputs: Sequence[TensorInfo], prep: Preprocessing | None
) -> Decoded:
    name = _KIND_NAMES[kind]
    spec = _single(inputs, f"a {name} image")
    plan = _default_plan(spec) if prep is None else _ImagePlan(prep.mode, prep.size, prep.layout)
    try:
        image: Image.Image = Image.open(io.BytesIO(payload))
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise ProtocolError(
                Code.TOO_LARGE,
                f"{name} image is {width}x{height}; at most {MAX_IMAGE_PIXELS} pixels are decoded",
            )
        image.load()
        if image.mode != plan.mode:
            image = image.convert(plan.mode)
        if plan.size is not None and image.size != plan.size:
            image = image.resize(plan.size, Image.Resampling.BILINEAR)
        pixels = np.array(image, dtype=np.uint8)  # a writable copy
    except ProtocolError:
        raise
    except Exception as exc:
        said = "Pillow cannot identify it" if isinstance(exc, UnidentifiedImageError) else None
        raise ProtocolError(
            Code.BAD_IMAGE,
            f"{name} image of {len(payload)} bytes does not decode: {said or _said(exc)}",
        ) from None
    if pixels.ndim == 2:
        pixels = pixels[:, :, np.newaxis]
    pixels = pixels[np.newaxis]  # NHWC
    if plan.layout == "NCHW":
        pixels = pixels.transpose(0, 3, 1, 2)
    array = _image_values(pixels, spec, prep)
    channel_axis = 3 if plan.layout == "NHWC" else 1
    if not _fits(array.shape, spec.shape) and len(spec.shape) == 3 and plan.mode == "L":
        array = np.squeeze(array, axis=channel_axis)  # an input [1,H,W] takes one channel
    if not _fits(array.shape, spec.shape):
        raise ProtocolError(
            Code.INTERNAL,
            f"an image becomes {_dims(array.shape)} with this service's preprocessing, but"
            f" input {_spec(spec)} takes {_dims(spec.shape)}",
        )
    return Decoded([np.ascontiguousarray(array)], kind)


def _decode_png(
    payload: bytes, inputs: Sequence[TensorInfo], prep: Preprocessing | None
) -> Decoded:
    return _decode_image(payload, "png", inputs, prep)


def _decode_jpeg(
    payload: bytes, inputs: Sequence[TensorInfo], prep: Preprocessing | None
) -> Decoded:
    return _decode_image(payload, "jpeg", inputs, prep)


# ---- .npy, raw ---------------------------------------------------------------------------


def _decode_npy(
    payload: bytes, inputs: Sequence[TensorInfo], prep: Preprocessing | None
) -> Decoded:
    spec = _single(inputs, "a .npy array")
    try:
        array = np.load(io.BytesIO(payload), allow_pickle=False)
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise ProtocolError(
                Code.WRONG_DTYPE, f"input {_spec(spec)} takes numbers; got objects"
            ) from None
        raise ProtocolError(
            Code.BAD_PAYLOAD, f"the .npy array does not load: {_said(exc)}"
        ) from None
    except Exception as exc:
        raise ProtocolError(
            Code.BAD_PAYLOAD, f"the .npy array does not load: {_said(exc)}"
        ) from None
    if not isinstance(array, np.ndarray):
        raise ProtocolError(Code.BAD_PAYLOAD, "the .npy payload holds no array")
    return Decoded([_feed(array, spec)], "npy")


def _decode_raw(payload: bytes, inputs: Sequence[TensorInfo]) -> Decoded | None:
    layout = _raw_layout(inputs)
    if layout is None or layout[1] != len(payload):
        return None
    dtype = np.dtype(inputs[0].dtype)
    array = np.frombuffer(payload, dtype=dtype.newbyteorder("<")).reshape(layout[0])
    return Decoded([array.astype(dtype)], "raw")  # astype copies: the array owns its memory


# ---- JSON --------------------------------------------------------------------------------


def _bad(message: str) -> ProtocolError:
    return ProtocolError(Code.BAD_MESSAGE, message)


def _is_quantized(spec: TensorInfo) -> bool:
    return spec.quantization is not None and np.dtype(spec.dtype).kind in "iu"


def _json_array(value: Any, spec: TensorInfo, quantized: bool) -> np.ndarray:
    """One input from JSON numbers: real values, quantized for a quantized input; with
    `quantized` (the request's `"quantized": true`) a quantized input's integers as they are."""
    if isinstance(value, bool) or not isinstance(value, list | int | float):
        raise _bad(f"input {_spec(spec)}: expected a nested list of numbers, got {value!r:.40}")
    try:
        array = np.array(value)
    except ValueError:
        raise ProtocolError(
            Code.WRONG_SHAPE,
            f"input {_spec(spec)}: the nested lists are ragged (rows of different lengths);"
            f" expected shape {_dims(spec.shape)}",
        ) from None
    if _is_quantized(spec) and array.dtype.kind in "biuf":
        if not quantized:
            array = array.astype(np.float64)  # 1 is the real value 1.0, as in JavaScript
        elif array.dtype.kind == "f":
            info = np.iinfo(np.dtype(spec.dtype))
            raise ProtocolError(
                Code.WRONG_DTYPE,
                f'input {_spec(spec)}: with "quantized": true the values are its quantized'
                f" integers ({info.min}..{info.max}); got numbers with a fraction or"
                ' exponent. Send real values without "quantized" to have them quantized',
            )
    return _feed(array, spec)


def _json_inputs(value: Any, inputs: Sequence[TensorInfo]) -> list[Any]:
    """The JSON value for each input, in the model's order."""
    if isinstance(value, dict):
        names = [spec.name for spec in inputs]
        missing = [n for n in names if n not in value]
        unknown = [k for k in value if k not in names]
        if missing or unknown:
            problem = f"missing {missing}" if missing else f"unknown {unknown}"
            raise _bad(f"field 'inputs' names inputs {problem}; the model's inputs are {names}")
        return [value[n] for n in names]
    if isinstance(value, list):
        if len(inputs) == 1:
            return [value]
        if len(value) == len(inputs):
            return value
        raise _bad(
            f"field 'inputs' is a list of {len(value)}; {_takes(inputs)}: give one nested list"
            " per input, or an object by name"
        )
    raise _bad(
        "field 'inputs' must be a nested list, a list with one nested list per input, or an"
        f" object by input name; got {type(value).__name__}"
    )


def _decode_json(data: Any, inputs: Sequence[TensorInfo]) -> Decoded:
    if not isinstance(data, dict):
        raise _bad(f'expected a JSON object {{"inputs": ...}}, got a {type(data).__name__}')
    request_id = data.get("request_id")
    if request_id is not None:
        if not isinstance(request_id, str):
            raise _bad(f"field 'request_id' must be a string, got {request_id!r:.40}")
        try:
            check_id(request_id, "request_id")
        except TopicError as exc:
            raise _bad(str(exc)) from None
    deadline = data.get("deadline_ms")
    if deadline is not None and (
        isinstance(deadline, bool) or not isinstance(deadline, int | float) or deadline <= 0
    ):
        raise _bad(f"field 'deadline_ms' must be a positive number, got {deadline!r:.40}")
    quantized = data.get("quantized", False)
    if not isinstance(quantized, bool):
        raise _bad(f"field 'quantized' must be true or false, got {quantized!r:.40}")
    if quantized and not any(_is_quantized(spec) for spec in inputs):
        raise _bad(
            "field 'quantized' is true but no input of this model is quantized"
            f" ({_takes(inputs) if len(inputs) > 1 else 'input ' + _spec(inputs[0])});"
            " send real values without it"
        )
    if "inputs" not in data:
        raise _bad(
            "missing field 'inputs': a nested list, or an object by input name"
            f" ({_takes(inputs) if len(inputs) > 1 else 'input ' + _spec(inputs[0])})"
        )
    values = _json_inputs(data["inputs"], inputs)
    arrays = [_json_array(v, spec, quantized) for v, spec in zip(values, inputs, strict=True)]
    return Decoded(
        arrays,
        "json",
        request_id=request_id,
        deadline_ms=None if deadline is None else float(deadline),
    )


# ---- decoding a request ------------------------------------------------------------------

_Decoder = Callable[[bytes, Sequence[TensorInfo], Preprocessing | None], Decoded]
_DECODERS: dict[str, _Decoder] = {"png": _decode_png, "jpeg": _decode_jpeg, "npy": _decode_npy}


def detect(payload: bytes) -> str | None:
    """'png', 'jpeg', 'npy' or 'json' by content, else None (raw or unrecognised)."""
    for magic, kind in _MAGIC:
        if payload.startswith(magic):
            return kind
    if payload.lstrip(_WHITESPACE)[:1] == b"{":
        return "json"
    return None


def decode_request(
    payload: bytes,
    inputs: list[TensorInfo],
    prep: Preprocessing | None,
    *,
    max_bytes: int,
) -> Decoded:
    """The model's input arrays from a request payload, or ProtocolError saying why not."""
    if len(payload) > max_bytes:
        raise ProtocolError(
            Code.TOO_LARGE, f"request is {len(payload)} bytes; at most {max_bytes} are accepted"
        )
    if not inputs:
        raise ProtocolError(Code.INTERNAL, "the model reports no inputs")
    kind = detect(payload)
    if kind == "json":
        try:
            data = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raw = _decode_raw(payload, inputs)
            if raw is not None:
                return raw
            raise ProtocolError(
                Code.BAD_ENCODING, f"payload starts like JSON but does not parse: {_said(exc)}"
            ) from None
        return _decode_json(data, inputs)
    if kind is not None:
        return _DECODERS[kind](payload, inputs, prep)
    raw = _decode_raw(payload, inputs)
    if raw is None:
        raise _unrecognised(payload, inputs)
    return raw


# ---- results ----------------------------------------------------------------------------


def dequantize(values: np.ndarray, spec: TensorInfo) -> np.ndarray:
    """real = scale * (q - zero_point) as float64; other outputs as float64 unchanged."""
    if spec.quantization is None:
        return values.astype(np.float64)
    q = spec.quantization
    return (values.astype(np.float64) - q.zero_point) * q.scale


def encode_outputs(outputs: list[np.ndarray], specs: list[TensorInfo]) -> list[dict[str, Any]]:
    """Each output as {"name", "dtype", "shape", "values"}; quantized ones add
    "dequantized" and "quantization": {"scale", "zero_point"}."""
    if len(outputs) != len(specs):
        raise ValueError(f"{len(outputs)} outputs for {len(specs)} output specs")
    encoded: list[dict[str, Any]] = []
    for array, spec in zip(outputs, specs, strict=True):
        item: dict[str, Any] = {
            "name": spec.name,
            "dtype": array.dtype.name,
            "shape": list(array.shape),
            "values": array.tolist(),
        }
        if spec.quantization is not None and array.dtype.kind in "iu":
            item["dequantized"] = dequantize(array, spec).tolist()
            item["quantization"] = {
                "scale": spec.quantization.scale,
                "zero_point": spec.quantization.zero_point,
            }
        encoded.append(item)
    return encoded


def top_k(
    output: np.ndarray, spec: TensorInfo, labels: list[str], k: int = 5
) -> list[dict[str, Any]]:
    """The k best classes of one row of scores: {"index", "label", "score"}, best first
    (dequantized scores for a quantized output; equal scores by index)."""
    if output.size != (output.shape[-1] if output.ndim else 1):
        raise ValueError(f"top_k takes one row of scores, got shape {_dims(output.shape)}")
    scores = dequantize(output.reshape(-1), spec)
    order = np.argsort(-scores, kind="stable")[: max(0, k)]
    return [
        {
            "index": int(i),
            "label": labels[i] if i < len(labels) else str(i),
            "score": float(scores[i]),
        }
        for i in order
    ]


def result_json(
    *,
    request_id: str | None,
    service: str,
    node: str | None,
    ok: bool,
    outputs: list[dict[str, Any]] | None = None,
    top: list[dict[str, Any]] | None = None,
    error: ProtocolError | tuple[str, str] | None = None,
    timing: dict[str, float] | None = None,
    stages: list[dict[str, Any]] | None = None,
) -> bytes:
    """The result payload. Fields that are None are left out. `stages`: a pipeline's
    per-stage timing, put into `timing` as it is."""
    result: dict[str, Any] = {"v": RESULT_VERSION}
    if request_id is not None:
        result["request_id"] = request_id
    result["service"] = service
    if node is not None:  # None when no node answers (the coordinator's 'unavailable')
        result["node"] = node
    result["ok"] = ok
    if not ok:
        if error is None:
            raise ValueError("a failed result needs an error")
        code, message = (error.code, error.message) if isinstance(error, ProtocolError) else error
        result["error"] = {"code": str(code), "message": message}
        return orjson.dumps(result, option=orjson.OPT_SERIALIZE_NUMPY)
    if error is not None:
        raise ValueError("a successful result carries no error")
    if timing is not None:
        result["timing"] = {key: round(float(value), 3) for key, value in timing.items()}
        if stages is not None:
            result["timing"]["stages"] = stages
    if outputs is not None:
        result["outputs"] = outputs
    if top is not None:
        result["top"] = top
    return orjson.dumps(result, option=orjson.OPT_SERIALIZE_NUMPY)
