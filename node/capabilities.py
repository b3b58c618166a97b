"""The node's capability probe, announced retained on nodes/{node}/caps.

`probe_host` and `probe_runtimes` run once when the agent starts; `capabilities` turns
their results into the wire message for every announcement. The probe reports only what
it can confirm: a runtime counts when it imports, an accelerator when a runtime can reach
it and the device is really there. Everything probed and not found is listed in `absent`
with the reason, so an operator can tell "no Edge TPU plugged in" from "Edge TPU plugged
in but libedgetpu missing".
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import importlib.metadata
import os
import platform
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from node import sysinfo
from protocol.messages import Accelerator, Capabilities, Host, Runtime

# ---- host -----------------------------------------------------------------------------


def probe_host() -> Host:
    """Facts about the machine the node runs on."""
    total, _ = sysinfo.memory_mb()
    return Host(
        hostname=socket.gethostname(),
        os=f"{platform.system()} {platform.release()}".strip(),
        arch=platform.machine() or "unknown",
        cpu_model=sysinfo.cpu_model(),
        cores=sysinfo.cpu_count(),
        memory_total_mb=total,
        python=platform.python_version(),
    )


# ---- runtimes -------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """What `probe_runtimes` found: the capability fields that do not change while running."""

    runtimes: dict[str, Runtime] = field(default_factory=dict)
    accelerators: list[Accelerator] = field(default_factory=list)
    formats: list[str] = field(default_factory=list)
    absent: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _RuntimeSpec:
    key: str
    module: str  # importing it proves the runtime works (it loads the native library)
    packages: tuple[str, ...]  # distributions that may provide it, preferred first
    formats: tuple[str, ...]


# Order matters: the cpu accelerator names the first one that imports, and the Edge TPU
# delegate is tried through the TFLite runtimes in this order.
_RUNTIMES = (
    _RuntimeSpec("litert", "ai_edge_litert.interpreter", ("ai-edge-litert",), ("tflite",)),
    _RuntimeSpec("tflite_runtime", "tflite_runtime.interpreter", ("tflite-runtime",), ("tflite",)),
    _RuntimeSpec(
        "onnxruntime",
        "onnxruntime",
        (
            "onnxruntime",
            "onnxruntime-gpu",
            "onnxruntime-openvino",
            "onnxruntime-directml",
            "onnxruntime-qnn",
            "onnxruntime-rocm",
            "onnxruntime-silicon",
        ),
        ("onnx",),
    ),
)
_TFLITE_KEYS = ("litert", "tflite_runtime")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _import_failure(exc: BaseException) -> str:
    if isinstance(exc, ImportError):
        return _one_line(exc)
    return f"{type(exc).__name__}: {_one_line(exc)}"


def _distribution(spec: _RuntimeSpec, module: ModuleType) -> tuple[str, str]:
    """(package, version) of the distribution that provides `module`."""
    top = sys.modules.get(spec.module.partition(".")[0], module)
    module_version = getattr(top, "__version__", None)
    found: list[tuple[str, str]] = []
    for package in spec.packages:
        try:
            found.append((package, importlib.metadata.version(package)))
        except importlib.metadata.PackageNotFoundError:
            continue
    for package, version in found:  # two builds installed: the one whose code was imported
        if version == module_version:
            return package, version
    if found:
        return found[0]
    return spec.packages[0], str(module_version or "unknown")


def probe_runtimes() -> Probe:
    """Import each runtime, then look for the accelerators those runtimes can reach."""
    modules: dict[str, ModuleType] = {}
    runtimes: dict[str, Runtime] = {}
    absent: dict[str, str] = {}
    for spec in _RUNTIMES:
        try:
            module = importlib.import_module(spec.module)
        except Exception as exc:  # a broken native build raises more than ImportError
            absent[spec.key] = _import_failure(exc)
            continue
        package, version = _distribution(spec, module)
        providers: list[str] = []
        if spec.key == "onnxruntime":
            providers = [str(p) for p in module.get_available_providers()]
        modules[spec.key] = module
        runtimes[spec.key] = Runtime(
            package=package, version=version, formats=list(spec.formats), providers=providers
        )

    first = next(iter(runtimes), "")
    accelerators = [
        Accelerator(
            kind="cpu",
            name=sysinfo.cpu_model() or platform.machine() or "cpu",
            runtime=first,
            detail={"runtimes": list(runtimes)},
        )
    ]
    formats = [fmt for rt in runtimes.values() for fmt in rt.formats]

    tpus, tpu_runtime, tpu_absent = _probe_edgetpu(modules)
    if tpus:
        accelerators += tpus
        formats.append("edgetpu_tflite")
        rt = runtimes[tpu_runtime]
        runtimes[tpu_runtime] = rt.model_copy(update={"providers": [*rt.providers, "edgetpu"]})
    else:
        absent["edgetpu"] = tpu_absent

    ort = modules.get("onnxruntime")
    if ort is None:
        absent["gpu"] = f"onnxruntime does not import: {absent['onnxruntime']}"
    else:
        found, reasons = _onnx_accelerators(ort, runtimes["onnxruntime"])
        accelerators += found
        absent.update(reasons)

    return Probe(
        runtimes=runtimes,
        accelerators=accelerators,
        formats=list(dict.fromkeys(formats)),
        absent=absent,
    )


# ---- Edge TPU -------------------------------------------------------------------------

EDGETPU_LIBRARY = {"Darwin": "libedgetpu.1.dylib", "Windows": "edgetpu.dll"}.get(
    platform.system(), "libedgetpu.so.1"
)
# A USB Accelerator shows 1a6e:089a until libedgetpu loads its firmware, then 18d1:9302.
_CORAL_USB_IDS = frozenset({("1a6e", "089a"), ("18d1", "9302")})
_CORAL_PCI_ID = ("0x1ac1", "0x089a")


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return ""


def edgetpu_hardware() -> list[dict[str, str]]:
    """Coral devices visible without libedgetpu: PCIe (/dev/apex_N, or the bare PCI
    function when the gasket/apex driver is missing) and USB (by vendor:product id)."""
    seen: list[dict[str, str]] = [
        {"type": "pci", "path": str(dev)} for dev in sorted(Path("/dev").glob("apex_*"))
    ]
    if not seen:
        for dev in sorted(Path("/sys/bus/pci/devices").glob("*")):
            if (_read(dev / "vendor"), _read(dev / "device")) == _CORAL_PCI_ID:
                seen.append({"type": "pci", "path": str(dev), "driver": "missing"})
    for dev in sorted(Path("/sys/bus/usb/devices").glob("*")):
        ids = (_read(dev / "idVendor"), _read(dev / "idProduct"))
        if ids in _CORAL_USB_IDS:
            seen.append({"type": "usb", "path": str(dev), "id": ":".join(ids)})
    return seen


def _describe_hardware(seen: list[dict[str, str]]) -> str:
    parts = []
    for dev in seen:
        if dev["type"] == "usb":
            parts.append(f"USB Edge TPU ({dev['id']} at {dev['path']})")
        elif dev.get("driver") == "missing":
            parts.append(f"PCIe Edge TPU ({dev['path']}, no /dev/apex_* driver)")
        else:
            parts.append(f"PCIe Edge TPU ({dev['path']})")
    return ", ".join(parts)


def _is_delegate_teardown_noise(args: sys.UnraisableHookArgs) -> bool:
    """The AttributeError a TFLite `Delegate.__del__` raises when its __init__ failed."""
    return (
        args.exc_type is AttributeError
        and getattr(args.object, "__qualname__", None) == "Delegate.__del__"
        and "_library" in str(args.exc_value)
    )


@contextlib.contextmanager
def quiet_delegate_teardown() -> Iterator[None]:
    """Silence the 'Exception ignored in: Delegate.__del__' a failed load_delegate leaves.

    When the shared library does not load, `Delegate.__init__` raises before setting
    `_library`, and the half-built object's `__del__` then fails once the exception is
    released. Only that error is dropped; any other unraisable exception is passed on to
    the hook that was installed before.
    """
    previous = sys.unraisablehook

    def hook(args: sys.UnraisableHookArgs) -> None:
        if not _is_delegate_teardown_noise(args):
            previous(args)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        gc.collect()  # the half-built Delegate may sit in a cycle with its traceback
        sys.unraisablehook = previous


def _try_delegate(interpreter: ModuleType, library: str) -> str | None:
    """Create and release the delegate; None on success, else why it failed."""
    with quiet_delegate_teardown():
        try:
            delegate = interpreter.load_delegate(library)
        except Exception as exc:
            return _one_line(exc)
        del delegate
    return None


def _pycoral_devices() -> list[dict[str, Any]] | None:
    """Coral's own device list, when Coral's pycoral build is installed.

    The PyPI project called 'pycoral' is unrelated; only `pycoral.utils.edgetpu` with
    `list_edge_tpus` is Coral's.
    """
    try:
        edgetpu = importlib.import_module("pycoral.utils.edgetpu")
        return [dict(dev) for dev in edgetpu.list_edge_tpus()]
    except Exception:
        return None


def _edgetpu_accelerators(runtime: str, seen: list[dict[str, str]]) -> list[Accelerator]:
    devices = _pycoral_devices()
    if not devices:
        kinds = {dev["type"] for dev in seen}
        suffix = {"usb": " (USB)", "pci": " (PCIe)"}.get(kinds.pop(), "") if len(kinds) == 1 else ""
        detail: dict[str, Any] = {"library": EDGETPU_LIBRARY}
        if seen:
            detail["hardware"] = seen
        return [
            Accelerator(
                kind="edgetpu", name=f"Coral Edge TPU{suffix}", runtime=runtime, detail=detail
            )
        ]
    found: list[Accelerator] = []
    per_type: dict[str, int] = {}
    for dev in devices:
        kind = str(dev.get("type", ""))
        index = per_type.get(kind, 0)
        per_type[kind] = index + 1
        label = {"usb": "USB", "pci": "PCIe"}.get(kind, kind)
        found.append(
            Accelerator(
                kind="edgetpu",
                name=f"Coral Edge TPU ({label})" if label else "Coral Edge TPU",
                runtime=runtime,
                detail={
                    "library": EDGETPU_LIBRARY,
                    "device": f"{kind}:{index}",  # load_delegate option 'device'
                    **{k: str(v) for k, v in dev.items()},
                },
            )
        )
    return found


def _probe_edgetpu(modules: dict[str, ModuleType]) -> tuple[list[Accelerator], str, str]:
    """(accelerators, runtime key, reason when there are none)."""
    seen = edgetpu_hardware()
    where = f"{_describe_hardware(seen)} present but" if seen else "no Edge TPU seen;"
    tflite = [key for key in _TFLITE_KEYS if key in modules]
    if not tflite:
        return [], "", f"{where} no TFLite runtime imports to load {EDGETPU_LIBRARY}"
    failure = ""
    for key in tflite:
        error = _try_delegate(modules[key], EDGETPU_LIBRARY)
        if error is None:
            return _edgetpu_accelerators(key, seen), key, ""
        failure = failure or error
    return [], "", f"{where} {EDGETPU_LIBRARY} not loadable: {failure}"


# ---- devices behind ONNX Runtime providers ----------------------------------------------

_NVIDIA_PROVIDERS = (
    "TensorrtExecutionProvider",
    "NvTensorRTRTXExecutionProvider",
    "CUDAExecutionProvider",
)
_AMD_PROVIDERS = ("MIGraphXExecutionProvider", "ROCMExecutionProvider")
_DIRECTML_PROVIDER = "DmlExecutionProvider"
_OPENVINO_PROVIDER = "OpenVINOExecutionProvider"
_COREML_PROVIDER = "CoreMLExecutionProvider"
_QNN_PROVIDER = "QNNExecutionProvider"


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
            for k, _, v in (ln.partition(":") for ln in _read(info).splitlines())
        )
        gpus.append({"name": fields.get("Model") or "NVIDIA GPU", "pci_bus": info.parent.name})
    if not gpus:
        for node in ("/dev/nvhost-ctrl-gpu", "/dev/nvgpu/igpu0"):
            if os.path.exists(node):
                board = _read(Path("/sys/firmware/devicetree/base/model")).rstrip("\x00")
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
        return [], f"{library} not loadable: {_one_line(exc)}"
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
            ln.split(maxsplit=1) for ln in _read(node / "properties").splitlines() if " " in ln
        )
        if props.get("simd_count", "0").strip() not in ("", "0"):
            target = _read(node / "name")
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


def _onnx_accelerators(
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
        # DirectML runs on any DirectX 12 adapter; ONNX Runtime does not say which one.
        found.append(
            Accelerator(
                kind="gpu",
                name="DirectML adapter",
                runtime="onnxruntime",
                detail={"providers": [_DIRECTML_PROVIDER], "verified": False},
            )
        )
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
    machine = platform.machine().lower()
    if _COREML_PROVIDER in providers:
        if platform.system() == "Darwin" and machine == "arm64":
            found.append(
                Accelerator(
                    kind="npu",
                    name="Apple Neural Engine",
                    runtime="onnxruntime",
                    detail={"providers": [_COREML_PROVIDER]},
                )
            )
        else:
            npu_reasons.append(f"{_COREML_PROVIDER} built in but this is not Apple silicon")
    if _QNN_PROVIDER in providers:
        if machine in ("arm64", "aarch64"):
            found.append(
                Accelerator(
                    kind="npu",
                    name="Qualcomm Hexagon NPU",
                    runtime="onnxruntime",
                    detail={"providers": [_QNN_PROVIDER]},
                )
            )
        else:
            npu_reasons.append(f"{_QNN_PROVIDER} built in but {machine} has no Hexagon NPU")

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


# ---- the wire message -----------------------------------------------------------------


def agent_version() -> str:
    try:
        return importlib.metadata.version("mqinfer")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0+local"


def capabilities(
    node: str,
    session: int,
    probe: Probe,
    host: Host,
    labels: dict[str, str] | None = None,
    models: list[str] | None = None,
) -> Capabilities:
    """The capability announcement for one session."""
    return Capabilities(
        node=node,
        session=session,
        ts=time.time(),
        agent=agent_version(),
        host=host,
        runtimes=dict(probe.runtimes),
        accelerators=list(probe.accelerators),
        formats=list(probe.formats),
        models=list(models or []),
        labels=dict(labels or {}),
        absent=dict(probe.absent),
    )
