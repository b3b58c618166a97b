"""Devices behind ONNX Runtime's execution providers (GPUs, OpenVINO, NPUs), confirmed
against the hardware: a provider in the build is not a device on the machine."""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from mqinfer.node.sysinfo import one_line, read_text
from mqinfer.protocol.messages import Accelerator, Runtime

_NVIDIA_PROVIDERS = (
    "TensorrtExecutionProvider",
    "NvTensorRTRTXExecutionProvider",
    "CUDAExecutionProvider",
)
_AMD_PROVIDERS = ("MIGraphXExecutionProvider", "ROCMExecutionProvider")
_DIRECTML_PROVIDER = "DmlExecutionProvider"
_OPENVINO_PROVIDER = "OpenVINOExecutionProvider"
# NPU providers: (device name, whether this system/machine can have it, why not).
_NPUS: dict[str, tuple[str, Callable[[str, str], bool], str]] = {
    "CoreMLExecutionProvider": (
        "Apple Neural Engine",
        lambda system, machine: system == "Darwin" and machine == "arm64",
        "this is not Apple silicon",
    ),
    "QNNExecutionProvider": (
        "Qualcomm Hexagon NPU",
        lambda _system, machine: machine in ("arm64", "aarch64"),
        "{machine} has no Hexagon NPU",
    ),
}


def nvidia_gpus() -> tuple[list[dict[str, Any]], str]:
    """NVIDIA GPUs this process can see: (devices, reason when there are none).

    Tries, cheapest first: the driver's /proc/driver/nvidia/gpus (desktop and server
    drivers, also inside containers given GPUs), the Tegra device nodes (Jetson), and last
    the CUDA driver API through ctypes (e.g. WSL). The last one initialises CUDA in this
    process, so it runs only when the others found nothing.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return [], f"CUDA_VISIBLE_DEVICES={visible!r} hides all GPUs"
    gpus: list[dict[str, Any]] = []
    for info in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")):
        fields = dict(
            (k.strip(), v.strip())
            for k, _, v in (ln.partition(":") for ln in read_text(info).splitlines())
        )
        gpus.append({"name": fields.get("Model") or "NVIDIA GPU", "pci_bus": info.parent.name})
    if not gpus:
        for node in ("/dev/nvhost-ctrl-gpu", "/dev/nvgpu/igpu0"):
            if os.path.exists(node):
                board = read_text(Path("/sys/firmware/devicetree/base/model")).rstrip("\x00")
                gpus.append({"name": f"{board or 'NVIDIA Tegra'} GPU", "integrated": True})
                break
    if not gpus:
        gpus, reason = _cuda_driver_gpus()
        if not gpus:
            return [], f"no /proc/driver/nvidia/gpus and {reason}"
    if visible is not None:
        for gpu in gpus:
            gpu["cuda_visible_devices"] = visible
    return gpus, ""


def _cuda_driver_gpus() -> tuple[list[dict[str, Any]], str]:
    library = "nvcuda.dll" if platform.system() == "Windows" else "libcuda.so.1"
    try:
        cuda = ctypes.CDLL(library)
    except OSError as exc:
        return [], f"{library} not loadable: {one_line(exc)}"
    rc = cuda.cuInit(0)
    if rc != 0:
        return [], f"cuInit failed (CUresult {rc}; 100 means no device)"
    count = ctypes.c_int(0)
    rc = cuda.cuDeviceGetCount(ctypes.byref(count))
    if rc != 0 or count.value <= 0:
        return [], f"cuDeviceGetCount found no device (CUresult {rc})"
    gpus: list[dict[str, Any]] = []
    for index in range(count.value):
        device = ctypes.c_int(0)
        name = ctypes.create_string_buffer(256)
        ok = cuda.cuDeviceGet(ctypes.byref(device), index) == 0
        ok = ok and cuda.cuDeviceGetName(name, len(name), device) == 0
        label = name.value.decode("utf-8", "replace") if ok and name.value else "NVIDIA GPU"
        gpus.append({"name": label, "index": index})
    return gpus, ""


def amd_gpus() -> tuple[list[dict[str, Any]], str]:
    """AMD GPUs the ROCm (KFD) driver exposes: (devices, reason when there are none)."""
    if not os.path.exists("/dev/kfd"):
        return [], "no /dev/kfd (amdgpu/ROCm kernel driver not loaded)"
    nodes = Path("/sys/class/kfd/kfd/topology/nodes")
    if not nodes.is_dir():
        return [{"name": "AMD GPU"}], ""
    gpus: list[dict[str, Any]] = []
    for node in sorted(nodes.iterdir(), key=lambda p: int(p.name) if p.name.isdigit() else -1):
        props = dict(
            ln.split(maxsplit=1) for ln in read_text(node / "properties").splitlines() if " " in ln
        )
        if props.get("simd_count", "0").strip() not in ("", "0"):
            target = read_text(node / "name")
            gpus.append(
                {"name": f"AMD GPU ({target})" if target else "AMD GPU", "kfd_node": node.name}
            )
    if not gpus:
        return [], "/dev/kfd present but no GPU node in the KFD topology"
    return gpus, ""


def _openvino_devices(ort: ModuleType) -> list[str]:
    try:
        ids = ort.capi._pybind_state.get_available_openvino_device_ids()
    except Exception:
        return []
    return [str(d) for d in ids]


def onnx_accelerators(
    ort: ModuleType, runtime: Runtime
) -> tuple[list[Accelerator], dict[str, str]]:
    """Devices behind ONNX Runtime's providers, and why listed providers found none.

    ONNX Runtime lists a provider when the build has it, not when a device is there, so
    each GPU provider is confirmed against the hardware. AzureExecutionProvider (remote
    endpoints) and the CPU providers are no device of their own.
    """
    providers = runtime.providers
    found: list[Accelerator] = []
    gpu_reasons: list[str] = []
    npu_reasons: list[str] = []

    def gpu_family(
        family: tuple[str, ...],
        probe: Callable[[], tuple[list[dict[str, Any]], str]],
        vendor: str,
    ) -> None:
        listed = [p for p in providers if p in family]
        if not listed:
            return
        devices, reason = probe()
        if not devices:
            gpu_reasons.append(f"{', '.join(listed)} built in but {reason}")
        for dev in devices:
            name = dev.pop("name")
            detail = {"vendor": vendor, "providers": listed, **dev}
            found.append(Accelerator(kind="gpu", name=name, runtime="onnxruntime", detail=detail))

    gpu_family(_NVIDIA_PROVIDERS, nvidia_gpus, "nvidia")
    gpu_family(_AMD_PROVIDERS, amd_gpus, "amd")
    if _DIRECTML_PROVIDER in providers:
        # DirectML runs on any DirectX 12 adapter, and ONNX Runtime does not say whether
        # there is one: unconfirmed hardware is not announced.
        gpu_reasons.append(f"{_DIRECTML_PROVIDER} built in but no adapter can be confirmed")
    if _OPENVINO_PROVIDER in providers:
        devices = _openvino_devices(ort)
        found.append(
            Accelerator(
                kind="openvino",
                name=f"OpenVINO ({', '.join(devices)})" if devices else "OpenVINO",
                runtime="onnxruntime",
                detail={"providers": [_OPENVINO_PROVIDER], "devices": devices},
            )
        )
    system, machine = platform.system(), platform.machine().lower()
    for provider, (name, possible, why_not) in _NPUS.items():
        if provider not in providers:
            continue
        if possible(system, machine):
            detail = {"providers": [provider]}
            found.append(Accelerator(kind="npu", name=name, runtime="onnxruntime", detail=detail))
        else:
            npu_reasons.append(f"{provider} built in but {why_not.format(machine=machine)}")

    absent: dict[str, str] = {}
    if not any(acc.kind == "gpu" for acc in found):
        if not gpu_reasons:
            gpu_reasons.append(
                f"onnxruntime {runtime.version} has no GPU execution provider"
                f" (providers: {', '.join(providers) or 'none'})"
            )
        absent["gpu"] = "; ".join(gpu_reasons)
    if npu_reasons and not any(acc.kind == "npu" for acc in found):
        absent["npu"] = "; ".join(npu_reasons)
    return found, absent
