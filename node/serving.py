"""One service replica on a node: its models, worker threads, bounded queue and routing.

Requests arrive on the MQTT network thread (`on_request`), which only decides who owns
them (node.routing) and queues them. Worker threads, each with its own interpreter, decode
the payload, run the model and publish the result, then a `done` notice so the other
replicas forget the request.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from mqinfer.mqtt import Message, Outgoing
from mqinfer.node.runtimes import Backend, Model, RuntimeFailure, warm_up
from mqinfer.protocol import codec, replies, tensors
from mqinfer.protocol import messages as m
from mqinfer.protocol.errors import Code, ProtocolError
from mqinfer.protocol.manifest import Manifest, TensorInfo
from mqinfer.protocol.payload import decode_request, encode_outputs, result_json, top_k
from mqinfer.protocol.routing import Witness, Witnessed, owner, request_key
from mqinfer.protocol.topics import Ref, Topics

log = logging.getLogger("mqinfer.node")

# Publish messages back to back without blocking (mqinfer.mqtt.Connection.publish_many).
Send = Callable[[list[Outgoing]], None]

DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024
ORPHAN_SETTLE = 0.3  # seconds a lost owner's requests wait for its late done notices
MAX_WITNESSED_IDS = 8192
STATS_WEIGHT = 0.1  # weight of the newest run in the running means of the replica's costs
# A request for a model that runs faster than this (running mean), arriving while the replica
# is idle, is served on the network thread itself: two thread handoffs (measured ~0.3 ms of
# a ~0.9 ms round trip for the digits model) cost more than holding the thread that long.
INLINE_MS = 1.0


@dataclass
class Route:
    """Where the answer to a request goes and what the done notice names."""

    request_id: str
    key: str  # the request's key at the head stage (the only stage for a whole model)
    reply: str
    correlation: bytes | None
    trace: list[dict[str, Any]]


@dataclass
class Job:
    message: Message
    ref: Ref
    key: str
    received: float  # monotonic
    deadline: float  # monotonic
    stage_msg: tensors.StageMessage | None = None  # the decoded input of a later stage


class Replica:
    """A loaded model serving one service. Created by the deploy command."""

    def __init__(
        self,
        *,
        node_id: str,
        spec: m.ServiceSpec,
        path: Path,
        backend: Backend,
        topics: Topics,
        send: Send,
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
        self.stages = spec.stages
        self.head = stage is None or stage == 0
        self.last = stage is None or stage == spec.stages - 1
        self.path = path
        self.backend = backend
        self.topics = topics
        self.send = send
        self.max_request_bytes = max_request_bytes
        self.manifest: Manifest | None = spec.manifest
        self.state = "loading"
        self.ready: list[str] = []  # ready replicas per the last status the broker delivered
        self.listed: list[str] = []  # every replica that status lists, in any state
        self.missing: list[int] = []  # pipeline stages with no ready replica, per that status
        self.weights: dict[str, float] = {}  # routing weights of the ready replicas
        self.workers = min(spec.workers, max_workers or spec.workers)
        # For experiments only: every model run is followed by a sleep of (factor - 1) times
        # its duration, so this node behaves that many times slower.
        self.artificial_slowdown = artificial_slowdown
        self._rate_mark = (time.monotonic(), 0)  # (when, served) at the last heartbeat
        self.served = 0
        self.inference_ms: float | None = None  # running means, reported in heartbeats
        self.queue_ms: float | None = None
        self.service_ms: float | None = None
        self._outputs: list[int] = []  # model output i goes out as the pipeline's output
        self._models: list[Model] = []
        self._model_locks: list[threading.Lock] = []  # a model runs on one thread at a time
        self._threads: list[threading.Thread] = []
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=spec.queue)
        self._witness: Witness[Job] = Witness()
        self._orphans: list[tuple[float, Witnessed[Job]]] = []  # (serve at, request)
        self._witnessed_ids: OrderedDict[str, str] = OrderedDict()  # request id -> key
        self._lock = threading.Lock()  # witness, ready, counters
        self._running = 0

    # ---- lifecycle (the deploy thread) ------------------------------------------------

    def load(self) -> dict[str, Any]:
        """Load one model per worker and warm each up; raise ProtocolError(LOAD_FAILED)."""
        t0 = time.perf_counter()
        try:
            for _ in range(self.workers):
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
        return {
            "load_ms": round((t1 - t0) * 1000, 2),
            "warmup_ms": round((t2 - t1) * 1000, 2),
            "inputs": [t.model_dump(exclude_none=True) for t in first.inputs],
            "outputs": [t.model_dump(exclude_none=True) for t in first.outputs],
        }

    def _output_order(self, outputs: list[TensorInfo]) -> list[int]:
        """The last stage answers with the whole model's outputs in the whole model's order
        (a segment may list them in another); other stages pass on all of theirs."""
        if self.stage is None or not self.last or self.spec.pipeline is None:
            return list(range(len(outputs)))
        names = [t.name for t in outputs]
        want = self.spec.pipeline.segments[self.stage].manifest.outputs
        try:
            return [names.index(t.name) for t in want]
        except ValueError:
            raise RuntimeFailure(
                f"segment outputs {names} do not match the pipeline's {[t.name for t in want]}"
            ) from None

    def filters(self) -> list[str]:
        if not self.head:
            assert self.stage is not None
            return [
                self.topics.service_stage(self.name, self.stage),
                self.topics.service_status(self.name),
            ]
        result = self.topics.service_result(self.name)
        return [
            *self.topics.service_requests(self.name),
            self.topics.service_status(self.name),
            self.topics.service_done(self.name),
            result,  # a result seen is as good as a done notice (amqtt can lose the
            result + "/+",  # done of a client that disconnects right after its result)
        ]

    def start(self) -> None:
        self._model_locks = [threading.Lock() for _ in self._models]
        for i in range(len(self._models)):
            t = threading.Thread(target=self._work, args=(i,), name=f"{self.slot}-worker-{i}")
            t.daemon = True
            t.start()
            self._threads.append(t)
        self.state = "ready"

    def stop(self) -> None:
        """Answer what is queued, then stop the workers and free the models."""
        self.state = "removing"
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join(timeout=10)
        self.close()

    def update(self, spec: m.ServiceSpec) -> bool:
        """Take a new spec in place when only what needs no reload changed."""
        if self.state != "ready" or m.needs_reload(self.spec, spec):
            return False
        self.spec, self.manifest = spec, spec.manifest
        return True

    def close(self) -> None:
        for model in self._models:
            model.close()
        self._models.clear()

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

    # ---- incoming (network thread) ----------------------------------------------------

    def on_request(self, ref: Ref, message: Message) -> None:
        now = time.monotonic()
        key = request_key(
            message.topic, message.payload, message.correlation_data, message.response_topic
        )
        job = Job(message, ref, key, now, now + self.spec.deadline_ms / 1000)
        with self._lock:
            mine = owner(key, self.ready, self.weights)
            log.debug(
                "%s: request %s on %s: owner %s of %s",
                self.slot,
                key,
                message.topic,
                mine,
                self.ready,
            )
            if mine != self.node_id:
                expires = job.deadline + self._grace()
                self._witness.add(Witnessed(key, mine, expires, job, len(message.payload)))
                if not message.response_topic:
                    rid = replies.request_id(ref, message.correlation_data, None, key)
                    self._witnessed_ids[rid] = key
                    while len(self._witnessed_ids) > MAX_WITNESSED_IDS:
                        self._witnessed_ids.popitem(last=False)
                return
        self._enqueue(job, inline=True)

    def on_stage(self, ref: Ref, message: Message) -> None:
        """[T-PIPE-3] tensors from the previous stage: the owner among this stage's ready
        replicas runs them; the request's head stage answers 'timeout' if they are lost."""
        now = time.monotonic()
        key = request_key(message.topic, message.payload, None, None)
        with self._lock:
            mine = owner(key, self.ready, self.weights)
        if mine not in (None, self.node_id):
            return
        try:
            msg = tensors.decode(message.payload)
        except ProtocolError as e:
            # No route to the caller can be read: the error goes to the service's result
            # topic, where whoever watches the service sees it.
            log.warning("%s: rejected a message on %s: %s", self.slot, message.topic, e.message)
            payload = self._error(key[:16], e.code, f"{message.topic}: {e.message}")
            self.send([Outgoing(self.topics.service_result(self.name), payload, 1)])
            return
        job = Job(message, ref, key, now, now + max(msg.deadline_ms, 0) / 1000, msg)
        self._enqueue(job, inline=True)

    def on_status(self, status: m.ServiceStatus) -> None:
        ready = status.ready_nodes(self.stage)
        listed = status.listed_nodes(self.stage)
        missing = [k for k in range(self.stages) if not status.ready_nodes(k)]
        weights = status.weights(self.stage)
        log.debug("%s: status %s, ready %s, listed %s", self.slot, status.state, ready, listed)
        with self._lock:
            self.missing = missing
            if ready == self.ready and listed == self.listed and weights == self.weights:
                return
            self.ready, self.listed, self.weights = ready, listed, weights
            if self.stages:
                # A pipeline's requests are not served again (the lost head may have passed
                # them on): one head replica answers those that never finish 'timeout'.
                self._witness.rehome(ready, listed, weights)
                mine = []
            else:
                mine = self._witness.reassign(ready, listed, self.node_id, weights)
        if status.state != "removed" and self.node_id not in listed:
            # Given up on (thought lost): the witnesses re-serve what we had queued.
            self._drain()
        if mine:
            # Served after ORPHAN_SETTLE: a broker that does not keep the order of messages
            # from different clients (amqtt) may deliver the lost owner's last done notices
            # after the status that dropped it.
            log.info("%s: taking over %d requests of a replica that left", self.slot, len(mine))
            with self._lock:
                due = time.monotonic() + ORPHAN_SETTLE
                self._orphans += [(due, entry) for entry in mine]

    def on_done(self, done: m.Done) -> None:
        if done.node == self.node_id and done.stage == self.stage:
            return
        with self._lock:
            self._forget(done.keys)

    def on_result(self, ref: Ref, message: Message) -> None:
        """A result on the service's result topics: the request it answers is done."""
        if not self._witnessed_ids:
            return  # nothing witnessed: no need to read results (our own, mostly)
        rid = ref.request_id
        if rid is None:
            try:
                body = orjson.loads(message.payload)
            except orjson.JSONDecodeError:
                return
            rid = body.get("request_id") if isinstance(body, dict) else None
        if not isinstance(rid, str):
            return
        with self._lock:
            key = self._witnessed_ids.pop(rid, None)
            if key is not None:
                self._forget([key])

    def _forget(self, keys: list[str]) -> None:
        """Answered elsewhere: drop from the witness and from the orphans (lock held)."""
        self._witness.done(keys)
        if self._orphans:
            left = list(keys)
            kept = []
            for due, entry in self._orphans:
                if entry.key in left:
                    left.remove(entry.key)  # answered after all
                else:
                    kept.append((due, entry))
            self._orphans = kept

    def _serve_orphans(self, now: float) -> None:
        with self._lock:
            due = [entry for t, entry in self._orphans if t <= now]
            self._orphans = [(t, entry) for t, entry in self._orphans if t > now]
        for entry in due:
            if self.node_id in self.ready:
                self._enqueue(entry.item)
            else:
                self._fail(
                    entry.item,
                    Code.UNAVAILABLE,
                    f"the replica serving this request was lost and {self.name} has no "
                    "other ready replica",
                )

    def tick(self, now: float) -> None:
        """[T-SERVE-2] a witnessed request that its owner has not answered by its deadline
        plus a grace period is answered 'timeout' by one replica: the owner's successor.
        [T-PIPE-4] in a pipeline, the head replica that owns it (the head keeps what it
        passed on until the last stage's done notice)."""
        self._serve_orphans(now)
        with self._lock:
            late = self._witness.expire(now)
            listed, ready, weights = self.listed, self.ready, self.weights
        for entry in late:
            if entry.owner is None:
                continue  # came while no replica was ready: the coordinator answered it
            if self.stages:
                answers = entry.owner == self.node_id
                detail = "the pipeline did not finish it"
            else:
                others = [n for n in ready if n != entry.owner] or [
                    n for n in listed if n != entry.owner
                ]
                answers = owner(entry.key, others, weights) == self.node_id
                detail = f"no answer from {entry.owner}"
            if answers:
                self._fail(
                    entry.item,
                    Code.TIMEOUT,
                    f"{detail} within {self.spec.deadline_ms} ms "
                    f"(+{self._grace() * 1000:.0f} ms grace)",
                )

    def _grace(self) -> float:
        """How long past a request's deadline its witnesses wait for the owner's answer:
        the owner answers 'timeout' itself at the deadline unless a model run is under way."""
        return max(2.0, self.spec.deadline_ms / 2000)

    def _enqueue(self, job: Job, inline: bool = False) -> None:
        """Queue a job for the workers; with `inline` (on the network thread) serve it at
        once when the replica is idle and its model is fast (INLINE_MS)."""
        if len(job.message.payload) > self.max_request_bytes:
            self._fail(job, Code.TOO_LARGE, self._too_large(len(job.message.payload)))
            return
        if inline and self._serve_inline(job):
            return
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self._fail(
                job,
                Code.BUSY,
                f"replica on {self.node_id} has {self.spec.queue} requests queued; retry later",
            )

    def _too_large(self, size: int) -> str:
        return f"request is {size} bytes; this node accepts at most {self.max_request_bytes}"

    def _drain(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return

    # ---- workers ----------------------------------------------------------------------

    def _serve_inline(self, job: Job) -> bool:
        fast = self.inference_ms is not None and self.inference_ms < INLINE_MS
        if not fast or self.state != "ready" or not self._model_locks:
            return False
        with self._lock:
            if self._running or not self._queue.empty():
                return False
            lock = self._model_locks[0]
            if not lock.acquire(blocking=False):
                return False
            self._running += 1
        try:
            self._run_job(0, job)
        finally:
            lock.release()
        return True

    def _work(self, index: int) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                self._running += 1
            with self._model_locks[index]:
                self._run_job(index, job)

    def _run_job(self, index: int, job: Job) -> None:
        """Serve one job with model `index` (its lock held, `_running` counted)."""
        started = time.monotonic()
        try:
            self._serve(self._models[index], job)
            took = (time.monotonic() - started) * 1000
            with self._lock:
                self.service_ms = _mean(self.service_ms, took)
        except Exception:
            log.exception("%s: request %s failed", self.slot, job.key)
            self._fail(job, Code.INTERNAL, "the node failed while serving this request")
        finally:
            with self._lock:
                self._running -= 1

    def _serve(self, model: Model, job: Job) -> None:
        start = time.monotonic()
        route = self._route(job, None)
        if start > job.deadline:
            waited = (start - job.received) * 1000
            deadline = (job.deadline - job.received) * 1000
            self._fail(
                job,
                Code.TIMEOUT,
                f"waited {waited:.0f} ms for a worker at {self.slot}; {deadline:.0f} ms were left",
            )
            return
        try:
            if job.stage_msg is not None:
                arrays = tensors.match(job.stage_msg.tensors, model.inputs)
            else:
                decoded = decode_request(
                    job.message.payload,
                    model.inputs,
                    self.manifest.preprocessing if self.manifest else None,
                    max_bytes=self.max_request_bytes,
                )
                if decoded.request_id is not None:  # a JSON body named its request id
                    route = self._route(job, decoded.request_id)
                if decoded.deadline_ms is not None:
                    waited = (time.monotonic() - job.received) * 1000
                    if waited > decoded.deadline_ms:
                        raise ProtocolError(
                            Code.TIMEOUT,
                            f"waited {waited:.0f} ms for a worker; the request's deadline_ms "
                            f"is {decoded.deadline_ms:g}",
                        )
                    job.deadline = min(job.deadline, job.received + decoded.deadline_ms / 1000)
                arrays = decoded.arrays
            if self.missing and self.head:
                raise ProtocolError(
                    Code.UNAVAILABLE,
                    f"pipeline {self.name} has no ready replica for stage(s) "
                    f"{', '.join(map(str, self.missing))}",
                )
            t1 = time.monotonic()
            outputs = model.run(arrays)
            t2 = time.monotonic()
            if self.artificial_slowdown > 1:
                time.sleep((self.artificial_slowdown - 1) * (t2 - t1))
                t2 = time.monotonic()
        except ProtocolError as e:
            self._answer(route, self._error(route.request_id, e.code, e.message))
            return
        except RuntimeFailure as e:
            self._answer(route, self._error(route.request_id, Code.INFERENCE_FAILED, str(e)))
            return
        self._count(queue_ms=(start - job.received) * 1000, inference_ms=(t2 - t1) * 1000)
        route.trace.append(
            {
                "stage": self.stage,
                "node": self.node_id,
                "queue_ms": round((start - job.received) * 1000, 3),
                "inference_ms": round((t2 - t1) * 1000, 3),
            }
        )
        if not self.last:
            self._pass_on(job, route, model.outputs, outputs)
            return
        specs = [model.outputs[i] for i in self._outputs]
        outputs = [outputs[i] for i in self._outputs]
        labels = self.manifest.labels if self.manifest else []
        top = top_k(outputs[0], specs[0], labels) if labels else None
        end = time.monotonic()
        timing = {
            "queue_ms": sum(t["queue_ms"] for t in route.trace),
            "inference_ms": sum(t["inference_ms"] for t in route.trace),
            "total_ms": (end - job.received) * 1000,
        }
        payload = result_json(
            request_id=route.request_id,
            service=self.name,
            node=self.node_id,
            ok=True,
            outputs=encode_outputs(outputs, specs),
            top=top,
            timing=timing,
            stages=route.trace if self.stages else None,
        )
        self._answer(route, payload)

    def _count(self, queue_ms: float, inference_ms: float) -> None:
        with self._lock:
            self.served += 1
            self.inference_ms = _mean(self.inference_ms, inference_ms)
            self.queue_ms = _mean(self.queue_ms, queue_ms)

    def _pass_on(
        self, job: Job, route: Route, specs: list[TensorInfo], outputs: list[np.ndarray]
    ) -> None:
        """[T-PIPE-2] the outputs go to the next stage with the route to the caller; the
        head keeps the request until the last stage's done notice."""
        assert self.stage is not None
        left = (job.deadline - time.monotonic()) * 1000
        msg = tensors.StageMessage(
            request_id=route.request_id,
            key=route.key,
            reply=route.reply,
            correlation=route.correlation,
            deadline_ms=left,
            tensors=list(zip(specs, outputs, strict=True)),
            trace=route.trace,
        )
        if self.head:
            with self._lock:
                expires = job.deadline + self._grace()
                self._witness.add(Witnessed(job.key, self.node_id, expires, job, 0))
        topic = self.topics.service_stage(self.name, self.stage + 1)
        self.send([Outgoing(topic, tensors.encode(msg), 1)])

    # ---- answering --------------------------------------------------------------------

    def _route(self, job: Job, from_body: str | None) -> Route:
        msg = job.stage_msg
        if msg is not None:
            return Route(msg.request_id, msg.key, msg.reply, msg.correlation, list(msg.trace))
        message = job.message
        return Route(
            replies.request_id(job.ref, message.correlation_data, from_body, job.key),
            job.key,
            replies.result_topic(self.topics, self.name, job.ref, message.response_topic),
            message.correlation_data,
            [],
        )

    def _error(self, request_id: str, code: Code, message: str) -> bytes:
        return result_json(
            request_id=request_id,
            service=self.name,
            node=self.node_id,
            ok=False,
            error=(str(code), message),
        )

    def _fail(self, job: Job, code: Code, message: str) -> None:
        route = self._route(job, None)
        self._answer(route, self._error(route.request_id, code, message))

    def _answer(self, route: Route, payload: bytes) -> None:
        done = m.Done(node=self.node_id, keys=[route.key], stage=self.stage)
        # [T-SERVE-2] the answer, then at once the notice that lets the witnesses forget it
        self.send(
            [
                Outgoing(route.reply, payload, 1, route.correlation),
                Outgoing(self.topics.service_done(self.name), codec.encode(done), 1),
            ]
        )


def _mean(old: float | None, new: float) -> float:
    """Running mean, the newest value weighted STATS_WEIGHT."""
    return new if old is None else (1 - STATS_WEIGHT) * old + STATS_WEIGHT * new
