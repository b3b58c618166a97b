"""Runtime backends: what loads and runs model files on this node.

`available_backends()` imports what this machine has and returns one backend per model
format it can serve; `format_of` tells a model file's format from its name. Each backend
module wraps one runtime behind the `Backend` / `Model` interface of `base`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from mqinfer.node import edgetpu as edgetpu_probe
from mqinfer.node.runtimes.base import Backend, Model, RuntimeFailure, warm_up
from mqinfer.node.runtimes.edgetpu import EdgeTpuBackend
from mqinfer.node.runtimes.litert import LiteRTBackend
from mqinfer.node.runtimes.onnx import OnnxBackend
from mqinfer.protocol.manifest import format_of

__all__ = [
    "Backend",
    "Model",
    "RuntimeFailure",
    "available_backends",
    "backends_for",
    "format_of",
    "import_runtimes",
    "warm_up",
]

# Runtime key -> module whose import proves the runtime works; the keys and the order
# (LiteRT before tflite_runtime) are those of the capability probe.
RUNTIME_MODULES = {
    "litert": "ai_edge_litert.interpreter",
    "tflite_runtime": "tflite_runtime.interpreter",
    "onnxruntime": "onnxruntime",
}


def import_runtimes() -> dict[str, ModuleType]:
    """The runtime modules that import here, by runtime key."""
    modules: dict[str, ModuleType] = {}
    for key, name in RUNTIME_MODULES.items():
        try:
            modules[key] = importlib.import_module(name)
        except Exception:  # a broken native build raises more than ImportError
            continue
    return modules


def backends_for(modules: dict[str, ModuleType]) -> dict[str, Backend]:
    """One backend per format from the given runtime modules (keys as in RUNTIME_MODULES).

    The first TFLite runtime serves .tflite; the Edge TPU format is served only when
    `node.edgetpu.probe` loaded the delegate through one of them.
    """
    backends: dict[str, Backend] = {}
    for key in edgetpu_probe.TFLITE_KEYS:
        if key in modules:
            backends["tflite"] = LiteRTBackend(modules[key], key)
            break
    if "onnxruntime" in modules:
        backends["onnx"] = OnnxBackend(modules["onnxruntime"])
    _, tpu_runtime, _ = edgetpu_probe.probe(modules)
    if tpu_runtime:
        backends["edgetpu_tflite"] = EdgeTpuBackend(modules[tpu_runtime], tpu_runtime)
    return backends


def available_backends() -> dict[str, Backend]:
    """The backends this machine can run, keyed by model format. Probes the Edge TPU
    delegate, so call it once at start-up rather than per model."""
    return backends_for(import_runtimes())
