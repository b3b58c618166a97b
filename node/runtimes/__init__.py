"""Runtime backends: what loads and runs model files on this node.

`available_backends()` imports what this machine has and returns, for each model format it
can serve, the backend that serves it: a single runtime's, or `Candidates` when several
runtimes can (a replica then serves with the fastest, measured at deploy, see `choice`).
`format_of` tells a model file's format from its name. Each backend module wraps one
runtime behind the `Backend` / `Model` interface of `base`.
"""

from __future__ import annotations

import importlib
from collections.abc import Collection
from types import ModuleType

from mqinfer.node import edgetpu as edgetpu_probe
from mqinfer.node.runtimes.base import Backend, Model, RuntimeFailure, warm_up
from mqinfer.node.runtimes.choice import Candidates, Measured, candidates, fastest, label
from mqinfer.node.runtimes.edgetpu import EdgeTpuBackend
from mqinfer.node.runtimes.litert import LiteRTBackend
from mqinfer.node.runtimes.onnx import OnnxBackend
from mqinfer.node.runtimes.openvino import DEVICES as OPENVINO_DEVICES
from mqinfer.node.runtimes.openvino import OpenVinoBackend
from mqinfer.protocol.manifest import format_of

__all__ = [
    "RUNTIMES",
    "RUNTIME_MODULES",
    "Backend",
    "Candidates",
    "Measured",
    "Model",
    "RuntimeFailure",
    "available_backends",
    "backends_for",
    "candidates",
    "fastest",
    "format_of",
    "import_runtimes",
    "label",
    "runtimes_for",
    "unknown_runtimes",
    "warm_up",
]

# Runtime key -> module whose import proves the runtime works; the keys and the order
# (LiteRT before tflite_runtime) are those of the capability probe.
RUNTIME_MODULES = {
    "litert": "ai_edge_litert.interpreter",
    "tflite_runtime": "tflite_runtime.interpreter",
    "onnxruntime": "onnxruntime",
    "openvino": "openvino",
}
RUNTIMES = tuple(RUNTIME_MODULES)  # the names `mqinfer node --runtime` takes


def unknown_runtimes(names: Collection[str]) -> list[str]:
    """The names that are not runtimes this node knows (see RUNTIMES)."""
    return [name for name in names if name not in RUNTIME_MODULES]


def import_runtimes(only: Collection[str] | None = None) -> dict[str, ModuleType]:
    """The runtime modules that import here, by runtime key (only those in `only`, when
    given)."""
    modules: dict[str, ModuleType] = {}
    for key, name in RUNTIME_MODULES.items():
        if only is not None and key not in only:
            continue
        try:
            modules[key] = importlib.import_module(name)
        except Exception:  # a broken native build raises more than ImportError
            continue
    return modules


def _openvino_backends(module: ModuleType) -> list[Backend]:
    """One OpenVINO backend per device it lists, CPU first (none if it has no device)."""
    try:
        core = module.Core()
        listed = [str(d) for d in core.available_devices]
    except Exception:  # the runtime imports but its plugins do not load
        return []
    order = {family: i for i, family in enumerate(OPENVINO_DEVICES)}
    usable = [d for d in listed if d.partition(".")[0] in order]
    usable.sort(key=lambda d: order[d.partition(".")[0]])
    return [OpenVinoBackend(module, device, core) for device in usable]


def runtimes_for(modules: dict[str, ModuleType]) -> dict[str, list[Backend]]:
    """Every backend the given runtime modules make (keys as in RUNTIME_MODULES), by
    format, preferred first: the TFLite runtimes before OpenVINO for .tflite, ONNX Runtime
    before it for .onnx. The Edge TPU format is served only when `node.edgetpu.probe`
    loaded the delegate through one of the TFLite runtimes.
    """
    by_format: dict[str, list[Backend]] = {}

    def add(backend: Backend) -> None:
        for fmt in backend.formats:
            by_format.setdefault(fmt, []).append(backend)

    for key in edgetpu_probe.TFLITE_KEYS:
        if key in modules:
            add(LiteRTBackend(modules[key], key))
    if "onnxruntime" in modules:
        add(OnnxBackend(modules["onnxruntime"]))
    if "openvino" in modules:
        for backend in _openvino_backends(modules["openvino"]):
            add(backend)
    _, tpu_runtime, _ = edgetpu_probe.probe(modules)
    if tpu_runtime:
        add(EdgeTpuBackend(modules[tpu_runtime], tpu_runtime))
    return by_format


def backends_for(modules: dict[str, ModuleType]) -> dict[str, Backend]:
    """The backend for each format: the runtime itself where only one runs it (as
    before), `Candidates` where several do."""
    return {
        fmt: found[0] if len(found) == 1 else Candidates(fmt, found)
        for fmt, found in runtimes_for(modules).items()
    }


def available_backends(only: Collection[str] | None = None) -> dict[str, Backend]:
    """The backends this machine can run, keyed by model format, from the runtimes in
    `only` (all when None). Probes the Edge TPU delegate, so call it once at start-up
    rather than per model."""
    return backends_for(import_runtimes(only))
