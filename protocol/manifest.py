"""Model manifests: what a model file is and how to feed it.

A manifest sits beside a model file (``models/digits/digits_int8.json`` beside
``digits_int8.tflite``) and travels with the artifact when a model is deployed. A model
deployed without one still works: the node reads inputs and outputs from the runtime and
uses the default preprocessing described on `Preprocessing`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from mqinfer.protocol.topics import check_sha256

Format = Literal["tflite", "onnx", "edgetpu_tflite"]
# An artifact is named by the sha256 of its bytes and nothing else: never a path.
Sha256 = Annotated[str, AfterValidator(check_sha256)]

# File name suffix of each format, most specific first.
FORMAT_SUFFIXES: tuple[tuple[str, str], ...] = (
    ("_edgetpu.tflite", "edgetpu_tflite"),
    (".tflite", "tflite"),
    (".onnx", "onnx"),
)


def format_of(path: str) -> str:
    """'m_edgetpu.tflite' -> 'edgetpu_tflite', 'm.tflite' -> 'tflite', 'm.onnx' -> 'onnx'."""
    name = path.replace("\\", "/").rsplit("/", 1)[-1].lower()
    for suffix, fmt in FORMAT_SUFFIXES:
        if name.endswith(suffix):
            return fmt
    raise ValueError(
        f"cannot tell the model format of {path!r}: expected a file name ending in"
        " .tflite, _edgetpu.tflite or .onnx"
    )


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Quantization(_Frozen):
    """real_value = scale * (quantized_value - zero_point)."""

    scale: float
    zero_point: int


class TensorInfo(_Frozen):
    name: str
    dtype: str = Field(description="numpy dtype name: float32, int8, uint8, int64, ...")
    shape: list[int] = Field(description="-1 for a dynamic dimension")
    quantization: Quantization | None = None


class Preprocessing(_Frozen):
    """How an image becomes the input tensor.

    The image is converted to `mode`, resized to `size` (width, height) and laid out as
    `layout`. With `pixels` the 0..255 values go in unchanged (the input must be uint8).
    Otherwise value = (pixel - mean) / std, and for a quantized input
    q = round(value / scale) + zero_point, clipped to the dtype.

    Without a manifest: mode from the channel count (1 -> L, 3 -> RGB), size from the
    input shape, and float inputs get pixel / 255, uint8 inputs the pixels, int8 inputs
    pixel - 128.
    """

    mode: Literal["L", "RGB"] = "RGB"
    size: tuple[int, int] = Field(description="(width, height)")
    layout: Literal["NHWC", "NCHW"] = "NHWC"
    pixels: bool = False
    mean: float = 0.0
    std: float = 255.0


class Accuracy(_Frozen):
    dataset: str
    samples: int
    top1: float = Field(ge=0, le=1)


class Manifest(_Frozen):
    name: str
    format: Format
    file: str = Field(max_length=255, description="Model file name, relative to the manifest")
    sha256: Sha256
    size: int = Field(ge=0, description="File size in bytes")
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    preprocessing: Preprocessing | None = None
    labels: list[str] = Field(default_factory=list)
    accuracy: Accuracy | None = None
    test_set: str | None = Field(None, description="Held-out data file, relative")
    description: str = ""


# ---- pipelines ------------------------------------------------------------------------


class Segment(_Frozen):
    """One piece of a split model. Its `manifest` names the segment file and its tensors:
    the inputs of segment k+1 are the outputs of segment k (the tensors that cross the cut),
    matched by name."""

    manifest: Manifest
    ops: tuple[int, int] = Field(description="Operators (TFLite) or nodes (ONNX) [start, end)")
    latency_ms: float | None = Field(None, description="Median run time measured when split")
    weights_bytes: int = Field(0, ge=0, description="Constant data (weights) it holds")


class Verification(_Frozen):
    """How the chained segments compared with the whole model when the split was made."""

    inputs: int = Field(ge=1, description="Inputs run through both")
    exact: bool = Field(description="Every output bitwise equal")
    max_abs_diff: float = Field(ge=0)
    tolerance: float = Field(ge=0, description="Largest difference accepted (0: bitwise)")


class Pipeline(_Frozen):
    """A model split into segments that run one after another, possibly on different nodes.

    Written by `mqinfer split` as ``{stem}.pipeline.json`` beside the segment files."""

    name: str
    model: str = Field(max_length=255, description="File name of the whole model")
    sha256: Sha256 = Field(description="sha256 of the whole model")
    format: Format
    segments: list[Segment] = Field(min_length=2)
    verification: Verification
    profile_threads: int = Field(1, ge=1, description="Runtime threads when latency was measured")
    runtime: str | None = Field(
        None,
        max_length=64,
        pattern=r"^[a-z0-9_]+$",
        description="The runtime the chained segments were verified with ('litert', "
        "'onnxruntime'): a stage serves with it where its node has it",
    )
