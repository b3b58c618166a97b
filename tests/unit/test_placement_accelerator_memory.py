"""Placement and an accelerator's own memory: a model that needs a GPU goes only where a
GPU of that kind can hold it (synthetic capabilities, no broker)."""

from __future__ import annotations

from mqinfer.coordinator.placement import (
    ACCELERATOR_MEMORY_FACTOR,
    accelerator_memory_needed_mb,
    place,
    why_not,
    why_unfit,
)
from mqinfer.coordinator.registry import NodeRecord
from mqinfer.protocol import messages as m

SHA = "ab" * 32
MB = 2**20


def spec(size_mb: float = 100, workers: int = 1, accelerator: str | None = "gpu") -> m.ServiceSpec:
    return m.ServiceSpec.model_validate(
        {
            "name": "detector",
            "model": "detector.onnx",
            "artifact": SHA,
            "format": "onnx",
            "size": int(size_mb * MB),
            "workers": workers,
            "constraints": {"accelerator": accelerator},
        }
    )


def node(node_id: str, *gpus: int | None) -> NodeRecord:
    """An online node with a cpu and a GPU of each memory given (None: not announced)."""
    accelerators = [m.Accelerator(kind="cpu", name="cpu", runtime="onnxruntime")]
    accelerators += [
        m.Accelerator(
            kind="gpu",
            name=f"GPU{i}",
            runtime="onnxruntime",
            detail={"device": f"cuda:{i}"},
            memory_mb=memory,
        )
        for i, memory in enumerate(gpus)
    ]
    caps = m.Capabilities(
        node=node_id,
        session=1,
        ts=0.0,
        agent="0.1",
        host=m.Host(
            hostname=node_id, os="Linux", arch="x86_64", cores=4, memory_total_mb=8192, python="3"
        ),
        runtimes={
            "onnxruntime": m.Runtime(package="onnxruntime-gpu", version="1", formats=["onnx"])
        },
        accelerators=accelerators,
        formats=["onnx"],
    )
    return NodeRecord(node_id, state="online", session=1, caps=caps)


def test_the_need_is_the_file_size_times_the_factor_per_worker() -> None:
    assert ACCELERATOR_MEMORY_FACTOR == 3
    assert accelerator_memory_needed_mb(spec(100)) == 300
    assert accelerator_memory_needed_mb(spec(100, workers=2)) == 600
    assert accelerator_memory_needed_mb(spec(0.1)) == 1  # rounded up


def test_a_gpu_too_small_for_the_model_is_refused_naming_it() -> None:
    reason = why_not(spec(100), node("small", 256))
    assert reason == (
        "gpu GPU0 has 256 MB of memory, the model needs 300 MB (1 worker(s) x 3 x 100.0 MB file)"
    )
    assert why_unfit(spec(100), node("small", 256)) == reason  # a replica there is moved
    assert why_not(spec(100), node("big", 300)) is None


def test_one_large_enough_gpu_of_several_will_do() -> None:
    assert why_not(spec(100), node("two", 128, 1024)) is None
    assert "GPU1 has 200 MB" in (why_not(spec(100), node("two", 128, 200)) or "")


def test_unknown_gpu_memory_is_not_a_reason_to_refuse() -> None:
    # why_unfit: what the node is, apart from the host memory it has free
    assert why_unfit(spec(10_000), node("unknown", None)) is None
    assert why_unfit(spec(10_000), node("mixed", 128, None)) is None


def test_without_an_accelerator_constraint_gpu_memory_does_not_matter() -> None:
    assert why_unfit(spec(10_000, accelerator=None), node("small", 128)) is None
    assert why_unfit(spec(10_000, accelerator="cpu"), node("small", 128)) is None


def test_placement_goes_where_the_model_fits() -> None:
    nodes = {"a-small": node("a-small", 512), "b-big": node("b-big", 8192), "c-none": node("c")}
    placed = place(spec(400, workers=1), nodes, 3, exclude={})
    assert placed.chosen == ["b-big"]
    assert placed.refused == {
        "a-small": "gpu GPU0 has 512 MB of memory, the model needs 1200 MB "
        "(1 worker(s) x 3 x 400.0 MB file)",
        "c-none": "no gpu accelerator (has cpu)",
    }


def test_old_capabilities_without_the_memory_fields_still_read() -> None:
    old = {"kind": "gpu", "name": "GPU0", "runtime": "onnxruntime", "detail": {}}
    acc = m.Accelerator.model_validate(old)
    assert (acc.memory_mb, acc.free_mb) == (None, None)
