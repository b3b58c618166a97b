"""Helpers shared by the model build scripts (``models/*/build.py``).

Everything a manifest says about a model file is read back from the runtime that will run
it (LiteRT for .tflite, ONNX Runtime for .onnx), and accuracy is measured on the converted
file with the preprocessing the manifest describes, so a manifest states facts about its
file rather than about the training framework.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent

_ONNX_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
}


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tflite_tensor(detail: dict[str, Any]) -> dict[str, Any]:
    scale, zero_point = detail["quantization"]
    shape = detail.get("shape_signature")
    if shape is None or len(shape) == 0:
        shape = detail["shape"]
    return {
        "name": detail["name"],
        "dtype": np.dtype(detail["dtype"]).name,
        "shape": [int(d) for d in shape],
        "quantization": (
            {"scale": float(scale), "zero_point": int(zero_point)} if scale != 0 else None
        ),
    }


def tflite_tensors(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Inputs and outputs as LiteRT reports them, in manifest form."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    return (
        [_tflite_tensor(d) for d in interpreter.get_input_details()],
        [_tflite_tensor(d) for d in interpreter.get_output_details()],
    )


def _onnx_tensor(arg: Any) -> dict[str, Any]:
    return {
        "name": arg.name,
        "dtype": _ONNX_DTYPES[arg.type],
        "shape": [d if isinstance(d, int) else -1 for d in arg.shape],
        "quantization": None,
    }


def onnx_tensors(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Inputs and outputs as ONNX Runtime reports them, in manifest form."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return (
        [_onnx_tensor(a) for a in session.get_inputs()],
        [_onnx_tensor(a) for a in session.get_outputs()],
    )


def preprocess(
    images: np.ndarray, preprocessing: dict[str, Any], tensor: dict[str, Any]
) -> np.ndarray:
    """uint8 images [N, H, W] (mode L) or [N, H, W, 3] (RGB) -> input tensors [N, ...].

    value = (pixel - mean) / std, then q = round(value / scale) + zero_point clipped to the
    dtype for a quantized input; with ``pixels`` the uint8 values go in unchanged.
    """
    x = images if images.ndim == 4 else images[..., np.newaxis]
    if preprocessing["layout"] == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    dtype = np.dtype(tensor["dtype"])
    if preprocessing["pixels"]:
        return x.astype(dtype)
    value = (x.astype(np.float64) - preprocessing["mean"]) / preprocessing["std"]
    quant = tensor["quantization"]
    if quant is None:
        return value.astype(dtype)
    info = np.iinfo(dtype)
    q = np.round(value / quant["scale"]) + quant["zero_point"]
    return np.clip(q, info.min, info.max).astype(dtype)


def predict(path: Path, fmt: str, batch: np.ndarray) -> np.ndarray:
    """Run the model file one sample at a time (the inputs have batch 1); argmax per sample."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return np.array([int(np.argmax(session.run(None, {name: x[None]})[0])) for x in batch])
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]["index"]
    out = interpreter.get_output_details()[0]["index"]
    answers = []
    for x in batch:
        interpreter.set_tensor(inp, x[None])
        interpreter.invoke()
        answers.append(int(np.argmax(interpreter.get_tensor(out))))
    return np.array(answers)


def describe(path: Path, fmt: str) -> dict[str, Any]:
    """name-independent manifest fields read from the file: file, sha256, size, tensors."""
    inputs, outputs = onnx_tensors(path) if fmt == "onnx" else tflite_tensors(path)
    return {
        "format": fmt,
        "file": path.name,
        "sha256": sha256_file(path),
        "size": path.stat().st_size,
        "inputs": inputs,
        "outputs": outputs,
    }


def write_manifest(model_path: Path, manifest: dict[str, Any]) -> Path:
    """Write ``<stem>.json`` beside the model file."""
    out = model_path.with_suffix(".json")
    out.write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def write_npz(path: Path, **arrays: np.ndarray) -> None:
    """Like ``np.savez_compressed`` but byte-identical across runs (fixed zip timestamps)."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, array in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())
