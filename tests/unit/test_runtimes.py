"""node.runtimes: the backends on this machine, loading the digits models, running them."""

from __future__ import annotations

import io
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image

from mqinfer.node.runtimes import (
    RuntimeFailure,
    available_backends,
    backends_for,
    format_of,
    import_runtimes,
    warm_up,
)
from mqinfer.node.runtimes.base import Model
from mqinfer.node.runtimes.edgetpu import EdgeTpuBackend
from mqinfer.node.runtimes.onnx import providers_in_order, tensor_info
from mqinfer.protocol.manifest import Manifest
from mqinfer.protocol.payload import decode_request, top_k

DIGITS = Path(__file__).resolve().parents[2] / "models" / "digits"
MODELS = {  # manifest -> (model file, format)
    "digits_int8.json": ("digits_int8.tflite", "tflite"),
    "digits_f32.json": ("digits_f32.tflite", "tflite"),
    "digits.json": ("digits.onnx", "onnx"),
}


@pytest.fixture(scope="module")
def backends() -> dict[str, Any]:
    return dict(available_backends())


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} has not been built")
    return path


@pytest.fixture(scope="module")
def test_set() -> tuple[np.ndarray, np.ndarray]:
    with np.load(_need(DIGITS / "digits_test.npz")) as data:
        return data["images"], data["labels"]


@pytest.fixture(params=list(MODELS), ids=[f for f, _ in MODELS.values()])
def digits(request: pytest.FixtureRequest) -> tuple[Manifest, Path, str]:
    manifest_name = request.param
    file, fmt = MODELS[manifest_name]
    manifest = Manifest.model_validate_json(_need(DIGITS / manifest_name).read_bytes())
    return manifest, _need(DIGITS / file), fmt


def _inputs(manifest: Manifest, images: np.ndarray) -> list[np.ndarray]:
    """One input array per image, preprocessed as the manifest says, written out by hand."""
    spec = manifest.inputs[0]
    batch = images.astype(np.float64)[:, None, :, :, None]  # [N,1,8,8,1]
    if spec.quantization is not None:  # int8, scale 1/255, zero point -128: q = pixel - 128
        arrays = (images.astype(np.int16) - 128).astype(np.int8)[:, None, :, :, None]
    else:
        arrays = (batch / 255.0).astype(np.float32)
    if manifest.preprocessing and manifest.preprocessing.layout == "NCHW":
        arrays = arrays.transpose(0, 1, 4, 2, 3)
    return [np.ascontiguousarray(a) for a in arrays]


def _direct(path: Path, fmt: str, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """The same model run straight on the runtime, without node.runtimes."""
    if fmt == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        name = session.get_inputs()[0].name
        return [session.run(None, {name: x})[0] for x in inputs]
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=1)
    interpreter.allocate_tensors()
    index_in = interpreter.get_input_details()[0]["index"]
    index_out = interpreter.get_output_details()[0]["index"]
    outputs = []
    for x in inputs:
        interpreter.set_tensor(index_in, x)
        interpreter.invoke()
        outputs.append(interpreter.get_tensor(index_out))
    return outputs


def _run_all(model: Model, inputs: list[np.ndarray]) -> list[np.ndarray]:
    return [model.run([x])[0] for x in inputs]


# ---- formats and backends ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "fmt"),
    [
        ("models/digits/digits_int8.tflite", "tflite"),
        ("/x/mobilenet_v2_edgetpu.tflite", "edgetpu_tflite"),
        ("MODEL_EDGETPU.TFLITE", "edgetpu_tflite"),
        ("a/b/digits.onnx", "onnx"),
        ("edgetpu.tflite", "tflite"),
    ],
)
def test_format_of(path: str, fmt: str) -> None:
    assert format_of(path) == fmt


@pytest.mark.parametrize("path", ["model.pb", "model.tflite.gz", "onnx", "digits.onnx.data"])
def test_format_of_unknown_names_the_file_and_the_known_suffixes(path: str) -> None:
    with pytest.raises(ValueError, match=r"\.tflite, _edgetpu\.tflite or \.onnx") as info:
        format_of(path)
    assert repr(path) in str(info.value)


def test_available_backends_here_are_tflite_and_onnx_without_edgetpu(
    backends: dict[str, Any],
) -> None:
    assert "tflite" in backends and "onnx" in backends
    assert "edgetpu_tflite" not in backends  # no Edge TPU (nor libedgetpu) on this machine
    assert backends["tflite"].key == "litert"
    assert backends["onnx"].key == "onnxruntime"
    for fmt, backend in backends.items():
        assert fmt in backend.formats


def test_onnx_providers_keep_the_build_order_with_cpu_last() -> None:
    available = ["CPUExecutionProvider", "CUDAExecutionProvider", "AzureExecutionProvider"]
    assert providers_in_order(available) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert providers_in_order(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


def test_edgetpu_backend_appears_when_the_delegate_loads() -> None:
    loaded: list[str] = []

    def load_delegate(library: str) -> object:
        loaded.append(library)
        return object()

    fake = SimpleNamespace(load_delegate=load_delegate, Interpreter=None)
    backends = backends_for({"litert": fake})  # type: ignore[dict-item]
    assert loaded and loaded[0].startswith("libedgetpu")
    assert set(backends) == {"tflite", "edgetpu_tflite"}
    assert backends["edgetpu_tflite"].key == "edgetpu"
    assert backends["edgetpu_tflite"].formats == ("edgetpu_tflite",)


def test_edgetpu_load_without_the_library_is_a_clear_failure(tmp_path: Path) -> None:
    modules = import_runtimes()
    if "litert" not in modules:
        pytest.skip("LiteRT does not import here")
    model = tmp_path / "m_edgetpu.tflite"
    model.write_bytes(b"\x00" * 64)
    with pytest.raises(RuntimeFailure, match="libedgetpu") as info:
        EdgeTpuBackend(modules["litert"]).load(str(model), 1)
    assert str(model) in str(info.value)


def test_onnx_tensor_info_maps_types_and_dynamic_dimensions() -> None:
    arg = SimpleNamespace(name="x", type="tensor(float)", shape=["batch", 3, None, 224])
    info = tensor_info(arg)
    assert (info.name, info.dtype, info.shape) == ("x", "float32", [-1, 3, -1, 224])
    assert tensor_info(SimpleNamespace(name="n", type="tensor(int64)", shape=[])).dtype == "int64"
    with pytest.raises(RuntimeFailure, match="seq"):
        tensor_info(SimpleNamespace(name="s", type="seq(tensor(float))", shape=[]))


@pytest.mark.parametrize("suffix", [".tflite", ".onnx"])
@pytest.mark.parametrize("content", [b"", b"this is not a model" * 10], ids=["empty", "garbage"])
def test_corrupt_model_file_is_a_runtime_failure_naming_the_file(
    backends: dict[str, Any], tmp_path: Path, suffix: str, content: bytes
) -> None:
    path = tmp_path / f"corrupt{suffix}"
    path.write_bytes(content)
    with pytest.raises(RuntimeFailure) as info:
        backends[format_of(str(path))].load(str(path), 1)
    message = str(info.value)
    assert str(path) in message and "cannot load" in message
    assert ("LiteRT" if suffix == ".tflite" else "ONNX Runtime") in message


def test_missing_model_file_is_a_runtime_failure(backends: dict[str, Any], tmp_path: Path) -> None:
    for name in ("absent.tflite", "absent.onnx"):
        path = tmp_path / name
        with pytest.raises(RuntimeFailure, match="cannot load"):
            backends[format_of(name)].load(str(path), 1)


# ---- the digits models ------------------------------------------------------------------


def test_reported_tensors_match_the_manifest(
    backends: dict[str, Any], digits: tuple[Manifest, Path, str]
) -> None:
    manifest, path, fmt = digits
    model = backends[fmt].load(str(path), 1)
    assert model.inputs == manifest.inputs
    assert model.outputs == manifest.outputs
    (spec,) = model.inputs
    (out,) = model.outputs
    assert out.shape == [1, 10]
    if path.name == "digits_int8.tflite":
        assert spec.dtype == "int8" and spec.shape == [1, 8, 8, 1]
        assert spec.quantization is not None and spec.quantization.zero_point == -128
        assert spec.quantization.scale == pytest.approx(1 / 255)
        assert out.dtype == "int8" and out.quantization is not None
    elif fmt == "onnx":
        assert (spec.dtype, spec.shape, spec.quantization) == ("float32", [1, 1, 8, 8], None)
    else:
        assert (spec.dtype, spec.shape, spec.quantization) == ("float32", [1, 8, 8, 1], None)
    model.close()


def test_warm_up_runs_on_zeros(
    backends: dict[str, Any], digits: tuple[Manifest, Path, str]
) -> None:
    manifest, path, fmt = digits
    model = backends[fmt].load(str(path), 1)
    (out,) = warm_up(model)
    assert out.shape == (1, 10) and out.dtype == np.dtype(manifest.outputs[0].dtype)


def test_run_equals_the_runtime_called_directly_bitwise(
    backends: dict[str, Any],
    digits: tuple[Manifest, Path, str],
    test_set: tuple[np.ndarray, np.ndarray],
) -> None:
    manifest, path, fmt = digits
    inputs = _inputs(manifest, test_set[0][:40])
    model = backends[fmt].load(str(path), 1)
    ours = _run_all(model, inputs)
    theirs = _direct(path, fmt, inputs)
    for a, b in zip(ours, theirs, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()


def test_outputs_are_copies(backends: dict[str, Any], digits: tuple[Manifest, Path, str]) -> None:
    _, path, fmt = digits
    model = backends[fmt].load(str(path), 1)
    spec = model.inputs[0]
    first = model.run([np.zeros(spec.shape, spec.dtype)])[0]
    kept = first.copy()
    model.run([np.full(spec.shape, 100, spec.dtype)])
    assert first.tobytes() == kept.tobytes()


def test_two_models_in_two_threads_agree_with_one(
    backends: dict[str, Any],
    digits: tuple[Manifest, Path, str],
    test_set: tuple[np.ndarray, np.ndarray],
) -> None:
    manifest, path, fmt = digits
    inputs = _inputs(manifest, test_set[0])
    alone = _run_all(backends[fmt].load(str(path), 1), inputs)
    models = [backends[fmt].load(str(path), 1) for _ in range(2)]
    results: list[list[np.ndarray]] = [[], []]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            results[i] = _run_all(models[i], inputs)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for result in results:
        assert len(result) == len(alone)
        assert all(a.tobytes() == b.tobytes() for a, b in zip(result, alone, strict=True))


def test_png_requests_reach_the_manifest_accuracy(
    backends: dict[str, Any],
    digits: tuple[Manifest, Path, str],
    test_set: tuple[np.ndarray, np.ndarray],
) -> None:
    """Each held-out image as a PNG request, decoded with the manifest's preprocessing and
    run: the same inputs as by hand, and the accuracy the manifest reports."""
    manifest, path, fmt = digits
    images, labels = test_set
    model = backends[fmt].load(str(path), 2)
    by_hand = _inputs(manifest, images)
    correct = 0
    for image, label, expected in zip(images, labels, by_hand, strict=True):
        out = io.BytesIO()
        Image.fromarray(image, "L").save(out, "PNG")
        decoded = decode_request(
            out.getvalue(), model.inputs, manifest.preprocessing, max_bytes=1 << 20
        )
        assert decoded.kind == "png"
        assert decoded.arrays[0].tobytes() == expected.tobytes()
        (scores,) = model.run(decoded.arrays)
        best = top_k(scores, model.outputs[0], manifest.labels, k=1)[0]
        correct += best["label"] == str(label)
    assert manifest.accuracy is not None
    assert correct == round(manifest.accuracy.top1 * manifest.accuracy.samples)
    assert correct / len(labels) > 0.95


def test_run_refuses_wrong_inputs_and_a_closed_model(
    backends: dict[str, Any], digits: tuple[Manifest, Path, str]
) -> None:
    _, path, fmt = digits
    model = backends[fmt].load(str(path), 1)
    spec = model.inputs[0]
    wrong_dtype = np.zeros(spec.shape, np.float64)
    with pytest.raises(RuntimeFailure, match="float64"):
        model.run([wrong_dtype])
    with pytest.raises(RuntimeFailure, match="shape"):
        model.run([np.zeros([2, *spec.shape[1:]], spec.dtype)])
    with pytest.raises(RuntimeFailure, match="1 input"):
        model.run([])
    model.close()
    with pytest.raises(RuntimeFailure, match="closed"):
        model.run([np.zeros(spec.shape, spec.dtype)])
