"""The node's capability probe, announced retained on nodes/{node}/caps.

`probe_host` and `probe_runtimes` run once when the agent starts; `capabilities` turns
their results into the wire message for every announcement. The runtimes, their probes and
their accelerators come from the one runtime registry (`node.runtimes.registry`). The
probe reports only what it can confirm: a runtime counts when it imports and reaches a
device, an accelerator when a runtime can reach it and the device is really there (with
its memory, where it has its own). Everything probed and not found is listed in `absent`
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

from mqinfer.node import sysinfo
from mqinfer.node.runtimes import registry
from mqinfer.node.runtimes.base import RuntimeEntry
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


def _distribution(runtime: RuntimeEntry, module: ModuleType) -> tuple[str, str]:
    """(package, version) of the distribution that provides `module`."""
    top = sys.modules.get(runtime.module.partition(".")[0], module)
    module_version = getattr(top, "__version__", None)
    found: list[tuple[str, str]] = []
    for package in runtime.packages:
        try:
            found.append((package, importlib.metadata.version(package)))
        except importlib.metadata.PackageNotFoundError:
            continue
    for package, version in found:  # two builds installed: the one whose code was imported
        if version == module_version:
            return package, version
    if found:
        return found[0]
    return runtime.packages[0], str(module_version or "unknown")


def probe_runtimes(only: Collection[str] | None = None) -> Probe:
    """Import each runtime of the registry (those in `only`, when given: `mqinfer node
    --runtime`) and probe the devices and accelerators each really reaches."""
    return probe_of(registry.survey_here(only))


def probe_of(survey: registry.Survey) -> Probe:
    """The capability fields of what the registry's probes found."""
    runtimes: dict[str, Runtime] = {}
    accelerators: list[Accelerator] = []
    formats: list[str] = []
    for key, usable in survey.usable.items():
        package, version = _distribution(usable.entry, usable.module)
        runtimes[key] = Runtime(
            package=package,
            version=version,
            formats=list(usable.entry.formats),
            providers=list(usable.found.providers),
        )
        ran = {fmt for device in usable.found.devices for fmt in device.formats}
        formats += [fmt for fmt in usable.entry.formats if fmt in ran]
    for usable in survey.usable.values():
        for device in usable.found.devices:
            formats += device.formats
            accelerators += device.accelerators
    cpu = Accelerator(
        kind="cpu",
        name=sysinfo.cpu_model() or platform.machine() or "cpu",
        runtime=next(iter(runtimes), ""),
        detail={"runtimes": list(runtimes)},
    )
    return Probe(
        runtimes=runtimes,
        accelerators=[cpu, *accelerators],
        formats=list(dict.fromkeys(formats)),
        absent=dict(survey.absent),
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
