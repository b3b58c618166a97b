"""The committed models under models/ are what their manifests say they are.

For every manifest (``models/**/*.json``):

- it validates against `protocol.manifest.Manifest`;
- its sha256 and size match the committed model file;
- its inputs and outputs (names, dtypes, shapes, quantization) equal what LiteRT or ONNX
  Runtime reports for that file, and its preprocessing fits the input (mode and channels,
  size, layout; ``pixels`` only with a uint8 input);
- the file runs once on a zero input and gives outputs of the declared dtype and shape;
- with ``accuracy``: running the file over the whole ``test_set``, preprocessed as the
  manifest says (value = (pixel - mean) / std, then q = round(value / scale) + zero_point
  clipped for a quantized input), gets top-1 >= 0.97, and exactly
  round(top1 * samples) answers right.

And every ``service.yaml`` under models/ parses and names a model file that exists, with
its manifest beside it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mqinfer.node.runtimes.onnx import tensor_info
from mqinfer.protocol.manifest import Manifest, Preprocessing, TensorInfo

MODELS = Path(__file__).resolve().parents[2] / "models"
MANIFESTS = sorted(MODELS.rglob("*.json"))
SERVICES = sorted(MODELS.rglob("service.yaml"))
MIN_TOP1 = 0.97


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(MODELS)) for p in paths]


def _load(path: Path) -> Manifest:
    return Manifest.model_validate_json(path.read_text())


def _model_path(manifest_path: Path, manifest: Manifest) -> Path:
    return manifest_path.parent / manifest.file


class _Runner:
    """One model file behind LiteRT or ONNX Runtime: tensor details and single-sample runs."""

    def __init__(self, path: Path, fmt: str) -> None:
        self.fmt = fmt
        if fmt == "onnx":
            import onnxruntime as ort

            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            self.inputs = [tensor_info(a) for a in self.session.get_inputs()]
            self.outputs = [tensor_info(a) for a in self.session.get_outputs()]
        else:
            from ai_edge_litert.interpreter import Interpreter

            self.interpreter = Interpreter(model_path=str(path))
            self.interpreter.allocate_tensors()
            self._in = self.interpreter.get_input_details()
            self._out = self.interpreter.get_output_details()
            self.inputs = [self._tflite_info(d) for d in self._in]
            self.outputs = [self._tflite_info(d) for d in self._out]

    @staticmethod
    def _tflite_info(detail: dict[str, Any]) -> TensorInfo:
        scale, zero_point = detail["quantization"]
        signature = detail.get("shape_signature")
        shape = signature if signature is not None and len(signature) else detail["shape"]
        quantization = (
            {"scale": float(scale), "zero_point": int(zero_point)} if scale != 0 else None
        )
        return TensorInfo.model_validate(
            {
                "name": detail["name"],
                "dtype": np.dtype(detail["dtype"]).name,
                "shape": [int(d) for d in shape],
                "quantization": quantization,
            }
        )

    def run(self, x: np.ndarray) -> np.ndarray:
        """First output for one input sample with its batch dimension."""
        if self.fmt == "onnx":
            return np.asarray(self.session.run(None, {self.inputs[0].name: x})[0])
        self.interpreter.set_tensor(self._in[0]["index"], x)
        self.interpreter.invoke()
        return np.asarray(self.interpreter.get_tensor(self._out[0]["index"]))


def _preprocess(images: np.ndarray, pre: Preprocessing, tensor: TensorInfo) -> np.ndarray:
    """uint8 images [N, H, W] or [N, H, W, C] -> input tensors [N, ...] as the manifest says."""
    x = images if images.ndim == 4 else images[..., np.newaxis]
    if pre.layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    dtype = np.dtype(tensor.dtype)
    if pre.pixels:
        return x.astype(dtype)
    value = (x.astype(np.float64) - pre.mean) / pre.std
    if tensor.quantization is None:
        return value.astype(dtype)
    info = np.iinfo(dtype)
    q = np.round(value / tensor.quantization.scale) + tensor.quantization.zero_point
    return np.clip(q, info.min, info.max).astype(dtype)


def test_models_are_committed() -> None:
    assert MANIFESTS, "no manifests under models/"
    assert SERVICES, "no service.yaml under models/"


@pytest.mark.parametrize("manifest_path", MANIFESTS, ids=_ids(MANIFESTS))
def test_manifest_describes_its_file(manifest_path: Path) -> None:
    manifest = _load(manifest_path)
    model = _model_path(manifest_path, manifest)
    assert model.is_file(), f"{manifest.file} missing beside {manifest_path.name}"
    data = model.read_bytes()
    assert manifest.size == len(data)
    assert manifest.sha256 == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("manifest_path", MANIFESTS, ids=_ids(MANIFESTS))
def test_tensors_match_runtime(manifest_path: Path) -> None:
    manifest = _load(manifest_path)
    runner = _Runner(_model_path(manifest_path, manifest), manifest.format)
    assert manifest.inputs == runner.inputs
    assert manifest.outputs == runner.outputs

    pre = manifest.preprocessing
    if pre is not None:
        (tensor,) = manifest.inputs
        shape = tensor.shape
        width, height = pre.size
        channels = 1 if pre.mode == "L" else 3
        if pre.layout == "NHWC":
            assert shape[1:] == [height, width, channels]
        else:
            assert shape[1:] == [channels, height, width]
        if pre.pixels:
            assert tensor.dtype == "uint8"

    feed = np.zeros(manifest.inputs[0].shape, dtype=manifest.inputs[0].dtype)
    out = runner.run(feed)
    assert out.dtype == np.dtype(manifest.outputs[0].dtype)
    assert list(out.shape) == manifest.outputs[0].shape
    if manifest.labels:
        assert out.shape[-1] == len(manifest.labels)


WITH_ACCURACY = [p for p in MANIFESTS if _load(p).accuracy is not None]


@pytest.mark.parametrize("manifest_path", WITH_ACCURACY, ids=_ids(WITH_ACCURACY))
def test_accuracy_is_measured(manifest_path: Path) -> None:
    manifest = _load(manifest_path)
    accuracy = manifest.accuracy
    assert accuracy is not None
    assert manifest.test_set is not None and manifest.preprocessing is not None
    with np.load(manifest_path.parent / manifest.test_set) as data:
        images, labels = data["images"], data["labels"]
    assert images.dtype == np.uint8 and labels.dtype == np.int64
    assert len(images) == len(labels) == accuracy.samples

    runner = _Runner(_model_path(manifest_path, manifest), manifest.format)
    batch = _preprocess(images, manifest.preprocessing, manifest.inputs[0])
    answers = np.array([int(np.argmax(runner.run(x[np.newaxis]))) for x in batch])
    correct = int((answers == labels).sum())
    assert accuracy.top1 >= MIN_TOP1
    assert correct == round(accuracy.top1 * accuracy.samples)


@pytest.mark.parametrize("service_path", SERVICES, ids=_ids(SERVICES))
def test_service_names_a_model(service_path: Path) -> None:
    yaml = pytest.importorskip("yaml")
    service = yaml.safe_load(service_path.read_text())
    assert isinstance(service["name"], str) and service["name"]
    assert isinstance(service["replicas"], int) and service["replicas"] >= 1
    model = service_path.parent / service["model"]
    assert model.is_file()
    manifest = _load(model.with_suffix(".json"))
    assert manifest.file == model.name
