"""One piece of work on a node, from the hub's lease to the answer. Runs on a worker thread.

The worker checks the lease (work whose lease ran out is released, not done: the hub has
given it to another replica), decodes the request or the stage's tensors, runs the model
and answers the hub with the result JSON the requester gets, or with the tensors for the
next stage. An answer goes out only while the lease holds ([T-WORK-3]).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from mqinfer.node.runtimes import Model, RuntimeFailure
from mqinfer.protocol import tensors
from mqinfer.protocol import work as w
from mqinfer.protocol.errors import Code, ProtocolError
from mqinfer.protocol.manifest import Manifest, TensorInfo
from mqinfer.protocol.payload import decode_request, encode_outputs, result_json, top_k


@dataclass
class Job:
    work: w.Work
    body: bytes
    received: float  # monotonic, on this node
    session: int  # the connection it came on: its answer goes out on that one or not at all
    started: float = 0.0

    @property
    def expires(self) -> float:
        return self.received + self.work.lease_ms / 1000

    @property
    def deadline(self) -> float:
        return self.received + self.work.deadline_ms / 1000


@dataclass
class Served:
    """What a worker made of a job: the answer for the hub, and what it measured."""

    answer: w.Answer
    body: bytes = b""
    inference_ms: float | None = None
    queue_ms: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Serving:
    """What a replica knows that its jobs need."""

    node: str
    service: str
    stage: int | None
    stages: int
    manifest: Manifest | None
    outputs: list[int]  # model output i goes out as output outputs[i] (a last stage's order)
    max_request_bytes: int
    slowdown: float = 1.0  # for experiments only: runs made this many times slower

    @property
    def last(self) -> bool:
        return self.stage is None or self.stage == self.stages - 1


def release(job: Job, code: str, reason: str, now: float) -> Served:
    answer = w.Answer(
        job=job.work.job,
        kind="released",
        code=code,
        reason=reason,
        node_ms=round((now - job.received) * 1000, 3),
    )
    return Served(answer)


def serve(model: Model, job: Job, how: Serving) -> Served:
    """Do one job with `model` (held by this thread); never raises for bad input."""
    start = job.started = time.monotonic()
    if start > job.expires:
        return release(job, "lease_expired", "its lease ran out before a worker took it", start)
    work = job.work
    request_id = work.request_id
    queue_ms = work.age_ms + (start - job.received) * 1000
    try:
        if start > job.deadline:
            raise ProtocolError(
                Code.TIMEOUT,
                f"waited {queue_ms:.0f} ms for a worker; "
                f"{work.age_ms + work.deadline_ms:.0f} ms were allowed",
            )
        if work.kind == "tensors":
            arrays = tensors.match(tensors.decode(job.body), model.inputs)
        else:
            decoded = decode_request(
                job.body,
                model.inputs,
                how.manifest.preprocessing if how.manifest else None,
                max_bytes=how.max_request_bytes,
            )
            if decoded.request_id is not None and not work.id_fixed:
                request_id = decoded.request_id  # a JSON body named its own id ([T-REQ-2])
            if decoded.deadline_ms is not None and queue_ms > decoded.deadline_ms:
                raise ProtocolError(
                    Code.TIMEOUT,
                    f"waited {queue_ms:.0f} ms for a worker; the request's deadline_ms is "
                    f"{decoded.deadline_ms:g}",
                )
            arrays = decoded.arrays
        t1 = time.monotonic()
        outputs = model.run(arrays)
        t2 = time.monotonic()
        if how.slowdown > 1:
            time.sleep((how.slowdown - 1) * (t2 - t1))
            t2 = time.monotonic()
    except ProtocolError as e:
        return _error(job, how, request_id, e.code, e.message)
    except RuntimeFailure as e:
        return _error(job, how, request_id, Code.INFERENCE_FAILED, str(e))
    run_ms = (t2 - t1) * 1000
    trace = w.StageTrace(
        stage=how.stage or 0,
        node=how.node,
        queue_ms=round(queue_ms, 3),
        inference_ms=round(run_ms, 3),
    )
    if not how.last:
        body = tensors.encode(list(zip(model.outputs, outputs, strict=True)))
        return _answer(job, "tensors", body, run_ms, queue_ms, trace=trace)
    specs: list[TensorInfo] = [model.outputs[i] for i in how.outputs]
    ordered: list[np.ndarray] = [outputs[i] for i in how.outputs]
    labels = how.manifest.labels if how.manifest else []
    top = top_k(ordered[0], specs[0], labels) if labels else None
    stages = [*work.trace, trace] if how.stages else None
    end = time.monotonic()
    timing = {
        "queue_ms": sum(t.queue_ms for t in stages) if stages else queue_ms,
        "inference_ms": sum(t.inference_ms for t in stages) if stages else run_ms,
        "total_ms": work.age_ms + (end - job.received) * 1000,
    }
    payload = result_json(
        request_id=request_id,
        service=how.service,
        node=how.node,
        ok=True,
        outputs=encode_outputs(ordered, specs),
        top=top,
        timing=timing,
        stages=[t.model_dump() for t in stages] if stages else None,
    )
    return _answer(job, "result", payload, run_ms, queue_ms)


def _answer(
    job: Job,
    kind: Literal["result", "tensors"],
    body: bytes,
    run_ms: float | None,
    queue_ms: float,
    ok: bool = True,
    code: str | None = None,
    trace: w.StageTrace | None = None,
) -> Served:
    now = time.monotonic()
    if now > job.expires:  # done, but too late: the hub has given it to another
        return release(job, "lease_expired", "it finished after its lease ran out", now)
    answer = w.Answer(
        job=job.work.job,
        kind=kind,
        ok=ok,
        code=code,
        node_ms=round((now - job.received) * 1000, 3),
        service_ms=round((now - job.started) * 1000, 3),
        inference_ms=round(run_ms, 3) if run_ms is not None else None,
        trace=trace,
    )
    return Served(answer, body, inference_ms=run_ms, queue_ms=queue_ms)


def _error(job: Job, how: Serving, request_id: str, code: Code, message: str) -> Served:
    """An error result for the requester, through the hub like any result."""
    payload = result_json(
        request_id=request_id,
        service=how.service,
        node=how.node,
        ok=False,
        error=(str(code), message),
    )
    queue_ms = job.work.age_ms + (job.started - job.received) * 1000
    return _answer(job, "result", payload, None, queue_ms, ok=False, code=str(code))
