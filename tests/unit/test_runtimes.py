"""node.runtimes: the backends on this machine, loading the digits models, running them."""

from __future__ import annotations

import functools
import io
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image

from mqinfer.node.runtimes import (
    RUNTIMES,
    Candidates,
    RuntimeFailure,
    available_backends,
    backends_for,
    candidates,
    choice,
    fastest,
    format_of,
    import_runtimes,
    runtimes_for,
    unknown_runtimes,
    warm_up,
)
from mqinfer.node.runtimes import label as runtime_label
from mqinfer.node.runtimes.base import Model
from mqinfer.node.runtimes.edgetpu import EdgeTpuBackend
from mqinfer.node.runtimes.onnx import providers_in_order, tensor_info
from mqinfer.node.runtimes.openvino import OpenVinoBackend, tflite_quantization
from mqinfer.protocol.manifest import Manifest, TensorInfo
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


# ---- several runtimes per format, in an order of preference ------------------------------


class FakeCore:
    def __init__(self, devices: list[str]) -> None:
        self.available_devices = devices

    def get_property(self, device: str, name: str) -> str:
        assert name == "FULL_DEVICE_NAME"
        return {"CPU": "Some CPU", "GPU": "Intel(R) Arc(TM) A380"}.get(device, device)


def fake_openvino(*devices: str) -> SimpleNamespace:
    return SimpleNamespace(Core=lambda: FakeCore(list(devices)), Tensor=None)


def fake_litert() -> SimpleNamespace:
    def load_delegate(library: str) -> object:
        raise OSError(f"{library}: cannot open shared object file")

    return SimpleNamespace(Interpreter=None, load_delegate=load_delegate)


def test_one_runtime_per_format_is_served_by_that_runtime_as_before() -> None:
    ort = SimpleNamespace(get_available_providers=lambda: ["CPUExecutionProvider"])
    modules = {"litert": fake_litert(), "onnxruntime": ort}
    found = runtimes_for(modules)  # type: ignore[arg-type]
    assert {fmt: [b.key for b in found[fmt]] for fmt in found} == {
        "tflite": ["litert"],
        "onnx": ["onnxruntime"],
    }
    backends = backends_for(modules)  # type: ignore[arg-type]
    assert not any(isinstance(b, Candidates) for b in backends.values())
    assert (backends["tflite"].key, backends["onnx"].key) == ("litert", "onnxruntime")
    assert candidates(backends["tflite"]) == [backends["tflite"]]


def test_several_runtimes_are_listed_in_the_order_of_preference() -> None:
    modules = {
        "litert": fake_litert(),
        "onnxruntime": SimpleNamespace(get_available_providers=lambda: ["CPUExecutionProvider"]),
        "openvino": fake_openvino("GPU", "CPU", "GNA"),
    }
    found = runtimes_for(modules)  # type: ignore[arg-type]
    assert [runtime_label(b) for b in found["tflite"]] == ["litert", "openvino", "openvino GPU"]
    assert [runtime_label(b) for b in found["onnx"]] == ["onnxruntime", "openvino", "openvino GPU"]
    assert "edgetpu_tflite" not in found  # OpenVINO does not run Edge TPU models
    backends = backends_for(modules)  # type: ignore[arg-type]
    tflite = backends["tflite"]
    assert isinstance(tflite, Candidates)
    assert tflite.key == "litert" and tflite.formats == ("tflite",)  # the preferred one
    assert [runtime_label(b) for b in candidates(tflite)] == ["litert", "openvino", "openvino GPU"]
    assert [b.device for b in found["tflite"][1:]] == ["CPU", "GPU"]  # type: ignore[attr-defined]


def test_openvino_alone_serves_both_formats_and_without_a_device_serves_nothing() -> None:
    alone = backends_for({"openvino": fake_openvino("CPU")})  # type: ignore[dict-item]
    assert sorted(alone) == ["onnx", "tflite"]
    assert all(b.key == "openvino" and runtime_label(b) == "openvino" for b in alone.values())
    assert backends_for({"openvino": fake_openvino()}) == {}  # type: ignore[dict-item]


def test_runtime_names_are_checked_against_the_known_runtimes() -> None:
    assert RUNTIMES == ("litert", "tflite_runtime", "onnxruntime", "openvino")
    assert unknown_runtimes(["openvino", "litert"]) == []
    assert unknown_runtimes(["openvino", "tensorrt", "LiteRT"]) == ["tensorrt", "LiteRT"]
    only = import_runtimes(["onnxruntime"])
    assert set(only) <= {"onnxruntime"}
    assert import_runtimes([]) == {}


def test_the_capability_probe_reads_the_one_registry() -> None:
    from mqinfer.node import capabilities
    from mqinfer.node.runtimes import RUNTIME_MODULES, registry

    assert registry.NAMES == RUNTIMES == tuple(RUNTIME_MODULES)
    assert not hasattr(capabilities, "_RUNTIMES")  # no second table
    probe = capabilities.probe_runtimes()
    assert set(probe.runtimes) | {k for k in probe.absent if k in RUNTIMES} == set(RUNTIMES)


# ---- the fastest runtime, measured --------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeModel:
    def __init__(self, backend: FakeBackend) -> None:
        self.backend = backend
        self.inputs = [TensorInfo(name="x", dtype="float32", shape=[1, 4])]
        self.outputs = [TensorInfo(name="y", dtype=backend.out_dtype, shape=[1, 2])]
        self.closed = False

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        assert not self.closed
        assert [a.shape for a in inputs] == [(1, 4)] and inputs[0].dtype == np.float32
        self.backend.runs += 1
        if self.backend.fails:
            raise RuntimeFailure(f"{self.backend.key} failed running it")
        self.backend.clock.now += self.backend.cost
        return [np.zeros((1, 2), np.float32)]

    def close(self) -> None:
        self.closed = True


class FakeBackend:
    """A runtime whose every run takes `cost` seconds of a fake clock."""

    formats: tuple[str, ...] = ("tflite",)

    def __init__(
        self,
        key: str,
        cost: float,
        clock: Clock,
        refuses: bool = False,
        fails: bool = False,
        out_dtype: str = "float32",
    ) -> None:
        self.key, self.cost, self.clock = key, cost, clock
        self.refuses, self.fails, self.out_dtype = refuses, fails, out_dtype
        self.runs = 0
        self.models: list[FakeModel] = []

    def load(self, path: str, threads: int) -> FakeModel:
        if self.refuses:
            raise RuntimeFailure(f"{self.key} cannot load {path}: unsupported operator")
        model = FakeModel(self)
        self.models.append(model)
        return model


def test_the_fastest_runtime_serves_and_the_others_are_closed() -> None:
    clock = Clock()
    slow, fast = FakeBackend("litert", 0.0007, clock), FakeBackend("openvino", 0.0005, clock)
    measured = fastest([slow, fast], "m.tflite", 1, clock=clock)
    assert measured.backend is fast and measured.runtime == "openvino"
    assert measured.model is fast.models[0] and not fast.models[0].closed
    assert slow.models[0].closed
    assert measured.ms == pytest.approx({"litert": 0.7, "openvino": 0.5})
    assert measured.summary() == "litert 0.70 ms, openvino 0.50 ms: serving with openvino"
    assert slow.runs == fast.runs == choice.WARM + choice.RUNS


def test_the_preferred_runtime_keeps_serving_unless_another_is_clearly_faster() -> None:
    clock = Clock()
    first, close_behind = (
        FakeBackend("litert", 0.001, clock),
        FakeBackend("openvino", 0.00095, clock),
    )
    assert fastest([first, close_behind], "m", 1, clock=clock).runtime == "litert"
    clock = Clock()
    first, tie = FakeBackend("litert", 0.001, clock), FakeBackend("openvino", 0.001, clock)
    assert fastest([first, tie], "m", 1, clock=clock).runtime == "litert"
    clock = Clock()
    slow, quick = FakeBackend("litert", 0.001, clock), FakeBackend("openvino", 0.0008, clock)
    assert fastest([slow, quick], "m", 1, clock=clock).runtime == "openvino"


def test_runtimes_that_cannot_run_the_model_are_left_out_with_the_reason() -> None:
    clock = Clock()
    refuses = FakeBackend("litert", 0.0001, clock, refuses=True)
    fails = FakeBackend("tflite_runtime", 0.0001, clock, fails=True)
    works = FakeBackend("openvino", 0.002, clock)
    measured = fastest([refuses, fails, works], "m.tflite", 1, clock=clock)
    assert measured.runtime == "openvino"
    assert measured.ms == pytest.approx({"openvino": 2.0})
    assert measured.left_out == {
        "litert": "litert cannot load m.tflite: unsupported operator",
        "tflite_runtime": "tflite_runtime failed running it",
    }
    assert fails.models[0].closed
    assert measured.summary().endswith("serving with openvino")


def test_a_runtime_that_describes_the_tensors_otherwise_is_left_out() -> None:
    clock = Clock()
    first = FakeBackend("litert", 0.002, clock)
    other = FakeBackend("openvino", 0.0001, clock, out_dtype="float16")
    measured = fastest([first, other], "m", 1, clock=clock)
    assert measured.runtime == "litert"
    assert "float16" in measured.left_out["openvino"] and "litert" in measured.left_out["openvino"]
    assert other.models[0].closed


def test_no_runtime_can_run_the_model_is_a_failure_naming_each() -> None:
    clock = Clock()
    with pytest.raises(RuntimeFailure) as info:
        fastest(
            [
                FakeBackend("litert", 0.001, clock, refuses=True),
                FakeBackend("openvino", 0.001, clock, fails=True),
            ],
            "m.tflite",
            1,
            clock=clock,
        )
    assert str(info.value) == (
        "litert: litert cannot load m.tflite: unsupported operator; "
        "openvino: openvino failed running it"
    )


def test_slow_models_are_timed_fewer_times() -> None:
    clock = Clock()
    slow = FakeBackend("litert", 0.6, clock)  # over the budget after two timed runs
    measured = fastest([slow, FakeBackend("openvino", 0.7, clock)], "m", 1, clock=clock)
    assert slow.runs == choice.WARM + choice.MIN_RUNS
    assert measured.runtime == "litert"


def test_a_replica_serves_with_the_measured_runtime_and_says_so(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mqinfer.node import replica as replica_module
    from mqinfer.node.replica import Replica
    from mqinfer.protocol import messages as m

    clock = Clock()
    monkeypatch.setattr(replica_module, "fastest", functools.partial(fastest, clock=clock))
    slow, fast = FakeBackend("litert", 0.0007, clock), FakeBackend("openvino", 0.0005, clock)
    spec = m.ServiceSpec(
        name="digits", model="m.tflite", artifact="ab" * 32, format="tflite", size=1, workers=2
    )
    replica = Replica(
        node_id="n1",
        spec=spec,
        path=Path("m.tflite"),
        backend=Candidates("tflite", [slow, fast]),
        answer=lambda job, served: None,
    )
    with caplog.at_level("INFO", logger="mqinfer.node"):
        detail = replica.load()
    assert detail["runtime"] == replica.runtime == "openvino"
    assert detail["measured_ms"] == pytest.approx({"litert": 0.7, "openvino": 0.5})
    assert len(fast.models) == 2 and len(slow.models) == 1  # the second worker: openvino
    assert replica.backend is fast
    assert "digits: litert 0.70 ms, openvino 0.50 ms: serving with openvino" in caplog.text
    replica.close()

    single = Replica(
        node_id="n1", spec=spec, path=Path("m.tflite"), backend=slow, answer=lambda j, s: None
    )
    detail = single.load()
    assert detail["runtime"] == "litert" and "measured_ms" not in detail
    assert len(slow.models) == 3  # two workers, no measurement
    single.close()


def test_a_pipeline_stage_serves_with_the_runtime_its_split_was_verified_with(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """[T-PIPE-6] however fast another runtime is; a node without that runtime serves
    with what it has and says so."""
    from mqinfer.node import replica as replica_module
    from mqinfer.node.replica import Replica
    from tests.unit.test_provision import pipeline_spec

    def stage0(runtime: str | None, backend: Any) -> Replica:
        spec = pipeline_spec()
        assert spec.pipeline is not None
        pipeline = spec.pipeline.model_copy(update={"runtime": runtime})
        return Replica(
            node_id="n1",
            spec=spec.model_copy(update={"pipeline": pipeline}),
            path=Path("digits.seg0.tflite"),
            backend=backend,
            answer=lambda job, served: None,
            stage=0,
        )

    clock = Clock()
    monkeypatch.setattr(replica_module, "fastest", functools.partial(fastest, clock=clock))
    litert, openvino = FakeBackend("litert", 0.0007, clock), FakeBackend("openvino", 0.0001, clock)
    verified = stage0("litert", Candidates("tflite", [openvino, litert]))
    detail = verified.load()
    assert detail["runtime"] == verified.runtime == "litert" and "measured_ms" not in detail
    assert verified.backend is litert and not openvino.models  # not even measured
    verified.close()

    older = stage0(None, Candidates("tflite", [litert, openvino]))  # split before the field
    assert older.load()["runtime"] == "openvino"
    older.close()

    with caplog.at_level("WARNING", logger="mqinfer.node"):
        elsewhere = stage0("tflite_runtime", Candidates("tflite", [litert, openvino]))
        assert elsewhere.load()["runtime"] == "openvino"
    assert "digits:0: verified with tflite_runtime, which this node does not have" in caplog.text
    elsewhere.close()


# ---- OpenVINO -------------------------------------------------------------------------------


def test_openvino_reports_the_tensors_of_the_manifest(
    openvino: Any, digits: tuple[Manifest, Path, str]
) -> None:
    """Names, dtypes, shapes, and the int8 model's quantization (read from the file, as
    LiteRT reports it), for the .onnx and both .tflite files."""
    manifest, path, _ = digits
    model = OpenVinoBackend(openvino).load(str(path), 1)
    assert model.inputs == manifest.inputs
    assert model.outputs == manifest.outputs
    model.close()


def test_openvino_honours_the_threads_in_f32(openvino: Any) -> None:
    for threads in (1, 2):
        model = OpenVinoBackend(openvino).load(str(DIGITS / "digits.onnx"), threads)
        assert model.settings == {
            "INFERENCE_NUM_THREADS": str(threads),
            "INFERENCE_PRECISION_HINT": "f32",
            "PERFORMANCE_HINT": "LATENCY",
        }


def test_tflite_quantization_is_what_litert_reports() -> None:
    modules = import_runtimes(["litert"])
    if "litert" not in modules:
        pytest.skip("LiteRT does not import here")
    for name in ("digits_int8.tflite", "digits_f32.tflite"):
        path = _need(DIGITS / name)
        it = modules["litert"].Interpreter(model_path=str(path))
        litert = {
            str(d["name"]): d["quantization"]
            for d in [*it.get_input_details(), *it.get_output_details()]
        }
        ours = tflite_quantization(path.read_bytes())
        assert sorted(ours) == sorted(k for k, (scale, _) in litert.items() if scale)
        for tensor, q in ours.items():
            scale, zero_point = litert[tensor]
            assert q.scale == pytest.approx(scale) and q.zero_point == zero_point
        assert bool(ours) == (name == "digits_int8.tflite")
    assert tflite_quantization(b"") == {}
    assert tflite_quantization(b"\x08\x00\x00\x00TFL3" + b"\xff" * 8) == {}
    data = (DIGITS / "digits_int8.tflite").read_bytes()
    assert tflite_quantization(data[: len(data) // 3]) in ({}, tflite_quantization(data))


@pytest.mark.parametrize("suffix", [".tflite", ".onnx"])
@pytest.mark.parametrize("content", [b"", b"this is not a model" * 10], ids=["empty", "garbage"])
def test_openvino_refuses_a_corrupt_file_naming_it(
    openvino: Any, tmp_path: Path, suffix: str, content: bytes
) -> None:
    path = tmp_path / f"corrupt{suffix}"
    path.write_bytes(content)
    with pytest.raises(RuntimeFailure) as info:
        OpenVinoBackend(openvino).load(str(path), 1)
    text = str(info.value)
    assert text.startswith(f"OpenVINO (CPU) cannot load {path}: ")
    assert "\n" not in text and "Exception from src" not in text
    with pytest.raises(RuntimeFailure, match=r"cannot load .*absent\.onnx"):
        OpenVinoBackend(openvino).load(str(tmp_path / "absent.onnx"), 1)


def test_openvino_refuses_wrong_inputs_and_a_closed_model(
    openvino: Any, digits: tuple[Manifest, Path, str]
) -> None:
    _, path, _ = digits
    model = OpenVinoBackend(openvino).load(str(path), 1)
    spec = model.inputs[0]
    with pytest.raises(RuntimeFailure, match="cannot take a float64 array"):
        model.run([np.zeros(spec.shape, np.float64)])
    with pytest.raises(RuntimeFailure, match=r"cannot take an array of shape \[2,"):
        model.run([np.zeros([2, *spec.shape[1:]], spec.dtype)])
    with pytest.raises(RuntimeFailure, match="1 input"):
        model.run([])
    first = model.run([np.zeros(spec.shape, spec.dtype)])[0]
    kept = first.copy()
    model.run([np.full(spec.shape, 100, spec.dtype)])
    assert first.tobytes() == kept.tobytes()  # results are copies
    model.close()
    with pytest.raises(RuntimeFailure, match="closed"):
        model.run([np.zeros(spec.shape, spec.dtype)])


def test_openvino_equals_the_runtime_of_the_format_on_the_held_out_set(
    openvino: Any,
    backends: dict[str, Any],
    digits: tuple[Manifest, Path, str],
    test_set: tuple[np.ndarray, np.ndarray],
) -> None:
    """Float models: equal to LiteRT / ONNX Runtime within float32 rounding (both compute
    in f32, summing in another order: the outputs are probabilities of about 1e-3 to 1, and
    differ by a few float32 ulps, so atol 1e-6 plus rtol 1e-5). The int8 model: the same
    top class for every image, and the int8 scores at most one quantum apart."""
    manifest, path, fmt = digits
    inputs = _inputs(manifest, test_set[0])
    ours = np.concatenate(_run_all(OpenVinoBackend(openvino).load(str(path), 1), inputs))
    theirs = np.concatenate(_run_all(candidates(backends[fmt])[0].load(str(path), 1), inputs))
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape == (len(inputs), 10)
    if ours.dtype == np.int8:
        np.testing.assert_array_equal(ours.argmax(axis=1), theirs.argmax(axis=1))
        assert int(np.abs(ours.astype(int) - theirs.astype(int)).max()) <= 1
    else:
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_the_probe_announces_openvino_and_only_its_real_accelerators(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """CPU only: OpenVINO is a runtime with its devices, and the cpu lists it; no accelerator
    kind is added. A GPU and an NPU OpenVINO lists are accelerators of those kinds."""
    from mqinfer.node import capabilities

    fake = fake_openvino("CPU")
    monkeypatch.setitem(sys.modules, "openvino", fake)
    probe = capabilities.probe_runtimes(["openvino"])
    assert list(probe.runtimes) == ["openvino"]
    assert probe.runtimes["openvino"].providers == ["CPU"]
    assert probe.runtimes["openvino"].formats == ["tflite", "onnx"]
    assert probe.formats == ["tflite", "onnx"]
    assert [(a.kind, a.runtime) for a in probe.accelerators] == [("cpu", "openvino")]
    for other in ("litert", "tflite_runtime", "onnxruntime"):
        assert probe.absent[other] == "not used on this node (--runtime openvino)"
    assert probe.absent["gpu"] == "onnxruntime not used on this node (--runtime openvino)"

    monkeypatch.setitem(sys.modules, "openvino", fake_openvino("CPU", "GPU", "NPU"))
    probe = capabilities.probe_runtimes(["openvino"])
    assert [(a.kind, a.name, a.runtime, a.detail) for a in probe.accelerators[1:]] == [
        ("gpu", "Intel(R) Arc(TM) A380", "openvino", {"device": "GPU"}),
        ("npu", "NPU", "openvino", {"device": "NPU"}),
    ]
    assert "gpu" not in probe.absent

    monkeypatch.setitem(sys.modules, "openvino", fake_openvino())
    probe = capabilities.probe_runtimes(["openvino"])
    assert probe.runtimes == {} and probe.formats == []
    assert probe.absent["openvino"] == (
        "openvino imports but lists no device (Core().available_devices)"
    )


def test_the_probe_without_a_selection_keeps_every_runtime(openvino: Any) -> None:
    from mqinfer.node import capabilities

    probe = capabilities.probe_runtimes()
    assert "openvino" in probe.runtimes and "litert" in probe.runtimes
    assert next(iter(probe.runtimes)) == "litert"  # the cpu still names the first
    assert "CPU" in probe.runtimes["openvino"].providers
    cpu = probe.accelerators[0]
    assert cpu.kind == "cpu" and "openvino" in cpu.detail["runtimes"]
    assert "openvino" not in {a.kind for a in probe.accelerators}


# ---- the runtime of a replica, from the deploy reply to `mqinfer status` ---------------------


def test_the_status_carries_the_runtime_each_deploy_reply_names() -> None:
    from mqinfer.coordinator.provision import Provisioner, PublishStatus, SendCommand
    from mqinfer.coordinator.registry import NodeRecord, Registry
    from mqinfer.coordinator.status import as_text
    from mqinfer.protocol import messages as m

    reg = Registry()
    for node in ("n1", "n2", "n3"):
        host = m.Host(
            hostname=node, os="Linux", arch="x86_64", cores=2, memory_total_mb=4096, python="3"
        )
        caps = m.Capabilities(
            node=node,
            session=1,
            ts=0.0,
            agent="0",
            host=host,
            runtimes={},
            accelerators=[m.Accelerator(kind="cpu", name="cpu", runtime="litert")],
            formats=["tflite"],
        )
        reg.nodes[node] = NodeRecord(id=node, state="online", session=1, caps=caps)
    spec = m.ServiceSpec(
        name="digits", model="d.tflite", artifact="ab" * 32, format="tflite", size=1, replicas=3
    )
    p = Provisioner(grace=0.0)
    p.on_spec("digits", spec)
    actions = p.step(reg, 0.0) + p.step(reg, 0.1)
    cmds = [a for a in actions if isinstance(a, SendCommand)]
    assert len(cmds) == 3
    said: list[object] = ["openvino", "x" * 65, {"not": "a name"}]
    for cmd, runtime in zip(cmds, said, strict=True):
        result = {"service": "digits", "state": "ready", "runtime": runtime}
        p.on_reply(m.CommandReply(node=cmd.node, id=cmd.command.id, ok=True, result=result), 1)
    (status,) = [a.status for a in p.step(reg, 1.5) if isinstance(a, PublishStatus)]
    assert status is not None and status.state == "ready"
    by_node = {r.node: r.runtime for r in status.replicas}
    assert by_node == {cmds[0].node: "openvino", cmds[1].node: None, cmds[2].node: None}
    assert m.ServiceStatus.model_validate_json(status.model_dump_json()) == status

    service = {
        "name": "digits",
        "spec": {"model": "d.tflite", "format": "tflite", "replicas": 3, "stages": 0},
        "state": "ready",
        "reason": None,
        "replicas": [r.model_dump(exclude_none=True) for r in status.replicas],
    }
    view = {"coordinator": None, "nodes": [], "services": [service]}
    row = as_text(view).splitlines()[-1]
    assert f"3/3: {cmds[0].node} (openvino), " in row, row


def test_a_runtime_name_on_the_wire_is_checked() -> None:
    from pydantic import ValidationError

    from mqinfer.protocol import messages as m

    for good in ("litert", "onnxruntime", "openvino", "openvino GPU.1", "tflite_runtime"):
        assert m.runtime_name(good) == good
        assert m.ReplicaStatus(node="n1", state="ready", runtime=good).runtime == good
    for bad in ("", " openvino", "openvino  GPU", "a/b", "x" * 65, 3, None, "ok\n"):
        assert m.runtime_name(bad) is None
    for bad in ("a/b", "ok\n", "x" * 65):
        with pytest.raises(ValidationError):
            m.ReplicaStatus(node="n1", state="ready", runtime=bad)


def test_node_runtime_option_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from mqinfer.cli.node import runtimes_wanted

    parser = argparse.ArgumentParser(prog="mqinfer node")
    monkeypatch.delenv("MQINFER_RUNTIMES", raising=False)
    assert runtimes_wanted(parser, None) is None
    assert runtimes_wanted(parser, ["openvino", "litert", "openvino"]) == ["openvino", "litert"]
    assert runtimes_wanted(parser, ["litert,onnxruntime"]) == ["litert", "onnxruntime"]
    monkeypatch.setenv("MQINFER_RUNTIMES", "openvino, onnxruntime")
    assert runtimes_wanted(parser, None) == ["openvino", "onnxruntime"]
    assert runtimes_wanted(parser, ["litert"]) == ["litert"]  # the option wins


@pytest.mark.parametrize(
    ("argv", "env", "said"),
    [
        (
            ["tensorrt"],
            "",
            "--runtime: unknown runtime 'tensorrt'; expected litert, "
            "tflite_runtime, onnxruntime, openvino",
        ),
        ([""], "", "--runtime: expected a runtime name"),
        (None, "litert,OpenVINO", "MQINFER_RUNTIMES: unknown runtime 'OpenVINO'; expected"),
    ],
)
def test_an_unknown_runtime_stops_the_node_with_the_known_ones(
    argv: list[str] | None,
    env: str,
    said: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import argparse

    from mqinfer.cli.node import runtimes_wanted

    monkeypatch.setenv("MQINFER_RUNTIMES", env)
    with pytest.raises(SystemExit) as info:
        runtimes_wanted(argparse.ArgumentParser(prog="mqinfer node"), argv)
    assert info.value.code == 2
    assert said in capsys.readouterr().err
