"""The one runtime registry: runtimes declare themselves, the Edge TPU is probed once, a
backend loads on the device it is given, and GPUs count only when really there.

Probe logic is exercised with injected fakes (fake runtime modules, fake nvidia-smi
output, fake GPU lists); what this machine really has is checked against the system, and
tests that need hardware skip saying which.
"""

from __future__ import annotations

import shutil
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import pytest

from mqinfer.node import capabilities, edgetpu, gpus
from mqinfer.node.runtimes import (
    RUNTIMES,
    Candidates,
    RuntimeFailure,
    available_backends,
    backends_for,
    candidates,
    import_runtimes,
    label,
    registry,
    runtimes_for,
    unknown_runtimes,
)
from mqinfer.node.runtimes.base import CPU, Device, Found, RuntimeEntry, device_label
from mqinfer.node.runtimes.edgetpu import EdgeTpuBackend
from mqinfer.node.runtimes.litert import LiteRTBackend
from mqinfer.node.runtimes.onnx import OnnxBackend, providers_for
from mqinfer.node.runtimes.openvino import OpenVinoBackend
from mqinfer.protocol.messages import Accelerator, Capabilities, Runtime

DIGITS = Path(__file__).resolve().parents[2] / "models" / "digits"
CUDA_ORT = ["CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.fixture(autouse=True)
def fresh_edgetpu_probe() -> None:
    edgetpu.forget()


def fake_ort(providers: list[str], session_providers: list[str] | None = None) -> Any:
    """An onnxruntime whose sessions run on `session_providers` (default: those asked)."""

    class Session:
        def __init__(self, path: str, sess_options: Any, providers: list[Any]) -> None:
            asked = [p if isinstance(p, str) else p[0] for p in providers]
            self.asked = providers
            self.ran = session_providers if session_providers is not None else asked

        def get_inputs(self) -> list[Any]:
            return []

        def get_outputs(self) -> list[Any]:
            return []

        def get_providers(self) -> list[str]:
            return list(self.ran)

    return SimpleNamespace(
        __version__="1.99.0",
        get_available_providers=lambda: list(providers),
        SessionOptions=lambda: SimpleNamespace(),
        InferenceSession=Session,
    )


class FakeCore:
    """OpenVINO's Core with the devices and properties given."""

    def __init__(self, devices: dict[str, dict[str, Any]]) -> None:
        self.devices = devices
        self.available_devices = list(devices)
        self.compiled: list[str] = []

    def get_property(self, device: str, name: str) -> Any:
        return self.devices[device][name]  # KeyError: a property the device does not have

    def read_model(self, path: str) -> str:
        return path

    def compile_model(self, model: str, device: str, config: dict[str, Any]) -> Any:
        self.compiled.append(device)
        raise RuntimeError(f"compiled for {device}; no model in this fake")


def fake_openvino(devices: dict[str, dict[str, Any]]) -> Any:
    core = FakeCore(devices)
    return SimpleNamespace(Core=lambda: core, Tensor=None, core=core)


def counting_litert(loads: bool) -> tuple[Any, list[str]]:
    tried: list[str] = []

    def load_delegate(library: str, options: Any = None) -> object:
        tried.append(library)
        if not loads:
            raise OSError(f"{library}: cannot open shared object file")
        return object()

    return SimpleNamespace(Interpreter=None, load_delegate=load_delegate), tried


def no_gpu() -> tuple[list[dict[str, Any]], str]:
    return [], "no /proc/driver/nvidia/gpus and libcuda.so.1 not loadable"


def one_gpu() -> tuple[list[dict[str, Any]], str]:
    return [
        {"name": "NVIDIA T4", "pci_bus": "0000:01:00.0", "memory_mb": 15360, "free_mb": 15000}
    ], ""


# ---- one registry --------------------------------------------------------------------


def test_every_runtime_comes_from_the_modules_entries() -> None:
    assert registry.NAMES == RUNTIMES == ("litert", "tflite_runtime", "onnxruntime", "openvino")
    modules = {e.module for e in registry.ENTRIES}
    assert modules == {
        "ai_edge_litert.interpreter",
        "tflite_runtime.interpreter",
        "onnxruntime",
        "openvino",
    }
    assert registry.collect() == registry.ENTRIES


def test_a_runtime_is_one_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A package whose modules declare ENTRIES: collected in order of preference; the same
    name twice is refused."""
    package = tmp_path / "fakeruntimes"
    package.mkdir()
    (package / "__init__.py").write_text("")
    entry = textwrap.dedent(
        """
        from mqinfer.node.runtimes.base import RuntimeEntry
        ENTRIES = (RuntimeEntry(key={key!r}, module="x", packages=("x",), formats=("onnx",),
                                preference={pref}, probe=None, backend=None),)
        """
    )
    (package / "b.py").write_text(entry.format(key="slow", pref=50))
    (package / "a.py").write_text(entry.format(key="fast", pref=5))
    (package / "helper.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert [e.key for e in registry.collect("fakeruntimes")] == ["fast", "slow"]
    (package / "c.py").write_text(entry.format(key="fast", pref=7))
    with pytest.raises(ValueError, match="runtime fast is declared twice"):
        registry.collect("fakeruntimes")


def test_a_new_entry_reaches_names_probe_capabilities_and_backends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Declaring a runtime is all it takes: `--runtime` knows it, the capabilities
    announce it with its accelerator, and its format is served by its backend."""
    made: list[str] = []

    class NpuBackend:
        key = "npurt"
        formats = ("onnx",)

        def __init__(self, device: str) -> None:
            self.device = device
            self.label = device_label(self.key, device)
            made.append(device)

        def load(self, path: str, threads: int, device: str | None = None) -> Any:
            raise RuntimeFailure("not in this test")

    def probe(module: ModuleType, earlier: Mapping[str, Found]) -> Found:
        npu = Accelerator(kind="npu", name="Some NPU", runtime="npurt", memory_mb=512)
        return Found((Device("NPU", ("onnx",), (npu,)),), providers=("NPU",))

    extra = RuntimeEntry(
        key="npurt",
        module="npurt",
        packages=("npurt",),
        formats=("onnx",),
        preference=99,
        probe=probe,
        backend=lambda module, device, found: NpuBackend(device.name),
    )
    monkeypatch.setattr(registry, "ENTRIES", (*registry.ENTRIES, extra))
    monkeypatch.setitem(sys.modules, "npurt", SimpleNamespace(__version__="3.1"))
    assert unknown_runtimes(["npurt", "tensorrt"]) == ["tensorrt"]

    probe_ = capabilities.probe_runtimes(["npurt"])
    assert probe_.runtimes == {
        "npurt": Runtime(package="npurt", version="3.1", formats=["onnx"], providers=["NPU"])
    }
    assert probe_.formats == ["onnx"]
    assert [(a.kind, a.runtime, a.memory_mb) for a in probe_.accelerators] == [
        ("cpu", "npurt", None),
        ("npu", "npurt", 512),
    ]
    backends = available_backends(["npurt"])
    assert list(backends) == ["onnx"] and label(backends["onnx"]) == "npurt NPU"
    assert made == ["NPU"]


# ---- the Edge TPU, probed once ----------------------------------------------------------


def test_the_edgetpu_delegate_is_tried_once_per_process() -> None:
    litert, tried = counting_litert(loads=True)
    modules = {"litert": litert}
    first = backends_for(modules)
    again = backends_for(modules)
    caps = capabilities.probe_of(registry.survey(modules))
    assert len(tried) == 1  # capabilities and both backend surveys: one load_delegate
    assert set(first) == set(again) == {"tflite", "edgetpu_tflite"}
    assert [a.kind for a in caps.accelerators] == ["cpu", "edgetpu"]
    assert caps.runtimes["litert"].providers == ["edgetpu"]
    assert caps.formats == ["tflite", "edgetpu_tflite"]
    edgetpu.forget()
    backends_for(modules)
    assert len(tried) == 2


def test_a_failed_edgetpu_probe_is_kept_too() -> None:
    litert, tried = counting_litert(loads=False)
    for _ in range(3):
        survey = registry.survey({"litert": litert})
    assert len(tried) == 1
    assert "libedgetpu" in survey.absent["edgetpu"]
    assert "edgetpu_tflite" not in survey.backends()


def test_only_the_first_tflite_runtime_carries_the_edgetpu() -> None:
    litert, tried_litert = counting_litert(loads=True)
    tflite, tried_tflite = counting_litert(loads=True)
    found = runtimes_for({"litert": litert, "tflite_runtime": tflite})
    assert [b.key for b in found["edgetpu_tflite"]] == ["edgetpu"]
    assert found["edgetpu_tflite"][0].runtime == "litert"  # type: ignore[attr-defined]
    assert [b.key for b in found["tflite"]] == ["litert", "tflite_runtime"]
    assert (len(tried_litert), len(tried_tflite)) == (1, 0)


# ---- Backend.load(path, threads, device) -------------------------------------------------


def test_litert_runs_on_the_cpu_and_refuses_another_device() -> None:
    modules = import_runtimes(["litert"])
    if "litert" not in modules:
        pytest.skip("LiteRT does not import here")
    backend = LiteRTBackend(modules["litert"])
    path = str(DIGITS / "digits_int8.tflite")
    backend.load(path, 1, "CPU").close()
    backend.load(path, 1, "cpu").close()
    with pytest.raises(RuntimeFailure, match=r"cannot run on 'GPU'.* are CPU"):
        backend.load(path, 1, "GPU")


def test_onnxruntime_runs_on_the_device_it_is_given() -> None:
    modules = import_runtimes(["onnxruntime"])
    if "onnxruntime" not in modules:
        pytest.skip("onnxruntime does not import here")
    backend = OnnxBackend(modules["onnxruntime"])
    model = backend.load(str(DIGITS / "digits.onnx"), 1, "CPU")
    assert model.providers == ["CPUExecutionProvider"]
    model.close()
    with pytest.raises(RuntimeFailure, match=r"cannot run on 'cuda:0'.* are CPU"):
        backend.load(str(DIGITS / "digits.onnx"), 1, "cuda:0")


def test_onnxruntime_gives_a_gpu_session_its_provider_and_index() -> None:
    ort = fake_ort(CUDA_ORT)
    backend = OnnxBackend(ort, "cuda:1", ("CPU", "cuda:0", "cuda:1"))
    assert backend.label == "onnxruntime cuda.1"
    model = backend.load("m.onnx", 1)
    assert model._session.asked == [  # type: ignore[attr-defined]
        ("CUDAExecutionProvider", {"device_id": 1}),
        "CPUExecutionProvider",
    ]
    assert backend.load("m.onnx", 1, "CPU").providers == ["CPUExecutionProvider"]
    assert providers_for("CPU", CUDA_ORT) == ["CPUExecutionProvider"]
    with pytest.raises(RuntimeFailure, match="no execution provider for rocm:0"):
        providers_for("rocm:0", CUDA_ORT)


def test_onnxruntime_falling_back_to_the_cpu_is_a_refusal() -> None:
    """ONNX Runtime starts a session on the CPU, with a warning, when CUDA fails: the
    backend says so instead of serving on the CPU as 'cuda:0'."""
    ort = fake_ort(CUDA_ORT, session_providers=["CPUExecutionProvider"])
    backend = OnnxBackend(ort, "cuda:0", ("CPU", "cuda:0"))
    with pytest.raises(RuntimeFailure, match="CUDAExecutionProvider did not start"):
        backend.load("m.onnx", 1)


def test_openvino_compiles_for_the_device_it_is_given() -> None:
    ov = fake_openvino({"CPU": {}, "GPU": {}})
    backend = OpenVinoBackend(ov, "CPU", ov.core, ("CPU", "GPU"))
    for device in (None, "GPU", "gpu"):
        with pytest.raises(RuntimeFailure, match="compiled for"):
            backend.load("m.onnx", 1, device)
    assert ov.core.compiled == ["CPU", "GPU", "GPU"]
    assert backend.config(2, "GPU") == {"PERFORMANCE_HINT": "LATENCY"}
    with pytest.raises(RuntimeFailure, match=r"cannot run on 'NPU'.* are CPU, GPU"):
        backend.load("m.onnx", 1, "NPU")


def test_edgetpu_backend_takes_a_named_edgetpu_and_refuses_the_cpu(tmp_path: Path) -> None:
    asked: list[tuple[Any, ...]] = []

    def load_delegate(*args: Any) -> object:
        asked.append(args)
        raise OSError("no device")

    module = SimpleNamespace(load_delegate=load_delegate)
    backend = EdgeTpuBackend(module, "litert", ("edgetpu", "usb:0"))  # type: ignore[arg-type]
    with pytest.raises(RuntimeFailure, match="did not load"):
        backend.load(str(tmp_path / "m_edgetpu.tflite"), 1, "usb:0")
    assert asked == [(edgetpu.EDGETPU_LIBRARY, {"device": "usb:0"})]
    with pytest.raises(RuntimeFailure, match=r"cannot run on 'CPU'.* are edgetpu, usb:0"):
        backend.load("m_edgetpu.tflite", 1, "CPU")


def test_candidates_load_on_the_device_asked_for() -> None:
    ov = fake_openvino({"CPU": {}, "GPU": {}})
    both = Candidates(
        "onnx",
        [OnnxBackend(fake_ort(["CPUExecutionProvider"])), OpenVinoBackend(ov, "GPU", ov.core)],
    )
    assert both.device == CPU
    with pytest.raises(RuntimeFailure, match="compiled for GPU"):
        both.load("m.onnx", 1, "GPU")
    with pytest.raises(RuntimeFailure, match=r"runs onnx on 'cuda:0'.*openvino GPU on GPU"):
        both.load("m.onnx", 1, "cuda:0")


# ---- an honest GPU probe ------------------------------------------------------------------


def runtime(providers: list[str]) -> Runtime:
    return Runtime(package="onnxruntime-gpu", version="1.99", formats=["onnx"], providers=providers)


def test_a_cuda_gpu_counts_only_with_the_provider_and_the_device() -> None:
    ort = fake_ort(CUDA_ORT)
    found, absent = gpus.onnx_accelerators(ort, runtime(CUDA_ORT), nvidia=one_gpu)
    assert [(a.kind, a.name, a.detail["device"], a.memory_mb, a.free_mb) for a in found] == [
        ("gpu", "NVIDIA T4", "cuda:0", 15360, 15000)
    ]
    assert "gpu" not in absent

    found, absent = gpus.onnx_accelerators(ort, runtime(CUDA_ORT), nvidia=no_gpu)
    assert found == []
    assert absent["gpu"].startswith("CUDAExecutionProvider built in but no /proc/driver")

    cpu_only = ["CPUExecutionProvider"]
    found, absent = gpus.onnx_accelerators(ort, runtime(cpu_only), nvidia=one_gpu)
    assert found == [] and "no GPU execution provider" in absent["gpu"]

    trt_only = ["TensorrtExecutionProvider", "CPUExecutionProvider"]
    found, absent = gpus.onnx_accelerators(ort, runtime(trt_only), nvidia=one_gpu)
    assert found == [] and "not CUDAExecutionProvider" in absent["gpu"]


def test_onnxruntime_probe_makes_a_backend_per_real_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpus, "nvidia_gpus", one_gpu)
    ort = fake_ort(CUDA_ORT)
    found = runtimes_for({"onnxruntime": ort})
    assert [label(b) for b in found["onnx"]] == ["onnxruntime", "onnxruntime cuda.0"]
    caps = capabilities.probe_of(registry.survey({"onnxruntime": ort}))
    gpu = [a for a in caps.accelerators if a.kind == "gpu"]
    assert [(a.runtime, a.memory_mb) for a in gpu] == [("onnxruntime", 15360)]
    assert "gpu" not in caps.absent

    monkeypatch.setattr(gpus, "nvidia_gpus", no_gpu)
    found = runtimes_for({"onnxruntime": ort})
    assert [label(b) for b in found["onnx"]] == ["onnxruntime"]  # the provider alone: no GPU


def test_openvino_gpu_only_where_it_lists_one_with_its_memory() -> None:
    ov = fake_openvino(
        {
            "CPU": {"FULL_DEVICE_NAME": "Some CPU"},
            "GPU": {
                "FULL_DEVICE_NAME": "Intel(R) Arc(TM) A380",
                "GPU_DEVICE_TOTAL_MEM_SIZE": 6 * 2**30,
            },
        }
    )
    caps = capabilities.probe_of(registry.survey({"openvino": ov}))
    assert [(a.kind, a.name, a.memory_mb) for a in caps.accelerators[1:]] == [
        ("gpu", "Intel(R) Arc(TM) A380", 6144)
    ]
    assert [label(b) for b in candidates(backends_for({"openvino": ov})["onnx"])] == [
        "openvino",
        "openvino GPU",
    ]
    cpu_only = fake_openvino({"CPU": {"FULL_DEVICE_NAME": "Some CPU"}})
    caps = capabilities.probe_of(registry.survey({"openvino": cpu_only}))
    assert [a.kind for a in caps.accelerators] == ["cpu"]


def test_nvidia_smi_memory_is_read_and_matched_by_bus() -> None:
    out = "0, 00000000:01:00.0, 16384, 1024\n1, 00000000:02:00.0, [N/A], [N/A]\nbad line\n"
    rows = gpus.nvidia_memory(run=lambda args: out)
    assert rows == [
        {"index": 0, "pci_bus": "00000000:01:00.0", "memory_mb": 16384, "free_mb": 15360}
    ]
    assert gpus.nvidia_memory(run=lambda args: "") == []
    found = [{"name": "A", "pci_bus": "0000:01:00.0"}, {"name": "B", "pci_bus": "0000:02:00.0"}]
    gpus.add_memory(found, rows)
    assert found[0]["memory_mb"] == 16384 and found[0]["free_mb"] == 15360
    assert "memory_mb" not in found[1]


def test_cuda_visible_devices_picks_the_gpus() -> None:
    three = [{"name": str(i)} for i in range(3)]
    assert [g["name"] for g in gpus.visible_gpus(three, "2,0")] == ["2", "0"]
    assert [g["name"] for g in gpus.visible_gpus(three, "1,7,0")] == ["1"]
    assert gpus.visible_gpus(three, "GPU-1234") == three


def test_nothing_is_announced_here_that_is_not_here() -> None:
    """This machine: no GPU device, so no gpu accelerator, no GPU backend, whatever the
    onnxruntime build lists."""
    if Path("/proc/driver/nvidia/gpus").exists() or Path("/dev/nvidia0").exists():
        pytest.skip("this machine has an NVIDIA GPU")
    probe = capabilities.probe_runtimes()
    assert not [a for a in probe.accelerators if a.kind == "gpu"]
    assert "gpu" in probe.absent
    assert all(a.memory_mb is None for a in probe.accelerators)
    for backends in runtimes_for(import_runtimes()).values():
        assert all(getattr(b, "device", CPU) in (CPU, "edgetpu") for b in backends)
    Capabilities.model_validate(
        capabilities.capabilities("n", 1, probe, capabilities.probe_host()).model_dump()
    )


def test_a_real_cuda_gpu_is_announced_with_its_memory() -> None:
    modules = import_runtimes(["onnxruntime"])
    if (
        "onnxruntime" not in modules
        or "CUDAExecutionProvider" not in modules["onnxruntime"].get_available_providers()
        or shutil.which("nvidia-smi") is None
    ):
        pytest.skip("needs an NVIDIA GPU, nvidia-smi and onnxruntime-gpu (CUDAExecutionProvider)")
    probe = capabilities.probe_runtimes(["onnxruntime"])
    gpu = [a for a in probe.accelerators if a.kind == "gpu"]
    assert gpu and gpu[0].detail["device"] == "cuda:0" and gpu[0].memory_mb
    model = OnnxBackend(modules["onnxruntime"], "cuda:0", ("CPU", "cuda:0")).load(
        str(DIGITS / "digits.onnx"), 1
    )
    assert model.providers[0] == "CUDAExecutionProvider"
    assert model.run([np.zeros((1, 1, 8, 8), np.float32)])
