"""Runtime backends: what loads and runs model files on this node.

Each runtime is one module of this package that declares itself (`ENTRIES`: name, formats,
probe, backend), collected by `registry`. `available_backends()` imports what this machine
has, probes it and returns, for each model format it can serve, the backend that serves
it: a single runtime's, or `Candidates` when several runtimes or devices can (a replica
then serves with the fastest, measured at deploy, see `choice`). `format_of` tells a model
file's format from its name. Each backend wraps one runtime on one device behind the
`Backend` / `Model` interface of `base`.
"""

from __future__ import annotations

from collections.abc import Collection
from types import ModuleType

from mqinfer.node.runtimes import registry
from mqinfer.node.runtimes.base import Backend, Model, RuntimeFailure, warm_up
from mqinfer.node.runtimes.choice import Candidates, Measured, candidates, fastest, label
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
    "backends_of",
    "candidates",
    "fastest",
    "format_of",
    "import_runtimes",
    "label",
    "registry",
    "runtimes_for",
    "unknown_runtimes",
    "warm_up",
]

RUNTIMES = registry.NAMES  # the names `mqinfer node --runtime` takes, in order of preference
# Runtime key -> module whose import proves the runtime works (from the registry).
RUNTIME_MODULES = {entry.key: entry.module for entry in registry.ENTRIES}


def unknown_runtimes(names: Collection[str]) -> list[str]:
    """The names that are not runtimes this node knows (see RUNTIMES)."""
    return registry.unknown(names)


def import_runtimes(only: Collection[str] | None = None) -> dict[str, ModuleType]:
    """The runtime modules that import here (only those in `only`, when given), by key."""
    return registry.imported(only)[0]


def runtimes_for(modules: dict[str, ModuleType]) -> dict[str, list[Backend]]:
    """Every backend the given runtime modules make (keys as in RUNTIMES) on the devices
    their probes find, by format, preferred first: by runtime (the TFLite runtimes before
    OpenVINO for .tflite, ONNX Runtime before it for .onnx), then by device (the CPU
    first). The Edge TPU format is served only where the delegate loaded."""
    return registry.survey(modules).backends()


def backends_of(by_format: dict[str, list[Backend]]) -> dict[str, Backend]:
    """The backend for each format: the runtime itself where only one runs it, `Candidates`
    where several do."""
    return {
        fmt: found[0] if len(found) == 1 else Candidates(fmt, found)
        for fmt, found in by_format.items()
    }


def backends_for(modules: dict[str, ModuleType]) -> dict[str, Backend]:
    """The backend for each format the given runtime modules run (see `backends_of`)."""
    return backends_of(runtimes_for(modules))


def available_backends(only: Collection[str] | None = None) -> dict[str, Backend]:
    """The backends this machine can run, keyed by model format, from the runtimes in
    `only` (all when None). The Edge TPU is probed once per process (`node.edgetpu`)."""
    return backends_of(registry.survey_here(only).backends())
