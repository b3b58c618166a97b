"""The capability probe, run for real on this machine and checked against the system."""

from __future__ import annotations

import ctypes
import gc
import importlib.metadata
import os
import platform
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from mqinfer.node import capabilities as caps
from mqinfer.node import edgetpu, gpus, sysinfo
from mqinfer.protocol.messages import Capabilities, Runtime

GPU_PROVIDERS = {
    "CUDAExecutionProvider",
    "TensorrtExecutionProvider",
    "NvTensorRTRTXExecutionProvider",
    "ROCMExecutionProvider",
    "MIGraphXExecutionProvider",
    "DmlExecutionProvider",
}


def meminfo_kib(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name == key:
            return int(rest.split()[0])
    raise KeyError(key)


def library_loads(name: str) -> bool:
    try:
        ctypes.CDLL(name)
    except OSError:
        return False
    return True


@pytest.fixture(autouse=True)
def fresh_edgetpu_probe() -> None:
    """The Edge TPU probe keeps its first answer for the process: tests that fake the
    hardware start over."""
    edgetpu.forget()


@pytest.fixture(scope="module")
def probe() -> caps.Probe:
    return caps.probe_runtimes()


@pytest.fixture(scope="module")
def host() -> Any:
    return caps.probe_host()


# ---- host --------------------------------------------------------------------------------


def test_host_matches_the_system(host: Any) -> None:
    assert host.hostname == socket.gethostname()
    assert host.os == f"{platform.system()} {platform.release()}"
    assert host.arch == platform.machine()
    assert host.python == platform.python_version()
    if hasattr(os, "sched_getaffinity"):
        assert host.cores == len(os.sched_getaffinity(0))
    else:
        assert host.cores == os.cpu_count()


@pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="needs /proc/meminfo")
def test_memory_total_is_meminfo(host: Any) -> None:
    assert abs(host.memory_total_mb - meminfo_kib("MemTotal") / 1024) <= 1
    total, available = sysinfo.memory_mb()
    assert total == host.memory_total_mb
    # MemAvailable moves; it only has to be plausible
    assert 0 < available <= total


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="needs /proc/cpuinfo")
def test_cpu_model_is_cpuinfo_model_name(host: Any) -> None:
    names = [
        line.partition(":")[2].strip()
        for line in Path("/proc/cpuinfo").read_text().splitlines()
        if line.partition(":")[0].strip() == "model name"
    ]
    if not names:
        pytest.skip("this kernel's /proc/cpuinfo has no 'model name'")
    assert host.cpu_model == " ".join(names[0].split())


def test_load_average_is_three_non_negative_floats() -> None:
    load = sysinfo.load_average()
    assert len(load) == 3
    assert all(isinstance(x, float) and x >= 0 for x in load)
    if hasattr(os, "getloadavg"):
        assert load[2] == pytest.approx(os.getloadavg()[2], abs=0.5)


def test_cpu_model_on_a_raspberry_pi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nBogoMIPS\t: 108.00\nCPU part\t: 0xd08\n\n"
        "Hardware\t: BCM2835\nRevision\t: c03114\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n"
    )
    monkeypatch.setattr(sysinfo, "_CPUINFO", str(cpuinfo))
    assert sysinfo.cpu_model() == "Raspberry Pi 4 Model B Rev 1.4"
    cpuinfo.write_text("processor\t: 0\nHardware\t: BCM2835\n")
    monkeypatch.setattr(sysinfo, "_DEVICETREE_MODEL", str(tmp_path / "none"))
    assert sysinfo.cpu_model() == "BCM2835"


def test_memory_falls_back_to_sysconf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not hasattr(os, "sysconf") or "SC_PHYS_PAGES" not in os.sysconf_names:
        pytest.skip("no sysconf SC_PHYS_PAGES here")
    expected = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // (1024 * 1024)
    monkeypatch.setattr(sysinfo, "_MEMINFO", str(tmp_path / "missing"))
    total, available = sysinfo.memory_mb()
    assert total == expected
    assert 0 <= available <= total


# ---- runtimes ----------------------------------------------------------------------------


def test_runtime_versions_are_the_installed_distributions(probe: caps.Probe) -> None:
    litert = probe.runtimes["litert"]
    assert litert.package == "ai-edge-litert"
    assert litert.version == importlib.metadata.version("ai-edge-litert")
    assert litert.formats == ["tflite"]
    ort = probe.runtimes["onnxruntime"]
    assert ort.version == importlib.metadata.version(ort.package)
    assert ort.formats == ["onnx"]
    assert "tflite" in probe.formats
    assert "onnx" in probe.formats


def test_onnxruntime_version_is_metadata_of_onnxruntime(probe: caps.Probe) -> None:
    try:
        expected = importlib.metadata.version("onnxruntime")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("onnxruntime comes from another distribution here")
    assert probe.runtimes["onnxruntime"].version == expected


def test_providers_are_onnxruntimes(probe: caps.Probe) -> None:
    import onnxruntime

    assert probe.runtimes["onnxruntime"].providers == onnxruntime.get_available_providers()


def test_tflite_runtime_only_when_it_imports(probe: caps.Probe) -> None:
    try:
        import tflite_runtime.interpreter  # noqa: F401
    except ImportError:
        assert "tflite_runtime" not in probe.runtimes
        assert "tflite_runtime" in probe.absent
    else:
        assert "tflite_runtime" in probe.runtimes


def test_exactly_one_cpu_on_the_first_runtime(probe: caps.Probe) -> None:
    cpus = [a for a in probe.accelerators if a.kind == "cpu"]
    assert len(cpus) == 1
    assert cpus[0].runtime == next(iter(probe.runtimes)) == "litert"
    assert cpus[0].name == (sysinfo.cpu_model() or platform.machine())
    assert cpus[0].detail["runtimes"] == list(probe.runtimes)


@pytest.mark.skipif(
    library_loads(edgetpu.EDGETPU_LIBRARY), reason=f"{edgetpu.EDGETPU_LIBRARY} is installed here"
)
def test_no_edgetpu_without_libedgetpu(probe: caps.Probe) -> None:
    assert not [a for a in probe.accelerators if a.kind == "edgetpu"]
    assert "edgetpu_tflite" not in probe.formats
    assert edgetpu.EDGETPU_LIBRARY in probe.absent["edgetpu"]
    assert edgetpu.EDGETPU_LIBRARY == "libedgetpu.so.1" or platform.system() != "Linux"


def test_gpus_only_with_a_gpu_provider(probe: caps.Probe) -> None:
    gpus = [a for a in probe.accelerators if a.kind == "gpu"]
    if not GPU_PROVIDERS & set(probe.runtimes["onnxruntime"].providers):
        assert gpus == []
        assert "no GPU execution provider" in probe.absent["gpu"]
    for gpu in gpus:
        assert set(gpu.detail["providers"]) <= GPU_PROVIDERS


def test_azure_provider_is_not_a_device(probe: caps.Probe) -> None:
    for acc in probe.accelerators:
        assert "AzureExecutionProvider" not in acc.detail.get("providers", [])


def test_nothing_invented_on_a_plain_machine(probe: caps.Probe) -> None:
    plain = (
        not library_loads(edgetpu.EDGETPU_LIBRARY)
        and not Path("/proc/driver/nvidia/gpus").exists()
        and not Path("/dev/kfd").exists()
        and not {"OpenVINOExecutionProvider", "CoreMLExecutionProvider", "QNNExecutionProvider"}
        & set(probe.runtimes["onnxruntime"].providers)
    )
    if not plain:
        pytest.skip("this machine has accelerator software or hardware")
    assert [a.kind for a in probe.accelerators] == ["cpu"]
    assert {"edgetpu", "gpu"} <= set(probe.absent)


def test_capabilities_round_trip(probe: caps.Probe, host: Any) -> None:
    c = caps.capabilities("edge-1", 3, probe, host, labels={"site": "lab"}, models=["ab" * 32])
    assert Capabilities.model_validate_json(c.model_dump_json()) == c
    assert c.node == "edge-1"
    assert c.session == 3
    assert c.labels == {"site": "lab"}
    assert c.models == ["ab" * 32]
    assert c.runtimes == probe.runtimes
    assert c.accelerators == probe.accelerators
    assert c.absent == probe.absent
    try:
        assert c.agent == importlib.metadata.version("mqinfer")
    except importlib.metadata.PackageNotFoundError:
        assert c.agent == "0.0.0+local"


def test_capabilities_defaults() -> None:
    host = caps.probe_host()
    c = caps.capabilities("n", 0, caps.Probe(), host)
    assert c.labels == {}
    assert c.models == []


# ---- the failed-delegate noise -------------------------------------------------------------


def test_probe_leaves_no_noise_on_stderr(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The default hook prints to sys.stderr, which capsys captures.
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
    capsys.readouterr()
    caps.probe_runtimes()
    gc.collect()
    err = capsys.readouterr().err
    assert "Exception ignored" not in err
    assert "Delegate" not in err
    assert sys.unraisablehook is sys.__unraisablehook__


class Delegate:
    """Stands in for a TFLite Delegate whose __init__ failed before setting _library."""

    def __del__(self) -> None:
        self._library.close()  # type: ignore[attr-defined]


class Leaky:
    def __del__(self) -> None:
        raise RuntimeError("a real error")


def test_quiet_teardown_drops_only_the_delegate_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda args: seen.append(args.exc_type))
    with edgetpu.quiet_delegate_teardown():
        d = Delegate()
        del d
        leak = Leaky()
        del leak
    assert seen == [RuntimeError]
    d = Delegate()  # outside the block the noise is not hidden
    del d
    gc.collect()
    assert seen == [RuntimeError, AttributeError]


# ---- runtimes that do not import ------------------------------------------------------------


def test_onnxruntime_import_error_moves_to_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.setitem(sys.modules, "openvino", None)  # it runs .onnx files too
    probe = caps.probe_runtimes()
    assert "onnxruntime" not in probe.runtimes
    assert "onnxruntime" in probe.absent["onnxruntime"]
    assert "onnx" not in probe.formats
    assert "tflite" in probe.formats
    assert "onnxruntime" in probe.absent["gpu"]
    assert [a.runtime for a in probe.accelerators if a.kind == "cpu"] == ["litert"]


def test_no_runtime_at_all_still_lists_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "ai_edge_litert.interpreter",
        "tflite_runtime.interpreter",
        "onnxruntime",
        "openvino",
    ):
        monkeypatch.setitem(sys.modules, name, None)
    probe = caps.probe_runtimes()
    assert probe.runtimes == {}
    assert probe.formats == []
    assert [(a.kind, a.runtime) for a in probe.accelerators] == [("cpu", "")]
    assert {"litert", "tflite_runtime", "onnxruntime", "openvino"} <= set(probe.absent)
    assert "no TFLite runtime" in probe.absent["edgetpu"]
    Capabilities.model_validate_json(
        caps.capabilities("n", 1, probe, caps.probe_host()).model_dump_json()
    )


# ---- hardware seen but not usable ----------------------------------------------------------


@pytest.mark.skipif(
    library_loads(edgetpu.EDGETPU_LIBRARY), reason=f"{edgetpu.EDGETPU_LIBRARY} is installed here"
)
def test_usb_edgetpu_without_library_is_not_an_accelerator(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    usb = {"type": "usb", "path": "/sys/bus/usb/devices/2-1", "id": "1a6e:089a"}
    monkeypatch.setattr(edgetpu, "edgetpu_hardware", lambda: [usb])
    probe = caps.probe_runtimes()
    assert not [a for a in probe.accelerators if a.kind == "edgetpu"]
    reason = probe.absent["edgetpu"]
    assert reason.startswith("USB Edge TPU (1a6e:089a at /sys/bus/usb/devices/2-1) present but")
    assert f"{edgetpu.EDGETPU_LIBRARY} not loadable" in reason


@pytest.mark.skipif(
    Path("/proc/driver/nvidia/gpus").exists() or library_loads("libcuda.so.1"),
    reason="this machine has an NVIDIA driver",
)
def test_cuda_provider_without_a_device_is_absent() -> None:
    runtime = Runtime(
        package="onnxruntime-gpu",
        version="1.0",
        formats=["onnx"],
        providers=["CUDAExecutionProvider", "AzureExecutionProvider", "CPUExecutionProvider"],
    )
    import onnxruntime

    found, absent = gpus.onnx_accelerators(onnxruntime, runtime)
    assert found == []
    assert "CUDAExecutionProvider built in but" in absent["gpu"]
    assert "libcuda.so.1 not loadable" in absent["gpu"]


def test_openvino_provider_maps_to_openvino() -> None:
    runtime = Runtime(
        package="onnxruntime-openvino",
        version="1.0",
        formats=["onnx"],
        providers=["OpenVINOExecutionProvider", "CPUExecutionProvider"],
    )
    import onnxruntime

    found, _ = gpus.onnx_accelerators(onnxruntime, runtime)
    assert [(a.kind, a.runtime) for a in found] == [("openvino", "onnxruntime")]
