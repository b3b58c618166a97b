"""The one table of runtimes: what every module of this package declares in its `ENTRIES`.

Adding a runtime is adding one module here with a `base.RuntimeEntry`: its name, the
formats it runs, its probe (the devices it really reaches on this machine) and how it
makes a backend for each device. Everything else reads the entries from here: the names
`mqinfer node --runtime` takes, the capability announcement (`node.capabilities`) and the
backends each format is served with, preferred first (`node.runtimes.backends_for`).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from types import ModuleType

from mqinfer.node.runtimes.base import Backend, Found, RuntimeEntry
from mqinfer.node.sysinfo import one_line


def collect(package: str = __name__.rpartition(".")[0]) -> tuple[RuntimeEntry, ...]:
    """Every `ENTRIES` of the modules of `package`, in order of preference."""
    entries: list[RuntimeEntry] = []
    for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
        module = importlib.import_module(f"{package}.{info.name}")
        if module.__name__ != __name__:  # this module's ENTRIES are the collection
            entries += getattr(module, "ENTRIES", ())
    keys = [entry.key for entry in entries]
    twice = sorted({key for key in keys if keys.count(key) > 1})
    if twice:
        raise ValueError(f"runtime {', '.join(twice)} is declared twice in {package}")
    return tuple(sorted(entries, key=lambda entry: (entry.preference, entry.key)))


ENTRIES = collect()
NAMES = tuple(entry.key for entry in ENTRIES)  # the names `mqinfer node --runtime` takes


def unknown(names: Collection[str]) -> list[str]:
    """The names that are not runtimes this node knows."""
    known = {runtime.key for runtime in ENTRIES}
    return [name for name in names if name not in known]


def import_failure(exc: BaseException) -> str:
    if isinstance(exc, ImportError):
        return one_line(exc)
    return f"{type(exc).__name__}: {one_line(exc)}"


def imported(
    only: Collection[str] | None = None,
) -> tuple[dict[str, ModuleType], dict[str, str]]:
    """The runtime modules that import here (those in `only`, when given), by runtime key,
    and why each other runtime is not there."""
    modules: dict[str, ModuleType] = {}
    why: dict[str, str] = {}
    for runtime in ENTRIES:
        if only is not None and runtime.key not in only:
            why[runtime.key] = f"not used on this node (--runtime {', '.join(only)})"
            continue
        try:
            modules[runtime.key] = importlib.import_module(runtime.module)
        except Exception as exc:  # a broken native build raises more than ImportError
            why[runtime.key] = import_failure(exc)
    return modules, why


@dataclass(frozen=True)
class Usable:
    """A runtime that imports and reaches at least one device here."""

    entry: RuntimeEntry
    module: ModuleType
    found: Found


@dataclass(frozen=True)
class Survey:
    """The runtimes usable here, in order of preference, and what is absent: a runtime
    key or an accelerator kind -> why."""

    usable: dict[str, Usable] = field(default_factory=dict)
    absent: dict[str, str] = field(default_factory=dict)

    def backends(self) -> dict[str, list[Backend]]:
        """Every backend, by format, preferred first: by runtime, then by device."""
        by_format: dict[str, list[Backend]] = {}
        for runtime in self.usable.values():
            for device in runtime.found.devices:
                backend = runtime.entry.backend(runtime.module, device, runtime.found)
                for fmt in device.formats:
                    by_format.setdefault(fmt, []).append(backend)
        return by_format


def survey(modules: dict[str, ModuleType], why: dict[str, str] | None = None) -> Survey:
    """Probe each runtime in `modules` (by key; `why`: why the others are not there).

    An accelerator kind that no usable runtime reaches is absent with the reasons the
    runtimes that looked for it gave, else those of the runtimes that explain it and are
    not usable ('onnxruntime does not import: ...')."""
    absent = dict(why or {})
    unusable = {
        key: f"{key} {text}" if text.startswith("not used") else f"{key} does not import: {text}"
        for key, text in absent.items()
    }
    usable: dict[str, Usable] = {}
    for runtime in ENTRIES:
        module = modules.get(runtime.key)
        if module is None:
            continue
        found = runtime.probe(module, {key: u.found for key, u in usable.items()})
        if not found.devices:
            absent[runtime.key] = found.why_none or f"{runtime.key} reaches no device here"
            unusable[runtime.key] = absent[runtime.key]
            continue
        usable[runtime.key] = Usable(runtime, module, found)

    reached = {
        acc.kind for u in usable.values() for dev in u.found.devices for acc in dev.accelerators
    }
    reasons: dict[str, list[str]] = {}
    for u in usable.values():
        for kind, text in u.found.absent.items():
            reasons.setdefault(kind, []).append(text)
    unexplained: dict[str, list[str]] = {}
    put: dict[str, Callable[[str], str]] = {}
    for runtime in ENTRIES:
        if runtime.key in unusable:
            for kind in runtime.explains:
                if not any(kind in u.entry.explains for u in usable.values()):
                    unexplained.setdefault(kind, []).append(unusable[runtime.key])
                    if runtime.unexplained is not None:
                        put.setdefault(kind, runtime.unexplained)
    for kind, texts in unexplained.items():
        text = "; ".join(dict.fromkeys(texts))
        reasons.setdefault(kind, []).append(put[kind](text) if kind in put else text)
    for kind, texts in reasons.items():
        if kind not in reached:
            absent[kind] = "; ".join(dict.fromkeys(texts))
    return Survey(usable, absent)


def survey_here(only: Collection[str] | None = None) -> Survey:
    """Import the runtimes (those in `only`, when given) and probe them."""
    return survey(*imported(only))
