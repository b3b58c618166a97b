"""Which nodes can run a service, and which ones get its replicas (no broker)."""

from __future__ import annotations

import pytest

from mqinfer.coordinator.placement import memory_needed_mb, place, why_not
from mqinfer.coordinator.registry import NodeRecord
from mqinfer.protocol import messages as m

SHA = "ab" * 32
MB = 2**20


def spec(**kw: object) -> m.ServiceSpec:
    fields: dict[str, object] = {
        "name": "digits",
        "model": "digits_int8.tflite",
        "artifact": SHA,
        "format": "tflite",
        "size": MB,
        "replicas": 2,
    }
    fields.update(kw)
    return m.ServiceSpec.model_validate(fields)


def node(
    node_id: str,
    *,
    state: str = "online",
    cores: int = 4,
    load: float = 0.0,
    memory_mb: int = 4096,
    formats: tuple[str, ...] = ("tflite",),
    accelerators: tuple[str, ...] = ("cpu",),
    labels: dict[str, str] | None = None,
    models: tuple[str, ...] = (),
    services: tuple[str, ...] = (),
    heartbeat: bool = True,
    caps: bool = True,
    speed_ms: float | None = None,
) -> NodeRecord:
    host = m.Host(
        hostname=node_id,
        os="Linux 6.1",
        arch="x86_64",
        cores=cores,
        memory_total_mb=8192,
        python="3.11",
    )
    runtime = m.Runtime(package="ai-edge-litert", version="1.0", formats=list(formats))
    capabilities = m.Capabilities(
        node=node_id,
        session=1,
        ts=0.0,
        agent="0.1",
        host=host,
        runtimes={"litert": runtime},
        accelerators=[m.Accelerator(kind=k, name=k, runtime="litert") for k in accelerators],
        formats=list(formats),
        models=list(models),
        labels=labels or {},
        speed_ms=speed_ms,
    )
    beat = m.Heartbeat(
        node=node_id,
        session=1,
        seq=0,
        ts=0.0,
        interval=1.0,
        uptime=0.0,
        load=(load, load, load),
        memory_available_mb=memory_mb,
        services={s: "ready" for s in services},
    )
    return NodeRecord(
        node_id,
        state=state,
        session=1,
        caps=capabilities if caps else None,
        heartbeat=beat if heartbeat else None,
    )


# ---- why_not ----------------------------------------------------------------------------


def test_an_eligible_node_has_no_reason() -> None:
    assert why_not(spec(), node("a")) is None


@pytest.mark.parametrize("state", ["offline", "lost", "unknown"])
def test_a_node_that_is_not_online_is_refused_with_its_state(state: str) -> None:
    assert why_not(spec(), node("a", state=state)) == state


def test_unknown_capabilities() -> None:
    assert why_not(spec(), node("a", caps=False)) == "capabilities not known yet"


def test_wrong_format_names_what_it_runs() -> None:
    assert why_not(spec(format="onnx"), node("a")) == "cannot run onnx (runs tflite)"
    assert why_not(spec(), node("a", formats=())) == "cannot run tflite (runs nothing)"


def test_accelerator_constraint() -> None:
    want_tpu = spec(constraints={"accelerator": "edgetpu"})
    assert why_not(want_tpu, node("a")) == "no edgetpu accelerator (has cpu)"
    assert why_not(want_tpu, node("b", accelerators=("cpu", "edgetpu"))) is None


def test_label_constraints() -> None:
    want = spec(constraints={"labels": {"zone": "lab", "rack": "2"}})
    assert why_not(want, node("a")) == "label zone=lab not set"
    assert why_not(want, node("a", labels={"zone": "lab"})) == "label rack=2 not set"
    assert why_not(want, node("a", labels={"zone": "lab", "rack": "3"})) == "label rack=2 not set"
    assert why_not(want, node("a", labels={"zone": "lab", "rack": "2", "x": "y"})) is None


def test_memory_from_the_heartbeat_else_the_host_total() -> None:
    big = spec(size=100 * MB, workers=2)  # 2 x 3 x 100 MB + 64 MB
    assert memory_needed_mb(big) == 664
    assert why_not(big, node("a", memory_mb=663)) == "663 MB available, needs 664 MB"
    assert why_not(big, node("a", memory_mb=664)) is None
    # No heartbeat yet: the host's total memory (8192 MB) counts.
    assert why_not(big, node("a", memory_mb=0, heartbeat=False)) is None
    assert why_not(spec(size=3000 * MB), node("a", heartbeat=False)) == (
        "8192 MB available, needs 9064 MB"
    )


# ---- place ------------------------------------------------------------------------------


def test_free_cores_dominate_and_the_cached_artifact_breaks_ties() -> None:
    nodes = {
        "a": node("a", cores=2, models=(SHA,)),
        "b": node("b", cores=8),
        "c": node("c", cores=4),
        "d": node("d", cores=4, models=(SHA,)),
    }
    assert place(spec(), nodes, 4, {}).chosen == ["b", "d", "c", "a"]
    assert place(spec(), nodes, 2, {}).chosen == ["b", "d"]


def test_load_and_running_services_take_cores_away() -> None:
    nodes = {
        "busy": node("busy", cores=8, load=7.0),  # 1 free core
        "shared": node("shared", cores=8, services=("x", "y", "z")),  # 8 / 4 = 2
        "idle": node("idle", cores=3),
    }
    assert place(spec(), nodes, 3, {}).chosen == ["idle", "shared", "busy"]


def test_equal_nodes_go_to_the_lower_id() -> None:
    nodes = {n: node(n) for n in ["n3", "n1", "n2"]}
    assert place(spec(), nodes, 2, {}).chosen == ["n1", "n2"]


def test_excluded_nodes_are_never_chosen_and_reasons_are_returned() -> None:
    nodes = {
        "best": node("best", cores=16),
        "failed": node("failed", cores=16),
        "ok": node("ok", cores=2),
        "onnx-only": node("onnx-only", formats=("onnx",)),
        "gone": node("gone", state="lost"),
    }
    exclude = {"best": "has a replica", "failed": "failed: load_failed: boom"}
    found = place(spec(), nodes, 3, exclude)
    assert found.chosen == ["ok"]
    assert found.refused == {
        "best": "has a replica",
        "failed": "failed: load_failed: boom",
        "onnx-only": "cannot run tflite (runs onnx)",
        "gone": "lost",
    }


def test_count_is_respected() -> None:
    nodes = {f"n{i}": node(f"n{i}") for i in range(5)}
    for count in range(7):
        found = place(spec(), nodes, count, {})
        assert len(found.chosen) == min(count, 5)
        assert len(set(found.chosen)) == len(found.chosen)
        assert found.refused == {}


def test_the_fastest_nodes_win_and_small_speed_differences_do_not_count() -> None:
    """A node whose reference workload takes 4x as long loses to the faster ones; within
    20% of the fastest, nodes count as equally fast (ties go by cores, then id)."""
    nodes = {
        "slow": node("slow", speed_ms=12.0),
        "fast": node("fast", speed_ms=3.0),
        "noisy": node("noisy", speed_ms=3.5),
        "unknown": node("unknown"),
    }
    assert place(spec(), nodes, 4, {}).chosen == ["fast", "noisy", "unknown", "slow"]
    assert place(spec(), nodes, 1, {"fast": "has a replica"}).chosen == ["noisy"]


def test_a_model_measured_on_a_node_ranks_it_by_that_not_by_the_reference() -> None:
    """A node that ran this model 10x slower than the fastest that ran it loses to one
    not measured yet, whatever their reference workloads say (the fastest and the one not
    measured count as equally fast: ties go by id)."""
    nodes = {
        "ran-slow": node("ran-slow", speed_ms=3.0),
        "fresh": node("fresh", speed_ms=3.0),
        "ran-fast": node("ran-fast", speed_ms=3.0),
    }
    costs = {"ran-slow": 20.0, "ran-fast": 2.0}
    assert place(spec(), nodes, 3, {}, costs=costs).chosen == ["fresh", "ran-fast", "ran-slow"]
    found = place(spec(), nodes, 1, {"ran-fast": "has a replica"}, costs=costs)
    assert found.chosen == ["fresh"]
