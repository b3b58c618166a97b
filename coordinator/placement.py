"""Where a service's replicas go: pure functions over the registry, no I/O.

A node is eligible when it is online with known capabilities, runs the model's format,
has the memory, and matches the spec's constraints. A spec that asks for an accelerator
kind also needs one of that kind with the memory the model takes there, where the node
announces the accelerator's memory (a GPU's `memory_mb`). Eligible nodes are ranked by speed:
cores not already busy (load average), shared by the services already running there, times
the node's measured speed relative to the fastest eligible node (within 20% counts as
equal), with the artifact already cached as a tie-breaker. Speed is what a node measured
running this very model when it has run it (`costs`), else the reference workload of its
capabilities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mqinfer.coordinator.registry import NodeRecord
from mqinfer.protocol import messages as m

MEMORY_HEADROOM_MB = 64  # beyond the model itself (runtime, buffers, the agent)
MEMORY_FACTOR = 3  # a loaded model takes a few times its file size (arena, copies)
# On an accelerator with memory of its own (a GPU) each worker's session holds the weights
# and the activations and workspace of a run: taken as this many times the file size.
ACCELERATOR_MEMORY_FACTOR = 3


def memory_needed_mb(spec: m.ServiceSpec) -> int:
    per_worker = spec.size * MEMORY_FACTOR / 2**20
    return int(per_worker * spec.workers) + MEMORY_HEADROOM_MB


def accelerator_memory_needed_mb(spec: m.ServiceSpec) -> int:
    """The accelerator memory the spec's model is estimated to take (MB, rounded up):
    workers x ACCELERATOR_MEMORY_FACTOR x the model file's size."""
    return math.ceil(spec.size * ACCELERATOR_MEMORY_FACTOR * spec.workers / 2**20)


def why_too_small(spec: m.ServiceSpec, accelerators: list[m.Accelerator]) -> str | None:
    """None when one of the node's accelerators of the kind the spec asks for may hold the
    model (its memory is not announced, or is enough), else why none can."""
    want = spec.constraints.accelerator
    of_kind = [a for a in accelerators if a.kind == want]
    if want is None or not of_kind or any(a.memory_mb is None for a in of_kind):
        return None
    need = accelerator_memory_needed_mb(spec)
    largest = max(of_kind, key=lambda a: a.memory_mb or 0)
    if largest.memory_mb is None or largest.memory_mb >= need:
        return None
    return (
        f"{want} {largest.name} has {largest.memory_mb} MB of memory, the model needs"
        f" {need} MB ({spec.workers} worker(s) x {ACCELERATOR_MEMORY_FACTOR}"
        f" x {spec.size / 2**20:.1f} MB file)"
    )


def why_not(spec: m.ServiceSpec, rec: NodeRecord) -> str | None:
    """None when `rec` can run `spec`, else the reason it cannot."""
    if rec.state != "online":
        return rec.state
    unfit = why_unfit(spec, rec)
    if unfit is not None:
        return unfit
    caps = rec.caps
    assert caps is not None
    available = rec.heartbeat.memory_available_mb if rec.heartbeat else caps.host.memory_total_mb
    need = memory_needed_mb(spec)
    if available < need:
        return f"{available} MB available, needs {need} MB"
    return None


def why_unfit(spec: m.ServiceSpec, rec: NodeRecord) -> str | None:
    """What the spec asks that the node is not (format, accelerator and its memory,
    labels), whatever it has free: a replica already there is moved when its spec changes
    so ([T-COORD-6])."""
    caps = rec.caps
    if caps is None:
        return "capabilities not known yet"
    if spec.format not in caps.formats:
        return f"cannot run {spec.format} (runs {', '.join(caps.formats) or 'nothing'})"
    kinds = {a.kind for a in caps.accelerators}
    want = spec.constraints.accelerator
    if want is not None and want not in kinds:
        return f"no {want} accelerator (has {', '.join(sorted(kinds))})"
    small = why_too_small(spec, caps.accelerators)
    if small is not None:
        return small
    for key, value in spec.constraints.labels.items():
        if caps.labels.get(key) != value:
            return f"label {key}={value} not set"
    return None


SAME_SPEED = 0.8  # nodes within this ratio of the fastest one's speed count as equally fast


def speed_factor(own: float | None, fastest: float | None) -> float:
    """A node's speed relative to the fastest eligible one, from run times (ms): 1.0, or
    less when it is clearly slower (over 1/SAME_SPEED times as long)."""
    if fastest is None or not own:
        return 1.0
    ratio = fastest / own
    return 1.0 if ratio > SAME_SPEED else ratio


def score(spec: m.ServiceSpec, rec: NodeRecord, speed: float = 1.0) -> float:
    """Higher is better. Free cores times relative `speed` dominate; the rest break ties."""
    assert rec.caps is not None
    cores = rec.caps.host.cores
    load = rec.heartbeat.load[0] if rec.heartbeat else 0.0
    free = max(cores - load, 0.25)
    services = len(rec.heartbeat.services) if rec.heartbeat else 0
    value = free / (1 + services) * speed
    if spec.artifact and spec.artifact in rec.caps.models:
        value += 0.1  # no download
    return value


@dataclass(frozen=True)
class Placement:
    chosen: list[str]
    refused: dict[str, str]  # node -> why it could not take a replica


def place(
    spec: m.ServiceSpec,
    nodes: dict[str, NodeRecord],
    count: int,
    exclude: dict[str, str],
    avoid: set[str] | frozenset[str] = frozenset(),
    costs: dict[str, float] | None = None,
) -> Placement:
    """Choose up to `count` nodes for new replicas, never one in `exclude` (node -> why:
    it already has a replica, or failed to deploy this spec), and one in `avoid` (it runs
    another stage of the same pipeline) only when no other node can. `costs`: node ->
    measured run time (ms) of this model there, for the nodes that have run it."""
    refused: dict[str, str] = {}
    eligible: list[str] = []
    for node_id in sorted(nodes):
        if node_id in exclude:
            refused[node_id] = exclude[node_id]
            continue
        reason = why_not(spec, nodes[node_id])
        if reason is None:
            eligible.append(node_id)
        else:
            refused[node_id] = reason
    # Measured run times compare with the fastest node that ran this model, chosen or not.
    measured = {n: c for n, c in (costs or {}).items() if c > 0}
    known = {n: c for n, c in measured.items() if n in eligible}
    reference = {
        n: s
        for n in eligible
        if n not in known and (caps := nodes[n].caps) and (s := caps.speed_ms)
    }
    best_known = min(measured.values()) if measured else None
    best_reference = min(reference.values()) if reference else None

    def speed(n: str) -> float:
        if n in known:
            return speed_factor(known[n], best_known)
        return speed_factor(reference.get(n), best_reference)

    ranked = [(score(spec, nodes[n], speed(n)), n) for n in eligible]
    ranked.sort(key=lambda pair: (pair[1] in avoid, -pair[0], pair[1]))
    return Placement([node for _, node in ranked[:count]], refused)
