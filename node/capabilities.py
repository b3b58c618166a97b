"""The node's capability probe, announced retained on nodes/{node}/caps.

`probe_host` and `probe_runtimes` run once when the agent starts; `capabilities` turns
their results into the wire message for every announcement. The probe reports only what
it can confirm: a runtime counts when it imports, an accelerator when a runtime can reach
it and the device is really there. Everything probed and not found is listed in `absent`
with the reason, so an operator can tell "no Edge TPU plugged in" from "Edge TPU plugged
in but libedgetpu missing".
"""

from __future__ import annotations

import importlib
import importlib.metadata
import platform
import socket
import sys
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from types import ModuleType
from typing import Literal

from mqinfer.node import edgetpu, gpus, sysinfo
from mqinfer.node.runtimes import openvino as openvino_runtime
from mqinfer.node.sysinfo import one_line
from mqinfer.protocol.messages import Accelerator, Capabilities, Host, Runtime

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
    _RuntimeSpec("openvino", "openvino", ("openvino",), ("tflite", "onnx")),
)


def _import_failure(exc: BaseException) -> str:
    if isinstance(exc, ImportError):
        return one_line(exc)
    return f"{type(exc).__name__}: {one_line(exc)}"


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


def _openvino_accelerators(module: ModuleType) -> tuple[list[str], list[Accelerator], str]:
    """OpenVINO's devices ('CPU', 'GPU', 'NPU', ...), the accelerators among them (its GPUs
    and NPUs: the CPU is the node's cpu), and why there is none."""
    try:
        found = openvino_runtime.devices(module)
    except Exception as exc:
        return [], [], f"openvino lists no device: {_import_failure(exc)}"
    kinds: dict[str, Literal["gpu", "npu"]] = {"GPU": "gpu", "NPU": "npu"}
    accelerators = [
        Accelerator(
            kind=kinds[device.partition(".")[0]],
            name=name,
            runtime="openvino",
            detail={"device": device},
        )
        for device, name in found
        if device.partition(".")[0] in kinds
    ]
    why = "" if found else "openvino imports but lists no device (Core().available_devices)"
    return [device for device, _ in found], accelerators, why


def probe_runtimes(only: Collection[str] | None = None) -> Probe:
    """Import each runtime (those in `only`, when given: `mqinfer node --runtime`), then
    look for the accelerators those runtimes can reach."""
    modules: dict[str, ModuleType] = {}
    runtimes: dict[str, Runtime] = {}
    absent: dict[str, str] = {}
    extra: list[Accelerator] = []
    for spec in _RUNTIMES:
        if only is not None and spec.key not in only:
            absent[spec.key] = f"not used on this node (--runtime {', '.join(only)})"
            continue
        try:
            module = importlib.import_module(spec.module)
        except Exception as exc:  # a broken native build raises more than ImportError
            absent[spec.key] = _import_failure(exc)
            continue
        package, version = _distribution(spec, module)
        providers: list[str] = []
        if spec.key == "onnxruntime":
            providers = [str(p) for p in module.get_available_providers()]
        elif spec.key == "openvino":
            providers, devices, why = _openvino_accelerators(module)
            if not providers:
                absent[spec.key] = why
                continue
            extra += devices
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

    tpus, tpu_runtime, tpu_absent = edgetpu.probe(modules)
    if tpus:
        accelerators += tpus
        formats.append("edgetpu_tflite")
        rt = runtimes[tpu_runtime]
        runtimes[tpu_runtime] = rt.model_copy(update={"providers": [*rt.providers, "edgetpu"]})
    else:
        absent["edgetpu"] = tpu_absent

    ort = modules.get("onnxruntime")
    found: list[Accelerator] = []
    reasons: dict[str, str] = {}
    if ort is None and only is not None and "onnxruntime" not in only:
        reasons["gpu"] = f"onnxruntime {absent['onnxruntime']}"
    elif ort is None:
        reasons["gpu"] = f"onnxruntime does not import: {absent['onnxruntime']}"
    else:
        found, reasons = gpus.onnx_accelerators(ort, runtimes["onnxruntime"])
    accelerators += found + extra
    for kind, why in reasons.items():  # a GPU or NPU OpenVINO reaches is not absent
        if not any(a.kind == kind for a in extra):
            absent[kind] = why

    return Probe(
        runtimes=runtimes,
        accelerators=accelerators,
        formats=list(dict.fromkeys(formats)),
        absent=absent,
    )


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


def reference_ms(repeats: int = 5) -> float:
    """Run time (ms, best of `repeats`) of a fixed single-threaded numeric workload: a
    relative measure of this machine's speed for placement, taken once at start."""
    import numpy as np

    x = np.linspace(0.0, 1.0, 200_000, dtype=np.float32)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        y = x
        for _ in range(4):
            y = np.sin(y) * np.float32(0.5) + x
        best = min(best, time.perf_counter() - start)
    return best * 1000
