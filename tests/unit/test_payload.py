"""protocol.payload: request detection and decoding, the error codes, result encoding."""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import numpy as np
import orjson
import pytest
from PIL import Image

from mqinfer.protocol.errors import Code, ProtocolError
from mqinfer.protocol.manifest import Preprocessing, Quantization, TensorInfo
from mqinfer.protocol.payload import (
    MAX_IMAGE_PIXELS,
    decode_request,
    detect,
    encode_outputs,
    result_json,
    top_k,
)

LIMIT = 1 << 20
SCALE_1_255 = float(np.float32(1 / 255))  # as a .tflite file stores it

INT8_IMAGE = TensorInfo(
    name="image",
    dtype="int8",
    shape=[1, 8, 8, 1],
    quantization=Quantization(scale=SCALE_1_255, zero_point=-128),
)
UINT8_IMAGE = TensorInfo(name="image", dtype="uint8", shape=[1, 8, 8, 1])
F32_IMAGE = TensorInfo(name="image", dtype="float32", shape=[1, 8, 8, 1])
F32_VECTOR = TensorInfo(name="x", dtype="float32", shape=[1, 4])
INT32_PLAIN = TensorInfo(name="ids", dtype="int32", shape=[1, 3])
TWO_INPUTS = [
    TensorInfo(name="a", dtype="float32", shape=[1, 2]),
    TensorInfo(name="b", dtype="int64", shape=[1]),
]


def decode(payload: bytes, inputs: list[TensorInfo], prep: Preprocessing | None = None) -> Any:
    return decode_request(payload, inputs, prep, max_bytes=LIMIT)


def error_of(payload: bytes, inputs: list[TensorInfo], **kw: Any) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode_request(payload, inputs, kw.get("prep"), max_bytes=kw.get("max_bytes", LIMIT))
    return info.value


def png(array: np.ndarray, mode: str) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array, mode).save(out, "PNG")
    return out.getvalue()


def npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=True)
    return out.getvalue()


def jsonb(value: Any) -> bytes:
    return orjson.dumps(value)


GRAY = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4  # 0..252
ALL_PIXELS = np.arange(256, dtype=np.uint8).reshape(16, 16)
NOISE = np.random.default_rng(7).integers(0, 256, (16, 16, 3), dtype=np.uint8)


# ---- detection and limits ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "kind"),
    [
        (b"\x89PNG\r\n\x1a\n....", "png"),
        (b"\xff\xd8\xff\xe0....", "jpeg"),
        (b"\x93NUMPY\x01\x00", "npy"),
        (b'{"inputs": []}', "json"),
        (b' \n\t{"inputs": []}', "json"),
        (b"[1, 2]", None),
        (b"\x00" * 64, None),
        (b"", None),
    ],
)
def test_detect_by_content(payload: bytes, kind: str | None) -> None:
    assert detect(payload) == kind


def test_too_large_is_checked_first_and_names_size_and_limit() -> None:
    err = error_of(b"garbage" * 20, [INT8_IMAGE], max_bytes=100)
    assert err.code == Code.TOO_LARGE
    assert "140" in err.message and "100" in err.message


def test_garbage_is_bad_payload_naming_what_came_and_what_is_expected() -> None:
    payload = b"\x1f\x8b\x08\x00" + b"z" * 33
    err = error_of(payload, [INT8_IMAGE])
    assert err.code == Code.BAD_PAYLOAD
    assert "37 bytes starting 0x1f8b0800" in err.message
    assert "raw int8 [1,8,8,1] (64 bytes)" in err.message


def test_garbage_for_a_two_input_model_asks_for_json() -> None:
    err = error_of(b"\x01\x02\x03", TWO_INPUTS)
    assert err.code == Code.BAD_PAYLOAD
    assert "2 inputs" in err.message and "JSON" in err.message


def test_garbage_for_a_dynamic_input_says_raw_needs_a_fixed_shape() -> None:
    dynamic = TensorInfo(name="x", dtype="float32", shape=[1, -1])
    err = error_of(b"\x01\x02\x03\x04", [dynamic])
    assert err.code == Code.BAD_PAYLOAD
    assert "fixed input shape" in err.message


# ---- raw --------------------------------------------------------------------------------


def test_raw_exact_size_feeds_the_single_input() -> None:
    values = np.arange(-32, 32, dtype=np.int8).reshape(1, 8, 8, 1)
    decoded = decode(values.tobytes(), [INT8_IMAGE])
    assert decoded.kind == "raw"
    (array,) = decoded.arrays
    assert array.dtype == np.int8 and array.shape == (1, 8, 8, 1)
    assert np.array_equal(array, values)
    assert array.flags.writeable and array.flags.owndata


def test_raw_float32_with_a_dynamic_batch_dimension() -> None:
    values = np.array([[1.5, -2.0, 3.25, 0.0]], dtype="<f4")
    spec = TensorInfo(name="x", dtype="float32", shape=[-1, 4])
    decoded = decode(values.tobytes(), [spec])
    assert decoded.kind == "raw"
    assert np.array_equal(decoded.arrays[0], values)


def test_raw_one_byte_short_is_bad_payload() -> None:
    err = error_of(b"\x00" * 63, [INT8_IMAGE])
    assert err.code == Code.BAD_PAYLOAD


def test_raw_bytes_that_look_like_json_are_still_raw() -> None:
    values = np.full(64, 32, dtype=np.uint8)  # spaces ...
    values[5] = ord("{")  # ... then '{': not JSON, but exactly the input's size
    decoded = decode(values.tobytes(), [UINT8_IMAGE])
    assert decoded.kind == "raw"
    assert np.array_equal(decoded.arrays[0].reshape(-1), values)


# ---- images -----------------------------------------------------------------------------


def test_png_default_uint8_gets_the_pixels() -> None:
    decoded = decode(png(GRAY, "L"), [UINT8_IMAGE])
    assert decoded.kind == "png"
    (array,) = decoded.arrays
    assert array.dtype == np.uint8 and array.shape == (1, 8, 8, 1)
    assert np.array_equal(array[0, :, :, 0], GRAY)


def test_png_default_float_gets_pixels_over_255() -> None:
    (array,) = decode(png(GRAY, "L"), [F32_IMAGE]).arrays
    assert array.dtype == np.float32
    assert np.array_equal(array[0, :, :, 0], (GRAY / 255.0).astype(np.float32))


@pytest.mark.parametrize(
    "prep",
    [None, Preprocessing(mode="L", size=(16, 16), layout="NHWC", mean=0.0, std=255.0)],
    ids=["default", "manifest"],
)
def test_int8_scale_1_over_255_zero_point_minus_128_is_pixel_minus_128(
    prep: Preprocessing | None,
) -> None:
    spec = TensorInfo(
        name="image",
        dtype="int8",
        shape=[1, 16, 16, 1],
        quantization=Quantization(scale=SCALE_1_255, zero_point=-128),
    )
    (array,) = decode(png(ALL_PIXELS, "L"), [spec], prep).arrays
    assert array.dtype == np.int8
    expected = ALL_PIXELS.astype(np.int16) - 128
    assert np.array_equal(array[0, :, :, 0].astype(np.int16), expected)


def test_quantization_rounds_half_to_even_and_clips() -> None:
    spec = TensorInfo(
        name="image",
        dtype="uint8",
        shape=[1, 16, 16, 1],
        quantization=Quantization(scale=2.0, zero_point=100),
    )
    prep = Preprocessing(mode="L", size=(16, 16), mean=0.0, std=1.0)
    (array,) = decode(png(ALL_PIXELS, "L"), [spec], prep).arrays
    pixels = ALL_PIXELS.astype(np.float64)
    expected = np.clip(np.round(pixels / 2.0) + 100, 0, 255)  # 1/2 -> 0, 3/2 -> 2, ...
    assert np.array_equal(array[0, :, :, 0], expected.astype(np.uint8))
    assert array[0, 0, 1, 0] == 100 and array[0, 0, 3, 0] == 102  # 0.5 -> 0, 1.5 -> 2
    assert array.max() == 228


def test_manifest_mean_std_for_float_input() -> None:
    spec = TensorInfo(name="image", dtype="float32", shape=[1, 8, 8, 1])
    prep = Preprocessing(mode="L", size=(8, 8), mean=127.5, std=127.5)
    (array,) = decode(png(GRAY, "L"), [spec], prep).arrays
    expected = ((GRAY.astype(np.float64) - 127.5) / 127.5).astype(np.float32)
    assert np.array_equal(array[0, :, :, 0], expected)


def test_manifest_pixels_pass_through_unchanged() -> None:
    prep = Preprocessing(mode="L", size=(8, 8), pixels=True)
    (array,) = decode(png(GRAY, "L"), [UINT8_IMAGE], prep).arrays
    assert np.array_equal(array[0, :, :, 0], GRAY)


def test_nchw_layout_from_the_manifest() -> None:
    rgb = NOISE[:3, :4]  # height 3, width 4
    spec = TensorInfo(name="image", dtype="float32", shape=[1, 3, 3, 4])
    prep = Preprocessing(mode="RGB", size=(4, 3), layout="NCHW", mean=0.0, std=255.0)
    (array,) = decode(png(np.ascontiguousarray(rgb), "RGB"), [spec], prep).arrays
    assert array.shape == (1, 3, 3, 4)
    for c in range(3):
        assert np.array_equal(array[0, c], (rgb[:, :, c] / 255.0).astype(np.float32))


def test_nchw_layout_guessed_without_a_manifest() -> None:
    rgb = np.ascontiguousarray(NOISE[:5, :6])
    spec = TensorInfo(name="image", dtype="uint8", shape=[1, 3, 5, 6])
    (array,) = decode(png(rgb, "RGB"), [spec]).arrays
    assert np.array_equal(array[0], rgb.transpose(2, 0, 1))


def test_resize_to_the_input_size_with_bilinear() -> None:
    image = Image.fromarray(NOISE, "RGB")
    spec = TensorInfo(name="image", dtype="uint8", shape=[1, 8, 8, 3])
    (array,) = decode(png(NOISE, "RGB"), [spec]).arrays
    expected = np.asarray(image.resize((8, 8), Image.Resampling.BILINEAR))
    assert np.array_equal(array[0], expected)


def test_resize_to_a_non_square_manifest_size() -> None:
    spec = TensorInfo(name="image", dtype="uint8", shape=[1, 4, 10, 1])
    prep = Preprocessing(mode="L", size=(10, 4), pixels=True)
    (array,) = decode(png(ALL_PIXELS, "L"), [spec], prep).arrays
    expected = np.asarray(
        Image.fromarray(ALL_PIXELS, "L").resize((10, 4), Image.Resampling.BILINEAR)
    )
    assert array.shape == (1, 4, 10, 1)
    assert np.array_equal(array[0, :, :, 0], expected)


def test_rgb_image_into_a_gray_input_is_converted() -> None:
    rgb = np.ascontiguousarray(NOISE[:8, :8])
    (array,) = decode(png(rgb, "RGB"), [UINT8_IMAGE]).arrays
    expected = np.asarray(Image.fromarray(rgb, "RGB").convert("L"))
    assert np.array_equal(array[0, :, :, 0], expected)


def test_jpeg_decodes_like_pillow() -> None:
    out = io.BytesIO()
    Image.fromarray(NOISE, "RGB").save(out, "JPEG", quality=95)
    spec = TensorInfo(name="image", dtype="uint8", shape=[1, 16, 16, 3])
    decoded = decode(out.getvalue(), [spec])
    assert decoded.kind == "jpeg"
    expected = np.asarray(Image.open(io.BytesIO(out.getvalue())).convert("RGB"))
    assert np.array_equal(decoded.arrays[0][0], expected)


def test_truncated_png_is_bad_image() -> None:
    data = png(NOISE, "RGB")
    err = error_of(data[: len(data) // 2], [UINT8_IMAGE])
    assert err.code == Code.BAD_IMAGE
    assert "PNG" in err.message and "does not decode" in err.message


def test_truncated_jpeg_is_bad_image() -> None:
    out = io.BytesIO()
    Image.fromarray(NOISE, "RGB").save(out, "JPEG")
    err = error_of(out.getvalue()[:200], [UINT8_IMAGE])
    assert err.code == Code.BAD_IMAGE
    assert "JPEG" in err.message


def test_png_header_only_is_bad_image() -> None:
    err = error_of(b"\x89PNG\r\n\x1a\n\x00\x00", [UINT8_IMAGE])
    assert err.code == Code.BAD_IMAGE


def _png_claiming(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header claims another size (rejected before decoding)."""
    data = bytearray(png(np.zeros((1, 1), np.uint8), "L"))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def test_image_with_too_many_pixels_is_too_large() -> None:
    err = error_of(_png_claiming(5000, 5000), [UINT8_IMAGE])
    assert err.code == Code.TOO_LARGE
    assert "5000x5000" in err.message and str(MAX_IMAGE_PIXELS) in err.message


def test_image_into_a_two_input_model_is_bad_payload() -> None:
    err = error_of(png(GRAY, "L"), TWO_INPUTS)
    assert err.code == Code.BAD_PAYLOAD
    assert "single-input" in err.message


def test_image_into_a_non_image_input_is_bad_payload() -> None:
    err = error_of(png(GRAY, "L"), [F32_VECTOR])
    assert err.code == Code.BAD_PAYLOAD
    assert "not an image tensor" in err.message


# ---- .npy -------------------------------------------------------------------------------


def test_npy_same_dtype_passes() -> None:
    values = np.arange(64, dtype=np.uint8).reshape(1, 8, 8, 1)
    decoded = decode(npy(values), [UINT8_IMAGE])
    assert decoded.kind == "npy"
    assert decoded.arrays[0].dtype == np.uint8
    assert np.array_equal(decoded.arrays[0], values)


def test_npy_without_the_batch_dimension_gets_one() -> None:
    values = np.arange(64, dtype=np.uint8).reshape(8, 8, 1)
    (array,) = decode(npy(values), [UINT8_IMAGE]).arrays
    assert array.shape == (1, 8, 8, 1)


def test_npy_wrong_shape_names_got_and_expected() -> None:
    err = error_of(npy(np.zeros((8, 8), np.uint8)), [UINT8_IMAGE])
    assert err.code == Code.WRONG_SHAPE
    assert "[8,8]" in err.message and "[1,8,8,1]" in err.message


def test_npy_dynamic_batch_takes_several_rows() -> None:
    spec = TensorInfo(name="x", dtype="float32", shape=[-1, 4])
    values = np.ones((3, 4), np.float32)
    assert decode(npy(values), [spec]).arrays[0].shape == (3, 4)


def test_npy_float_into_quantized_int8_is_quantized() -> None:
    values = np.array([0.0, 0.25, 0.75, 1.25, 100.0, -100.0], np.float32)
    spec = TensorInfo(
        name="x",
        dtype="int8",
        shape=[1, 6],
        quantization=Quantization(scale=0.5, zero_point=-3),
    )
    (array,) = decode(npy(values), [spec]).arrays
    assert array.dtype == np.int8
    # value / 0.5 = 0, 0.5, 1.5, 2.5, 200, -200: half to even, then + zero point, clipped
    assert array.tolist() == [[-3, -3, -1, -1, 127, -128]]


def test_npy_int_into_float_is_cast() -> None:
    (array,) = decode(npy(np.array([[1, 2, 3, 4]], np.int64)), [F32_VECTOR]).arrays
    assert array.dtype == np.float32 and array.tolist() == [[1.0, 2.0, 3.0, 4.0]]


def test_npy_big_endian_float_is_converted() -> None:
    values = np.array([[1.5, 2.5, -3.0, 4.0]], ">f4")
    (array,) = decode(npy(values), [F32_VECTOR]).arrays
    assert array.dtype == np.dtype("float32") and array.tolist() == values.tolist()


def test_npy_int_that_fits_into_int_is_cast() -> None:
    (array,) = decode(npy(np.array([[1, -2, 3]], np.int64)), [INT32_PLAIN]).arrays
    assert array.dtype == np.int32 and array.tolist() == [[1, -2, 3]]


@pytest.mark.parametrize(
    ("array", "spec"),
    [
        (np.array([[1.0, 2.0, 3.0]]), INT32_PLAIN),  # float into a non-quantized int
        (np.array([[1, 2, 2**40]], np.int64), INT32_PLAIN),  # out of range
        (np.full((1, 8, 8, 1), 300, np.int16), UINT8_IMAGE),  # out of range
        (np.full((1, 8, 8, 1), -1, np.int16), UINT8_IMAGE),  # out of range
        (np.array([["a", "b", "c", "d"]]), F32_VECTOR),  # strings
        (np.array([[1j, 2, 3, 4]]), F32_VECTOR),  # complex
        (np.array([[1, None, 3, 4]], dtype=object), F32_VECTOR),  # objects
    ],
    ids=["float-to-int", "int64-to-int32", "300-to-uint8", "neg-to-uint8", "str", "complex", "obj"],
)
def test_npy_wrong_dtype(array: np.ndarray, spec: TensorInfo) -> None:
    err = error_of(npy(array), [spec])
    assert err.code == Code.WRONG_DTYPE
    assert spec.name in err.message


def test_npy_nan_into_a_quantized_input_is_wrong_dtype() -> None:
    values = np.full((1, 8, 8, 1), np.nan, np.float32)
    assert error_of(npy(values), [INT8_IMAGE]).code == Code.WRONG_DTYPE


def test_corrupt_npy_is_bad_payload() -> None:
    data = npy(np.zeros((1, 8, 8, 1), np.uint8))
    err = error_of(data[:-10], [UINT8_IMAGE])
    assert err.code == Code.BAD_PAYLOAD
    assert ".npy" in err.message


def test_npy_into_a_two_input_model_is_bad_payload() -> None:
    assert error_of(npy(np.zeros((1, 2), np.float32)), TWO_INPUTS).code == Code.BAD_PAYLOAD


# ---- JSON -------------------------------------------------------------------------------


def test_json_nested_list_feeds_a_single_input_with_id_and_deadline() -> None:
    body = {"inputs": [[1, 2, 3, 4.5]], "request_id": "r-1", "deadline_ms": 250}
    decoded = decode(jsonb(body), [F32_VECTOR])
    assert decoded.kind == "json"
    assert decoded.request_id == "r-1" and decoded.deadline_ms == 250.0
    (array,) = decoded.arrays
    assert array.dtype == np.float32 and array.tolist() == [[1.0, 2.0, 3.0, 4.5]]


def test_json_without_the_batch_dimension_and_optional_fields() -> None:
    decoded = decode(jsonb({"inputs": [1, 2, 3, 4]}), [F32_VECTOR])
    assert decoded.arrays[0].shape == (1, 4)
    assert decoded.request_id is None and decoded.deadline_ms is None


def test_json_inputs_by_name_and_by_position() -> None:
    by_name = decode(jsonb({"inputs": {"b": [7], "a": [[0.5, 1.5]]}}), TWO_INPUTS)
    by_position = decode(jsonb({"inputs": [[[0.5, 1.5]], [7]]}), TWO_INPUTS)
    for decoded in (by_name, by_position):
        a, b = decoded.arrays
        assert a.dtype == np.float32 and a.tolist() == [[0.5, 1.5]]
        assert b.dtype == np.int64 and b.tolist() == [7]


def test_json_float_into_quantized_input_is_quantized() -> None:
    values = (np.arange(64).reshape(8, 8, 1) / 63).tolist()
    (array,) = decode(jsonb({"inputs": values}), [INT8_IMAGE]).arrays
    expected = np.round(np.arange(64) / 63 / SCALE_1_255) - 128
    assert np.array_equal(array.reshape(-1), expected.astype(np.int8))


def test_json_integers_into_quantized_input_are_real_values() -> None:
    """[T-REQ-3] JSON has no dtypes (JavaScript writes 1.0 as 1): 1 and 1.0 are the same value, and
    both are quantized with the input's scale and zero point."""
    bits = (np.arange(64).reshape(8, 8, 1) % 3 == 0).astype(int)
    (ints,) = decode(jsonb({"inputs": bits.tolist()}), [INT8_IMAGE]).arrays
    (floats,) = decode(jsonb({"inputs": bits.astype(float).tolist()}), [INT8_IMAGE]).arrays
    assert b'"inputs":[[[1],[0]' in jsonb({"inputs": bits.tolist()})  # really integers
    assert np.array_equal(ints, floats)
    assert ints.dtype == np.int8 and set(ints.reshape(-1).tolist()) == {-128, 127}
    # explicitly false is the same as absent
    (same,) = decode(jsonb({"inputs": bits.tolist(), "quantized": False}), [INT8_IMAGE]).arrays
    assert np.array_equal(same, ints)


def test_json_quantized_true_takes_the_quantized_integers() -> None:
    q = np.arange(-32, 32).reshape(8, 8, 1)
    (array,) = decode(jsonb({"inputs": q.tolist(), "quantized": True}), [INT8_IMAGE]).arrays
    assert array.dtype == np.int8 and array.reshape(-1).tolist() == list(range(-32, 32))


def test_json_quantized_true_applies_to_the_quantized_inputs_only() -> None:
    inputs = [INT8_IMAGE, TensorInfo(name="ids", dtype="int64", shape=[1])]
    body = {"inputs": {"image": [[[5]] * 8] * 8, "ids": [7]}, "quantized": True}
    image, ids = decode(jsonb(body), inputs).arrays
    assert image.reshape(-1).tolist() == [5] * 64
    assert ids.dtype == np.int64 and ids.tolist() == [7]


@pytest.mark.parametrize(
    ("values", "says"),
    [
        ([[[0.5]] * 8] * 8, '"quantized": true'),  # real values marked quantized
        ([[[1.0]] * 8] * 8, '"quantized": true'),  # whole, but written as floats
        ([[[200]] * 8] * 8, "do not fit int8"),  # out of the dtype's range
    ],
    ids=["fraction", "float", "out-of-range"],
)
def test_json_quantized_true_needs_integers_that_fit(values: Any, says: str) -> None:
    err = error_of(jsonb({"inputs": values, "quantized": True}), [INT8_IMAGE])
    assert err.code == Code.WRONG_DTYPE
    assert says in err.message and "image" in err.message


def test_json_quantized_true_for_a_model_without_quantized_inputs_is_bad_message() -> None:
    err = error_of(jsonb({"inputs": [[1, 2, 3, 4]], "quantized": True}), [F32_VECTOR])
    assert err.code == Code.BAD_MESSAGE
    assert "'quantized'" in err.message and "float32" in err.message


def test_npy_integers_into_quantized_input_are_the_quantized_values() -> None:
    """A .npy array has a dtype: an integer array is the input's quantized integers."""
    q = np.arange(-32, 32, dtype=np.int8).reshape(1, 8, 8, 1)
    (array,) = decode(npy(q), [INT8_IMAGE]).arrays
    assert np.array_equal(array, q)
    (wide,) = decode(npy(q.astype(np.int64)), [INT8_IMAGE]).arrays
    assert wide.dtype == np.int8 and np.array_equal(wide, q)


def test_bad_json_is_bad_encoding() -> None:
    err = error_of(b'{"inputs": [1, 2, 3', [F32_VECTOR])  # 19 bytes: not raw [1,4] float32
    assert err.code == Code.BAD_ENCODING
    assert "JSON" in err.message


@pytest.mark.parametrize(
    "body",
    [
        {"request_id": "r1"},  # no inputs
        {"inputs": "pixels"},
        {"inputs": [[1, 2, 3, 4]], "request_id": 12},
        {"inputs": [[1, 2, 3, 4]], "request_id": "has/slash"},
        {"inputs": [[1, 2, 3, 4]], "request_id": ""},
        {"inputs": [[1, 2, 3, 4]], "deadline_ms": "soon"},
        {"inputs": [[1, 2, 3, 4]], "deadline_ms": -5},
        {"inputs": [[1, 2, 3, 4]], "deadline_ms": True},
        {"inputs": {"y": [[1, 2, 3, 4]]}},  # unknown name
        {"inputs": [[[1, 2, 3, 4]]], "request_id": None, "x": 1, "deadline_ms": {}},
        {"inputs": [[1, 2, 3, 4]], "quantized": "yes"},
        {"inputs": [[1, 2, 3, 4]], "quantized": 1},
    ],
)
def test_json_missing_or_ill_typed_fields_are_bad_message(body: dict[str, Any]) -> None:
    assert error_of(jsonb(body), [F32_VECTOR]).code == Code.BAD_MESSAGE


def test_json_that_is_not_an_object_field_set_is_bad_message() -> None:
    assert error_of(b"{}", [F32_VECTOR]).code == Code.BAD_MESSAGE
    assert error_of(jsonb({"inputs": {"a": [[1, 2]]}}), TWO_INPUTS).code == Code.BAD_MESSAGE
    assert error_of(jsonb({"inputs": [[1, 2], [3], [4]]}), TWO_INPUTS).code == Code.BAD_MESSAGE


def test_json_wrong_shape_names_got_and_expected() -> None:
    err = error_of(jsonb({"inputs": [[1, 2, 3]]}), [F32_VECTOR])
    assert err.code == Code.WRONG_SHAPE
    assert "[1,3]" in err.message and "[1,4]" in err.message


def test_json_ragged_lists_are_wrong_shape() -> None:
    assert error_of(jsonb({"inputs": [[1, 2], [3]]}), [F32_VECTOR]).code == Code.WRONG_SHAPE


def test_json_wrong_dtype() -> None:
    assert error_of(jsonb({"inputs": [[1.5, 2, 3]]}), [INT32_PLAIN]).code == Code.WRONG_DTYPE
    assert error_of(jsonb({"inputs": [["a", "b", "c"]]}), [INT32_PLAIN]).code == Code.WRONG_DTYPE
    assert error_of(jsonb({"inputs": [[1, 2, 2**33]]}), [INT32_PLAIN]).code == Code.WRONG_DTYPE


# ---- results ----------------------------------------------------------------------------


def test_encode_outputs_float_and_quantized() -> None:
    specs = [
        TensorInfo(name="logits", dtype="float32", shape=[1, 3]),
        TensorInfo(
            name="probs",
            dtype="uint8",
            shape=[1, 3],
            quantization=Quantization(scale=1 / 256, zero_point=0),
        ),
    ]
    outputs: list[np.ndarray] = [
        np.array([[0.5, -1.0, 2.0]], np.float32),
        np.array([[0, 128, 255]], np.uint8),
    ]
    logits, probs = encode_outputs(outputs, specs)
    assert logits == {
        "name": "logits",
        "dtype": "float32",
        "shape": [1, 3],
        "values": [[0.5, -1.0, 2.0]],
    }
    assert probs["values"] == [[0, 128, 255]]
    assert probs["dequantized"] == [[0.0, 0.5, 255 / 256]]
    assert probs["quantization"] == {"scale": 1 / 256, "zero_point": 0}
    orjson.dumps(probs)  # plain Python values only


def test_top_k_sorted_by_score_ties_by_index_with_labels() -> None:
    spec = TensorInfo(name="p", dtype="float32", shape=[1, 5])
    scores = np.array([[0.1, 0.3, 0.05, 0.3, 0.25]], np.float32)
    top = top_k(scores, spec, ["a", "b", "c", "d", "e"], k=3)
    assert [t["index"] for t in top] == [1, 3, 4]
    assert [t["label"] for t in top] == ["b", "d", "e"]
    assert top[0]["score"] == pytest.approx(0.3)


def test_top_k_dequantizes_and_falls_back_to_index_labels() -> None:
    spec = TensorInfo(
        name="p", dtype="int8", shape=[1, 4], quantization=Quantization(scale=0.5, zero_point=-10)
    )
    top = top_k(np.array([[-10, 0, 20, 0]], np.int8), spec, ["zero"], k=10)
    assert [(t["index"], t["label"], t["score"]) for t in top] == [
        (2, "2", 15.0),
        (1, "1", 5.0),
        (3, "3", 5.0),
        (0, "zero", 0.0),
    ]


def test_result_json_success() -> None:
    timing = {"queue_ms": 0.12345, "inference_ms": 1.5, "total_ms": 2.0}
    timing["total_ms"] = np.float64(2.0)  # numpy scalars serialize too
    data = orjson.loads(
        result_json(
            request_id="r1",
            service="digits",
            node="edge-1",
            ok=True,
            outputs=[{"name": "y", "dtype": "float32", "shape": [1], "values": [1.0]}],
            top=[{"index": 0, "label": "0", "score": 1.0}],
            timing=timing,
        )
    )
    assert data == {
        "v": 1,
        "request_id": "r1",
        "service": "digits",
        "node": "edge-1",
        "ok": True,
        "timing": {"queue_ms": 0.123, "inference_ms": 1.5, "total_ms": 2.0},
        "outputs": [{"name": "y", "dtype": "float32", "shape": [1], "values": [1.0]}],
        "top": [{"index": 0, "label": "0", "score": 1.0}],
    }


def test_result_json_error_from_protocol_error_and_from_a_pair() -> None:
    err = ProtocolError(Code.WRONG_SHAPE, "got [8,8], expected [1,8,8,1]")
    first = orjson.loads(
        result_json(request_id="r1", service="digits", node="edge-1", ok=False, error=err)
    )
    assert first == {
        "v": 1,
        "request_id": "r1",
        "service": "digits",
        "node": "edge-1",
        "ok": False,
        "error": {"code": "wrong_shape", "message": "got [8,8], expected [1,8,8,1]"},
    }
    second = orjson.loads(
        result_json(
            request_id=None, service="digits", node=None, ok=False, error=("busy", "retry later")
        )
    )
    assert second == {
        "v": 1,
        "service": "digits",
        "ok": False,
        "error": {"code": "busy", "message": "retry later"},
    }


def test_result_json_refuses_inconsistent_ok_and_error() -> None:
    with pytest.raises(ValueError):
        result_json(request_id="r", service="s", node="n", ok=False)
    with pytest.raises(ValueError):
        result_json(request_id="r", service="s", node="n", ok=True, error=("busy", "x"))


# ---- binary read as text ----------------------------------------------------------------


def test_png_read_as_utf8_text_says_binary_was_read_as_text_and_to_send_a_buffer() -> None:
    """A PNG decoded as UTF-8 and encoded again (a Node-RED `file in` node's default
    output): every byte that is not UTF-8 became EF BF BD, the first one 0x89."""
    original = png(GRAY, "L")
    mangled = original.decode("utf-8", errors="replace").encode("utf-8")
    assert mangled[:4] == b"\xef\xbf\xbdP"
    err = error_of(mangled, [INT8_IMAGE])
    assert err.code == Code.BAD_PAYLOAD
    assert f"received {len(mangled)} bytes starting 0xefbfbd50" in err.message
    assert "look like binary data read as text" in err.message
    assert "Node-RED 'file in' node set to output a UTF-8 string" in err.message
    assert "as a single Buffer" in err.message


def test_other_unrecognised_bytes_say_nothing_about_text() -> None:
    err = error_of(b"\xbd\xef\xbf" + b"z" * 10, [INT8_IMAGE])
    assert err.code == Code.BAD_PAYLOAD
    assert "read as text" not in err.message
    assert "raw int8 [1,8,8,1] (64 bytes)" in err.message


def test_replacement_character_bytes_of_the_raw_size_are_still_raw() -> None:
    """Raw pixel bytes may start with EF BF BD: the raw size decides, as before."""
    payload = b"\xef\xbf\xbd" + bytes(61)
    decoded = decode(payload, [INT8_IMAGE])
    assert decoded.kind == "raw"
