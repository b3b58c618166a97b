"""`mqinfer status`: read the retained cluster state from the broker and show it.

It needs no running coordinator: nodes, services and the coordinator all keep their state
in retained messages, and the registry is rebuilt from them exactly as the coordinator does.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from mqinfer.coordinator.agent import read, subscriptions
from mqinfer.coordinator.registry import NodeRecord, Registry
from mqinfer.mqtt import (
    SUBSCRIBE_RETRIES,
    Brokers,
    ConnectError,
    Connection,
    Message,
    MQTTError,
    NotConnected,
)
from mqinfer.protocol import messages as m
from mqinfer.protocol.errors import ProtocolError
from mqinfer.protocol.topics import TopicError, Topics

log = logging.getLogger("mqinfer.status")


READ_TRIES = 6  # a connection lost while the state is read: read it again, 5 more times


def collect(
    url: Brokers, topics: Topics, protocol: str = "auto", settle: float = 0.5, limit: float = 5.0
) -> Registry:
    """Subscribe, take the retained messages until `settle` s pass quietly (at most `limit`).
    A connection lost meanwhile is opened again and the state read again from the start; the
    first connection's failure is raised (MQTTError)."""
    for attempt in range(1, READ_TRIES):
        try:
            return _collect(url, topics, protocol, settle, limit)
        except (NotConnected, ConnectError) as e:
            if attempt == 1 and isinstance(e, ConnectError):
                raise  # the first connection failed: a wrong address, most likely
            log.warning("%s; reading again", e)
            time.sleep(1.0)
    return _collect(url, topics, protocol, settle, limit)  # the last try: its failure is raised


def _collect(url: Brokers, topics: Topics, protocol: str, settle: float, limit: float) -> Registry:
    registry = Registry()
    last = [time.monotonic()]
    lock = threading.Lock()

    def on_message(message: Message) -> None:
        with lock:
            last[0] = time.monotonic()
            try:
                read(topics, registry, message, last[0])  # (ref, changes) unused here
            except (ProtocolError, TopicError) as e:
                log.warning("ignored message on %s: %s", message.topic, e)

    client_id = f"mqinfer-status-{time.time_ns():x}"
    conn = Connection(url, client_id, on_message, protocol=protocol)
    conn.open()
    try:
        conn.subscribe(subscriptions(topics), retries=SUBSCRIBE_RETRIES)
        start = last[0] = time.monotonic()
        while time.monotonic() - last[0] < settle and time.monotonic() - start < limit:
            time.sleep(0.05)
        if not conn.alive:
            raise NotConnected(f"connection to {conn.url} lost while reading the state")
        with lock:
            return registry
    finally:
        conn.close()


def _age(ts: float | None, now: float) -> float | None:
    return None if ts is None else round(max(0.0, now - ts), 1)


def node_view(rec: NodeRecord, now: float, missed_beats: float = 3.0) -> dict[str, Any]:
    caps, beat = rec.caps, rec.heartbeat
    age = _age(beat.ts, now) if beat else None
    view: dict[str, Any] = {
        "id": rec.id,
        "state": rec.state,
        "session": rec.session,
        "reason": rec.reason,
        "accelerators": [a.kind for a in caps.accelerators] if caps else [],
        "runtimes": {k: r.version for k, r in caps.runtimes.items()} if caps else {},
        "formats": caps.formats if caps else [],
        "host": caps.host.model_dump() if caps else None,
        "labels": caps.labels if caps else {},
        "heartbeat_age_s": age,
        # online by its retained state, yet silent: dead without a Will, or no coordinator yet
        "stale": rec.state == "online" and (age is None or age > missed_beats * rec.interval),
        "load": list(beat.load) if beat else None,
        "memory_available_mb": beat.memory_available_mb if beat else None,
        "inflight": beat.inflight if beat else None,
    }
    return view


def as_json(registry: Registry, now: float | None = None) -> dict[str, Any]:
    """[T-STATUS-1] {"nodes": [...], "services": [...], "coordinator": {...} | null}."""
    now = time.time() if now is None else now
    services = []
    for name in sorted(registry.services):
        rec = registry.services[name]
        spec = None
        if rec.spec:
            spec = rec.spec.model_dump(mode="json", exclude={"manifest", "pipeline"})
            spec["stages"] = rec.spec.stages
        services.append(
            {
                "name": name,
                "spec": spec,
                "state": rec.status.state if rec.status else "unknown",
                "reason": rec.status.reason if rec.status else None,
                "replicas": (
                    [_replica_view(name, r, registry) for r in rec.status.replicas]
                    if rec.status
                    else []
                ),
            }
        )
    coord = registry.coordinator
    return {
        "nodes": [
            node_view(registry.nodes[k], now, registry.missed_beats) for k in sorted(registry.nodes)
        ],
        "services": services,
        "coordinator": coord.model_dump(mode="json", exclude_none=True) if coord else None,
    }


def _replica_view(name: str, r: m.ReplicaStatus, registry: Registry) -> dict[str, Any]:
    """A replica as the status lists it, with what its node measured (its heartbeat)."""
    view = r.model_dump(exclude_none=True)
    node = registry.nodes.get(r.node)
    beat = node.heartbeat if node else None
    stats = beat.stats.get(m.slot(name, r.stage)) if beat else None
    if stats is not None:
        view.update(stats.model_dump(exclude_none=True))
    return view


def service_line(status: m.ServiceStatus) -> str:
    """A service's state and where it runs, each word once: 'ready on edge-1, edge-2';
    replicas that are not ready follow with their state: 'degraded on edge-1 (edge-2
    deploying)'; a pipeline's replicas name their stage: 'ready on edge-1 [stage 0], ...'."""

    def where(r: m.ReplicaStatus) -> str:
        return r.node if r.stage is None else f"{r.node} [stage {r.stage}]"

    ready = [where(r) for r in status.replicas if r.state == "ready"]
    others = [f"{where(r)} {r.state}" for r in status.replicas if r.state != "ready"]
    text: str = status.state
    if ready:
        text += " on " + ", ".join(ready)
    if others:
        text += " (" + ", ".join(others) + ")"
    return text


def _where(r: dict[str, Any]) -> str:
    """A replica in the REPLICAS column: 'edge-1 (openvino) 0.1 ms 30/s'; its state only
    when not ready (the count before the list says how many are); its runtime when known."""
    text = r["node"] if r["state"] == "ready" else f"{r['node']} {r['state']}"
    if r.get("runtime"):
        text += f" ({r['runtime']})"
    if "stage" in r:
        text = f"[{r['stage']}] {text}"
    if r.get("inference_ms") is not None:
        text += f" {r['inference_ms']:.1f} ms"
    if r.get("rate"):
        text += f" {r['rate']:.0f}/s"
    return text


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def as_text(view: dict[str, Any]) -> str:
    coord = view["coordinator"]
    lines = [f"coordinator: {coord['id']} {coord['state']}" if coord else "coordinator: none seen"]
    rows = [["NODE", "STATE", "ACCELERATORS", "RUNTIMES", "CORES", "MEM FREE", "HEARTBEAT"]]
    for n in view["nodes"]:
        age = n["heartbeat_age_s"]
        state = n["state"] + (f": {n['reason']}" if n["state"] == "lost" and n["reason"] else "")
        state += " (stale)" if n["stale"] else ""
        rows.append(
            [
                n["id"],
                state,
                ",".join(n["accelerators"]) or "-",
                " ".join(f"{k} {v}" for k, v in n["runtimes"].items()) or "-",
                str(n["host"]["cores"]) if n["host"] else "-",
                f"{n['memory_available_mb']} MB" if n["memory_available_mb"] is not None else "-",
                f"{age:.1f} s ago" if age is not None else "-",
            ]
        )
    lines.append("")
    lines.append(_table(rows) if view["nodes"] else "no nodes")
    lines.append("")
    if view["services"]:
        srows = [["SERVICE", "STATE", "MODEL", "REPLICAS"]]
        reasons = []
        for s in view["services"]:
            spec = s["spec"]
            model = f"{spec['model']} ({spec['format']})" if spec else "-"
            ready = sum(r["state"] == "ready" for r in s["replicas"])
            want = f"{ready}/{spec['replicas']}" if spec else str(ready)
            where = ", ".join(_where(r) for r in s["replicas"]) or "-"
            if spec and spec["stages"]:
                model += f", {spec['stages']} stages"
                want = f"{ready}/{spec['replicas'] * spec['stages']}"
            srows.append([s["name"], s["state"], model, f"{want}: {where}"])
            if s["reason"]:
                reasons.append(f"{s['name']}: {s['reason']}")
        lines.append(_table(srows))
        lines += reasons
    else:
        lines.append("no services")
    return "\n".join(lines)


def watch(
    url: Brokers,
    topics: Topics,
    protocol: str,
    every: float,
    show: Callable[[dict[str, Any]], None],
    stop: threading.Event,
    settle: float = 0.5,
) -> None:
    """`mqinfer status --watch`: one subscription kept open, the view shown every `every`
    seconds until `stop` is set. A lost connection is opened again (the retained state
    comes again with it); the first connection's failure is raised (MQTTError)."""
    registry = Registry()
    lock = threading.Lock()

    def on_message(message: Message) -> None:
        with lock:
            try:
                read(topics, registry, message, time.monotonic())
            except (ProtocolError, TopicError) as e:
                log.warning("ignored message on %s: %s", message.topic, e)

    first = True
    while not stop.is_set():
        conn = Connection(url, f"mqinfer-status-{time.time_ns():x}", on_message, protocol=protocol)
        try:
            conn.open()
            conn.subscribe(subscriptions(topics), retries=SUBSCRIBE_RETRIES)
        except MQTTError:
            conn.drop()
            if first:
                raise
            stop.wait(every)
            continue
        first = False
        try:
            stop.wait(settle)
            while not stop.is_set() and conn.alive:
                with lock:
                    view = as_json(registry)
                show(view)
                stop.wait(every)
        finally:
            conn.close()
