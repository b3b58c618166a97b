"""Devices behind ONNX Runtime's execution providers (GPUs, OpenVINO, NPUs), confirmed
against the hardware: a provider in the build is not a device on the machine.

Each device found gets the name ONNX Runtime's backend loads on (`detail.device`):
'cuda:0' for the first NVIDIA GPU CUDA sees, 'rocm:0', 'openvino', 'coreml', 'qnn'. A
discrete NVIDIA GPU's memory comes from nvidia-smi, when it is there.
"""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess
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
CUDA_PROVIDER = "CUDAExecutionProvider"  # what runs a model on an NVIDIA GPU ('cuda:N')
NVIDIA_SMI_TIMEOUT = 10.0  # seconds
_AMD_PROVIDERS = ("MIGraphXExecutionProvider", "ROCMExecutionProvider")
_DIRECTML_PROVIDER = "DmlExecutionProvider"
_OPENVINO_PROVIDER = "OpenVINOExecutionProvider"
# NPU providers: (device name, whether this system/machine can have it, why not, the
# device name ONNX Runtime's backend loads on).
_NPUS: dict[str, tuple[str, Callable[[str, str], bool], str, str]] = {
    "CoreMLExecutionProvider": (
        "Apple Neural Engine",
        lambda system, machine: system == "Darwin" and machine == "arm64",
        "this is not Apple silicon",
        "coreml",
    ),
    "QNNExecutionProvider": (
        "Qualcomm Hexagon NPU",
        lambda _system, machine: machine in ("arm64", "aarch64"),
        "{machine} has no Hexagon NPU",
        "qnn",
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
    listed = bool(gpus)  # every GPU, whatever CUDA_VISIBLE_DEVICES hides
    if not gpus:
        gpus, reason = _cuda_driver_gpus()  # only the visible ones
        if not gpus:
            return [], f"no /proc/driver/nvidia/gpus and {reason}"
    if visible is not None:
        if listed:
            gpus = visible_gpus(gpus, visible)
        if not gpus:
            return [], f"CUDA_VISIBLE_DEVICES={visible!r} names none of the GPUs"
        for gpu in gpus:
            gpu["cuda_visible_devices"] = visible
    add_memory(gpus, nvidia_memory())
    return gpus, ""


def visible_gpus(gpus: list[dict[str, Any]], visible: str) -> list[dict[str, Any]]:
    """The GPUs CUDA_VISIBLE_DEVICES leaves, in its order, when it lists indices (with
    UUIDs it cannot be told here: all of them)."""
    picked: list[dict[str, Any]] = []
    for item in visible.split(","):
        item = item.strip()
        if not item.isdigit():
            return gpus
        if int(item) >= len(gpus):
            break  # CUDA stops at the first index that is not a device
        picked.append(gpus[int(item)])
    return picked


def _run_nvidia_smi(args: list[str]) -> str:
    """nvidia-smi's output, '' when it is not installed or fails."""
    if shutil.which("nvidia-smi") is None:
        return ""
    try:
        done = subprocess.run(
            ["nvidia-smi", *args],
            capture_output=True,
            text=True,
            timeout=NVIDIA_SMI_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout if done.returncode == 0 else ""


def nvidia_memory(
    run: Callable[[list[str]], str] = _run_nvidia_smi,
) -> list[dict[str, Any]]:
    """Each NVIDIA GPU's memory as nvidia-smi reports it: {index, pci_bus, memory_mb,
    free_mb}; empty without nvidia-smi. A GPU that shares the host's memory (Jetson)
    reports no total ('[N/A]') and is left out."""
    out = run(
        [
            "--query-gpu=index,pci.bus_id,memory.total,memory.used",
            "--format=csv,noheader,nounits",
        ]
    )
    found: list[dict[str, Any]] = []
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4 or not parts[0].isdigit() or not parts[2].isdigit():
            continue
        total = int(parts[2])
        used = int(parts[3]) if parts[3].isdigit() else None
        found.append(
            {
                "index": int(parts[0]),
                "pci_bus": parts[1],
                "memory_mb": total,
                "free_mb": max(total - used, 0) if used is not None else None,
            }
        )
    return found


def _bus(address: str) -> str:
    """A PCI address without its domain ('00000000:01:00.0' and '0000:01:00.0': '01:00.0')."""
    return address.lower()[-7:]


def add_memory(gpus: list[dict[str, Any]], memory: list[dict[str, Any]]) -> None:
    """Give each GPU the memory nvidia-smi reports for it, matched by PCI bus, else by
    index (GPUs the CUDA driver listed)."""
    by_bus = {_bus(row["pci_bus"]): row for row in memory}
    by_index = {row["index"]: row for row in memory}
    for gpu in gpus:
        if gpu.get("integrated"):
            continue  # it shares the host's memory
        if "pci_bus" in gpu:
            row = by_bus.get(_bus(gpu["pci_bus"]))
        else:
            row = by_index.get(gpu.get("index", -1))
        if row is not None:
            gpu["memory_mb"] = row["memory_mb"]
            if row["free_mb"] is not None:
                gpu["free_mb"] = row["free_mb"]


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
    ort: ModuleType,
    runtime: Runtime,
    nvidia: Callable[[], tuple[list[dict[str, Any]], str]] | None = None,
    amd: Callable[[], tuple[list[dict[str, Any]], str]] | None = None,
) -> tuple[list[Accelerator], dict[str, str]]:
    """Devices behind ONNX Runtime's providers, and why listed providers found none.

    ONNX Runtime lists a provider when the build has it, not when a device is there, so
    each GPU provider is confirmed against the hardware (`nvidia`, `amd`: the probes, given
    fakes in tests). An NVIDIA GPU counts only with CUDAExecutionProvider listed.
    AzureExecutionProvider (remote endpoints) and the CPU providers are no device of their
    own.
    """
    providers = runtime.providers
    found: list[Accelerator] = []
    gpu_reasons: list[str] = []
    npu_reasons: list[str] = []

    def gpu_family(
        family: tuple[str, ...],
        needed: str | None,
        probe: Callable[[], tuple[list[dict[str, Any]], str]],
        vendor: str,
        prefix: str,
    ) -> None:
        listed = [p for p in providers if p in family]
        if not listed:
            return
        if needed is not None and needed not in listed:
            gpu_reasons.append(f"{', '.join(listed)} built in but not {needed}")
            return
        devices, reason = probe()
        if not devices:
            gpu_reasons.append(f"{', '.join(listed)} built in but {reason}")
        for index, dev in enumerate(devices):
            dev = dict(dev)
            name = dev.pop("name")
            memory, free = dev.pop("memory_mb", None), dev.pop("free_mb", None)
            detail = {"vendor": vendor, "providers": listed, "device": f"{prefix}:{index}", **dev}
            found.append(
                Accelerator(
                    kind="gpu",
                    name=name,
                    runtime="onnxruntime",
                    detail=detail,
                    memory_mb=memory,
                    free_mb=free,
                )
            )

    gpu_family(_NVIDIA_PROVIDERS, CUDA_PROVIDER, nvidia or nvidia_gpus, "nvidia", "cuda")
    gpu_family(_AMD_PROVIDERS, None, amd or amd_gpus, "amd", "rocm")
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
                detail={
                    "providers": [_OPENVINO_PROVIDER],
                    "devices": devices,
                    "device": "openvino",
                },
            )
        )
    system, machine = platform.system(), platform.machine().lower()
    for provider, (name, possible, why_not, device) in _NPUS.items():
        if provider not in providers:
            continue
        if possible(system, machine):
            detail = {"providers": [provider], "device": device}
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
