"""coordinator.status: the status text says each thing once."""

from __future__ import annotations

from mqinfer.coordinator.status import as_text, service_line
from mqinfer.protocol import messages as m


def status(state: str, *replicas: tuple[str, str, int | None]) -> m.ServiceStatus:
    return m.ServiceStatus(
        name="digits",
        state=state,  # type: ignore[arg-type]
        replicas=[
            m.ReplicaStatus(node=node, state=st, stage=stage)  # type: ignore[arg-type]
            for node, st, stage in replicas
        ],
    )


def test_a_ready_service_names_its_nodes_once() -> None:
    line = service_line(status("ready", ("edge-1", "ready", None), ("edge-2", "ready", None)))
    assert line == "ready on edge-1, edge-2"
    assert line.split().count("ready") == 1


def test_replicas_that_are_not_ready_say_their_state() -> None:
    line = service_line(status("degraded", ("edge-1", "ready", None), ("edge-2", "failed", None)))
    assert line == "degraded on edge-1 (edge-2 failed)"
    assert service_line(status("deploying", ("edge-1", "deploying", None))) == (
        "deploying (edge-1 deploying)"
    )
    assert service_line(status("failed")) == "failed"


def test_pipeline_replicas_name_their_stage() -> None:
    line = service_line(status("ready", ("edge-1", "ready", 0), ("edge-2", "ready", 1)))
    assert line == "ready on edge-1 [stage 0], edge-2 [stage 1]"


def test_the_status_table_says_ready_once_per_service() -> None:
    spec = {"model": "digits_int8.tflite", "format": "tflite", "replicas": 2, "stages": 0}
    service = {
        "name": "digits",
        "spec": spec,
        "state": "ready",
        "reason": None,
        "replicas": [
            {"node": "edge-1", "state": "ready", "inference_ms": 1.5},
            {"node": "edge-2", "state": "ready"},
        ],
    }
    view = {"coordinator": {"id": "hub", "state": "online"}, "nodes": [], "services": [service]}
    row = as_text(view).splitlines()[-1]
    assert row.split()[:2] == ["digits", "ready"]
    assert row.endswith("(tflite)  2/2: edge-1 1.5 ms, edge-2"), row
    service["state"] = "degraded"
    service["replicas"][1]["state"] = "deploying"  # type: ignore[index]
    row = as_text(view).splitlines()[-1]
    assert row.endswith("1/2: edge-1 1.5 ms, edge-2 deploying"), row
