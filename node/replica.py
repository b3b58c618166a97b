"""One service replica on a node: its models, worker threads and bounded queue.

Work arrives on the MQTT network thread, which queues it (`offer`). Worker threads do the
work (mqinfer.node.jobs) with one of the replica's interpreters each and send the answer to
the hub from their own thread. One exception, for speed: a replica whose jobs are short
(INLINE_MS or less, as measured here) with nothing queued and an interpreter free does the
job on the network thread itself, as a hand-written node would: handing a job of a tenth of
a millisecond to a worker thread costs more than the job (the handoff, and the two threads
contending for the interpreter lock), and the answer is then written in the same pass of
the network loop as the work's acknowledgement. Anything longer, and anything while work
waits, goes to the workers, so the network thread is never held for long.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mqinfer.node.jobs import Job, Served, Serving, release, serve
from mqinfer.node.runtimes import (
    Backend,
    Model,
    RuntimeFailure,
    candidates,
    fastest,
    label,
    warm_up,
)
from mqinfer.protocol import messages as m
from mqinfer.protocol.errors import Code, ProtocolError
from mqinfer.protocol.manifest import TensorInfo

log = logging.getLogger("mqinfer.node")

# Answer the hub for a job (any thread): the job says which session it came on.
Answer = Callable[[Job, Served], None]

DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024
STATS_WEIGHT = 0.1  # weight of the newest run in the running means of the replica's costs
QUEUE_SLACK = 16  # work beyond its workers a replica queues (the hub sends fewer)
INLINE_MS = 2.0  # jobs this short (mean, measured) may be done on the network thread


class Replica:
    """A loaded model serving one slot (a service, or a pipeline stage). Created by the
    deploy command."""

    def __init__(
        self,
        *,
        node_id: str,
        spec: m.ServiceSpec,
        path: Path,
        backend: Backend,
        answer: Answer,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        stage: int | None = None,
        max_workers: int | None = None,
        artificial_slowdown: float = 1.0,
    ) -> None:
        self.node_id = node_id
        self.spec = spec
        self.name = spec.name
        self.stage = stage  # None: the whole model; else this pipeline stage
        self.slot = m.slot(spec.name, stage)
        self.path = path
        self.backend = backend  # a runtime, or Candidates: the fastest is measured at load
        self.runtime = label(backend)  # the runtime it serves with
        self.measured_ms: dict[str, float] = {}  # runtime -> ms on zeros, when it chose
        self.answer = answer
        self.max_request_bytes = max_request_bytes
        self.state = "loading"
        self.workers = min(spec.workers, max_workers or spec.workers)
        # For experiments only: every model run is followed by a sleep of (factor - 1) times
        # its duration, so this node behaves that many times slower.
        self.artificial_slowdown = artificial_slowdown
        self._rate_mark = (time.monotonic(), 0)  # (when, served) at the last heartbeat
        self.served = 0
        self.inference_ms: float | None = None  # running means, reported in heartbeats
        self.queue_ms: float | None = None
        self.service_ms: float | None = None
        self._outputs: list[int] = []
        self._models: list[Model] = []
        self._free: list[Model] = []  # interpreters no thread is using now
        self._freed = threading.Condition(threading.Lock())
        self._threads: list[threading.Thread] = []
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=self.workers + QUEUE_SLACK)
        self._lock = threading.Lock()
        self._running = 0

    # ---- lifecycle (the provisioning thread) --------------------------------------------

    def load(self) -> dict[str, Any]:
        """Load one model per worker and warm each up; raise ProtocolError(LOAD_FAILED)."""
        t0 = time.perf_counter()
        try:
            runtimes = self._verified(candidates(self.backend))
            if len(runtimes) == 1 and runtimes[0] is not self.backend:
                self.backend = runtimes[0]
                self.runtime = label(self.backend)
            if len(runtimes) > 1:
                self._models.append(self._fastest(runtimes))
            while len(self._models) < self.workers:
                self._models.append(self.backend.load(str(self.path), self.spec.threads))
            t1 = time.perf_counter()
            for model in self._models:
                warm_up(model)
            t2 = time.perf_counter()
            warm_up(self._models[0])  # a second, warm run: the first cost estimate
            self.inference_ms = (time.perf_counter() - t2) * 1000 * self.artificial_slowdown
            first = self._models[0]
            self._outputs = self._output_order(first.outputs)
        except RuntimeFailure as e:
            self.close()
            self.state = "failed"
            raise ProtocolError(Code.LOAD_FAILED, f"{self.spec.model}: {e}") from None
        detail: dict[str, Any] = {
            "load_ms": round((t1 - t0) * 1000, 2),
            "warmup_ms": round((t2 - t1) * 1000, 2),
            "runtime": self.runtime,
            "inputs": [t.model_dump(exclude_none=True) for t in first.inputs],
            "outputs": [t.model_dump(exclude_none=True) for t in first.outputs],
        }
        if self.measured_ms:
            detail["measured_ms"] = {k: round(v, 4) for k, v in self.measured_ms.items()}
        return detail

    def _verified(self, runtimes: list[Backend]) -> list[Backend]:
        """A pipeline stage runs on the runtime its split was verified with, where this
        node has it: another runtime's kernels may round differently, and the chained
        stages would then not give the whole model's outputs ([T-PIPE-6])."""
        pipeline = self.spec.pipeline
        if self.stage is None or pipeline is None or pipeline.runtime is None:
            return runtimes
        same = [b for b in runtimes if b.key == pipeline.runtime]
        if not same:
            log.warning(
                "%s: verified with %s, which this node does not have; serving with %s",
                self.slot,
                pipeline.runtime,
                ", ".join(label(b) for b in runtimes),
            )
            return runtimes
        if len(same) < len(runtimes):
            log.info(
                "%s: serving with %s, the runtime it was verified with", self.slot, label(same[0])
            )
        return same

    def _fastest(self, runtimes: list[Backend]) -> Model:
        """Measure the runtimes that can run the model and serve with the fastest; its
        model (loaded and run) is the first worker's."""
        measured = fastest(runtimes, str(self.path), self.spec.threads)
        self.backend = measured.backend
        self.runtime = measured.runtime
        self.measured_ms = dict(measured.ms)
        log.info("%s: %s", self.slot, measured.summary())
        return measured.model

    def _output_order(self, outputs: list[TensorInfo]) -> list[int]:
        """The last stage answers with the whole model's outputs in the whole model's order
        (a segment may list them in another); other stages pass on all of theirs."""
        if self.stage is None or self.stage != self.spec.stages - 1 or not self.spec.pipeline:
            return list(range(len(outputs)))
        names = [t.name for t in outputs]
        want = self.spec.pipeline.segments[self.stage].manifest.outputs
        try:
            return [names.index(t.name) for t in want]
        except ValueError:
            raise RuntimeFailure(
                f"segment outputs {names} do not match the pipeline's {[t.name for t in want]}"
            ) from None

    def start(self) -> None:
        self._free = list(self._models)
        for i in range(len(self._models)):
            t = threading.Thread(target=self._work, name=f"{self.slot}-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        self.state = "ready"

    def stop(self) -> None:
        """Give back what is queued (the hub gives it to another replica), let the running
        work finish, then stop the workers and free the models."""
        self.state = "removing"
        self.purge(lambda _job: True, "the replica is being stopped", "stopping")
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join(timeout=10)
        with self._freed:  # a short job on the network thread gives its interpreter back
            self._freed.wait_for(lambda: len(self._free) >= len(self._models), timeout=10)
        self.close()

    def update(self, spec: m.ServiceSpec) -> bool:
        """Take a new spec in place when only what needs no reload changed."""
        if self.state != "ready" or m.needs_reload(self.spec, spec):
            return False
        self.spec = spec
        return True

    def close(self) -> None:
        for model in self._models:
            model.close()
        self._models.clear()

    # ---- work (network thread) --------------------------------------------------------

    def offer(self, job: Job) -> bool:
        """Queue a job, or do it now when it is short and nothing waits; False when the
        queue is full (the caller releases it)."""
        if self.state != "ready":
            return False
        if self._queue.empty() and self._short():
            model = self._take(wait=False)
            if model is not None:
                self._do(model, job)
                return True
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            return False
        return True

    def tick(self, now: float) -> None:
        """Queued work whose lease ran out is released now, not when a worker gets to it:
        the hub counts it against this replica until then."""
        if not self._queue.empty():
            self.purge(
                lambda job: now > job.expires, "its lease ran out in the queue", "lease_expired"
            )

    def purge(self, which: Callable[[Job], bool], reason: str, code: str = "released") -> int:
        """Release queued work that `which` picks (a dead session's, a stale dispatcher's)."""
        kept: list[Job | None] = []
        gone = 0
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None and which(item):
                self.answer(item, release(item, code, reason, time.monotonic()))
                gone += 1
            else:
                kept.append(item)
        for item in kept:
            self._queue.put_nowait(item)
        return gone

    @property
    def inflight(self) -> int:
        return self._queue.qsize() + self._running

    def stats(self) -> m.ReplicaStats:
        def r(v: float | None) -> float | None:
            return None if v is None else round(v, 3)

        now = time.monotonic()
        with self._lock:
            (then, before), served = self._rate_mark, self.served
            self._rate_mark = (now, served)
        rate = (served - before) / (now - then) if now > then else None
        return m.ReplicaStats(
            served=served,
            inference_ms=r(self.inference_ms),
            queue_ms=r(self.queue_ms),
            service_ms=r(self.service_ms),
            workers=self.workers,
            rate=r(rate),
        )

    # ---- workers ----------------------------------------------------------------------

    def _serving(self) -> Serving:
        return Serving(
            node=self.node_id,
            service=self.name,
            stage=self.stage,
            stages=self.spec.stages,
            manifest=self.spec.manifest,
            outputs=self._outputs,
            max_request_bytes=self.max_request_bytes,
            slowdown=self.artificial_slowdown,
        )

    def _short(self) -> bool:
        """Whether this replica's jobs take INLINE_MS or less here (measured)."""
        ms = self.service_ms if self.service_ms is not None else self.inference_ms
        return ms is not None and ms <= INLINE_MS and self.artificial_slowdown <= 1

    def _take(self, wait: bool) -> Model | None:
        """A free interpreter; None if none is free and not `wait`."""
        with self._freed:
            while not self._free:
                if not wait:
                    return None
                self._freed.wait()
            return self._free.pop()

    def _give_back(self, model: Model) -> None:
        with self._freed:
            self._free.append(model)
            self._freed.notify()

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            model = self._take(wait=True)
            assert model is not None  # it waited for one
            self._do(model, job)

    def _do(self, model: Model, job: Job) -> None:
        """Do one job with `model` (taken by this thread), give the model back, answer."""
        with self._lock:
            self._running += 1
        try:
            served = serve(model, job, self._serving())
        except Exception:  # a bug: the hub still gets an answer, the worker goes on
            log.exception("%s: job %s failed", self.slot, job.work.job)
            served = release(job, "internal", "the node failed on it", time.monotonic())
        finally:
            self._give_back(model)
            with self._lock:
                self._running -= 1
        self._count(served)
        self.answer(job, served)

    def _count(self, served: Served) -> None:
        if served.inference_ms is None:
            return
        took = served.answer.service_ms
        with self._lock:
            self.served += 1
            self.inference_ms = _mean(self.inference_ms, served.inference_ms)
            if served.queue_ms is not None:
                self.queue_ms = _mean(self.queue_ms, served.queue_ms)
            if took is not None:
                self.service_ms = _mean(self.service_ms, took)


def _mean(old: float | None, new: float) -> float:
    """Running mean, the newest value weighted STATS_WEIGHT."""
    return new if old is None else (1 - STATS_WEIGHT) * old + STATS_WEIGHT * new
