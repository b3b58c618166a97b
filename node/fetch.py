"""Fetching model artifacts from the broker: many at once, each bounded in time and memory.

An artifact is published retained as `artifacts/{sha256}/chunk/{i}` plus a meta message,
published last, that names its size and chunk count. `Fetcher.fetch` returns a future at
once; one thread of the fetcher's own does the rest:

1. the cache first: a file whose bytes still hash to its name is used as it is;
2. subscribe to the meta. Retained messages arrive right after the SUBACK, so a meta that
   has not come within `meta_wait` seconds is not on the broker: `artifact_missing`;
3. check the meta against this node's limits (memory, disk) before a byte of the model is
   taken in, then subscribe to the chunks; every chunk must have exactly the length the meta
   implies, and the chunks must keep coming (`chunk_wait`) or the fetch fails naming what
   is missing;
4. check the sha256 of the whole, write it to the cache, resolve the future.

Fetches run side by side: a model that was never uploaded fails after `meta_wait` without
holding up any other. Chunks held in memory are bounded by `max_bytes` over all fetches
(a fetch waits for room before it subscribes to its chunks), the fetches in progress by
`max_fetches`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from mqinfer.node.artifacts import ArtifactStore
from mqinfer.protocol import codec
from mqinfer.protocol import messages as m
from mqinfer.protocol.errors import Code, ProtocolError
from mqinfer.protocol.topics import Ref, Topics

log = logging.getLogger("mqinfer.node")

META_WAIT = 3.0  # seconds after the SUBACK for the retained meta; none by then: none at all
CHUNK_WAIT = 30.0  # seconds without a new chunk before a fetch gives up
MAX_FETCHES = 64  # fetches in progress at once (more wait their turn)
TICK = 0.1


class Subscriber(Protocol):
    """The part of an MQTT connection the fetcher needs (off the network thread)."""

    def subscribe(self, filters: Sequence[tuple[str, int]], timeout: float = 10.0) -> None: ...

    def unsubscribe(self, filters: Sequence[str]) -> None: ...


@dataclass
class _Fetch:
    sha256: str
    fmt: str
    future: Future[Path]
    meta: m.ArtifactMeta | None = None
    meta_error: ProtocolError | None = None
    chunks: dict[int, bytes] = field(default_factory=dict)
    received: int = 0  # bytes of chunks held
    reserved: int = 0  # bytes of the memory budget held for it
    subscribed: list[str] = field(default_factory=list)
    waiting_since: float = 0.0  # monotonic: SUBACK of the meta, then the last new chunk
    stage: str = "queued"  # queued | meta | room | chunks | done


class Fetcher:
    def __init__(
        self,
        store: ArtifactStore,
        topics: Topics,
        subscriber: Callable[[], Subscriber | None],
        max_bytes: Callable[[], int],
        meta_wait: float = META_WAIT,
        chunk_wait: float = CHUNK_WAIT,
        max_fetches: int = MAX_FETCHES,
    ) -> None:
        """`subscriber` gives the connection to subscribe on (None while disconnected);
        `max_bytes` the memory that chunks may take at once, asked at each fetch."""
        self.store = store
        self.topics = topics
        self.subscriber = subscriber
        self.max_bytes = max_bytes
        self.meta_wait = meta_wait
        self.chunk_wait = chunk_wait
        self.max_fetches = max_fetches
        self._lock = threading.Condition()
        self._fetches: dict[str, _Fetch] = {}  # by sha256: queued and in progress
        self._queue: deque[_Fetch] = deque()
        self._ready: deque[_Fetch] = deque()  # every chunk in: to check and write
        self._cleanup: deque[_Fetch] = deque()  # finished: to unsubscribe
        self._reserved = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="artifact-fetcher", daemon=True)
        self._thread.start()

    # ---- API --------------------------------------------------------------------------

    def fetch(self, sha256: str, fmt: str) -> Future[Path]:
        """The cached file, fetched first if needed. Returns at once (any thread)."""
        self.store.path(sha256, fmt)  # a bad hash or format fails here, before anything
        with self._lock:
            current = self._fetches.get(sha256)
            if current is not None and current.fmt == fmt:
                return current.future  # one fetch per artifact, however many deploys ask
            job = _Fetch(sha256, fmt, Future())
            if current is None:
                self._fetches[sha256] = job
            self._queue.append(job)
            self._lock.notify_all()
        return job.future

    def pending(self) -> int:
        with self._lock:
            return len(self._fetches)

    def close(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        self._thread.join(timeout=5)

    def on_message(self, ref: Ref, payload: bytes) -> None:
        """A meta or a chunk (network thread): kept only if a fetch waits for it."""
        if ref.artifact is None or not payload:
            return
        with self._lock:
            job = self._fetches.get(ref.artifact)
            if job is None or job.stage not in ("meta", "room", "chunks"):
                return
            if ref.chunk is None:
                self._take_meta(job, ref, payload)
            elif job.stage == "chunks":
                self._take_chunk(job, int(ref.chunk), payload)
            self._lock.notify_all()

    # ---- network thread, lock held ------------------------------------------------------

    def _take_meta(self, job: _Fetch, ref: Ref, payload: bytes) -> None:
        if job.meta is not None:
            return
        try:
            meta = codec.decode_for(ref, payload)
            if not isinstance(meta, m.ArtifactMeta):
                return
        except ProtocolError as e:
            job.meta_error = ProtocolError(
                Code.BAD_ARTIFACT, f"artifact {job.sha256[:12]}: its meta is refused: {e.message}"
            )
            return
        if meta.format != job.fmt:
            job.meta_error = ProtocolError(
                Code.BAD_ARTIFACT,
                f"artifact {job.sha256[:12]} was uploaded as {meta.format}; the spec says "
                f"{job.fmt}",
            )
            return
        job.meta = meta
        job.stage = "room"

    def _take_chunk(self, job: _Fetch, index: int, payload: bytes) -> None:
        meta = job.meta
        assert meta is not None
        if index >= meta.chunks or index in job.chunks:
            return  # a leftover of an older upload, or a repeat
        want = meta.chunk_length(index)
        if len(payload) != want:
            self._fail(
                job,
                ProtocolError(
                    Code.BAD_ARTIFACT,
                    f"artifact {job.sha256[:12]}: chunk {index} is {len(payload)} bytes; its "
                    f"meta says {want} (re-upload the model)",
                ),
            )
            return
        job.chunks[index] = payload
        job.received += len(payload)
        job.waiting_since = time.monotonic()
        if len(job.chunks) == meta.chunks:
            job.stage = "done"
            self._ready.append(job)

    def _fail(self, job: _Fetch, error: ProtocolError) -> None:
        job.stage = "done"
        job.chunks.clear()
        self._finish(job)
        if not job.future.done():
            job.future.set_exception(error)

    def _finish(self, job: _Fetch) -> None:
        """Forget the fetch, give back its memory, unsubscribe soon (lock held)."""
        if self._fetches.get(job.sha256) is job:
            del self._fetches[job.sha256]
        self._reserved -= job.reserved
        job.reserved = 0
        if job.subscribed:
            self._cleanup.append(job)

    # ---- the fetcher's thread -----------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    self._abandon()
                    return
                start = self._startable()
                ready = list(self._ready)
                self._ready.clear()
                roomy = self._roomy()
                for job, error in self._late(time.monotonic()):
                    self._fail(job, error)
                cleanup = list(self._cleanup)
                self._cleanup.clear()
                if not (start or ready or roomy or cleanup):
                    self._lock.wait(TICK)
                    continue
            for job in start:
                self._start(job)
            for job in roomy:
                self._subscribe(job, [self.topics.artifact_chunks(job.sha256)], "chunks")
            for job in ready:
                self._complete(job)
            for job in cleanup:
                self._unsubscribe(job)

    def _startable(self) -> list[_Fetch]:
        active = sum(1 for j in self._fetches.values() if j.stage != "queued")
        out: list[_Fetch] = []
        later: list[_Fetch] = []
        while self._queue and active + len(out) < self.max_fetches:
            job = self._queue.popleft()
            if self._fetches.get(job.sha256) is not job:
                if job.sha256 in self._fetches:
                    # The same artifact in another format is being fetched: this one goes
                    # once that one is done.
                    later.append(job)
                    continue
                self._fetches[job.sha256] = job
            job.stage = "starting"
            out.append(job)
        self._queue.extendleft(reversed(later))
        return out

    def _start(self, job: _Fetch) -> None:
        try:
            path = self.store.verified(job.sha256, job.fmt)
        except ProtocolError as e:
            with self._lock:
                self._fail(job, e)
            return
        if path is not None:
            with self._lock:
                job.stage = "done"
                self._finish(job)
            job.future.set_result(path)
            return
        self._subscribe(job, [self.topics.artifact_meta(job.sha256)], "meta")

    def _subscribe(self, job: _Fetch, filters: list[str], stage: str) -> None:
        conn = self.subscriber()
        try:
            if conn is None:
                raise ProtocolError(Code.INTERNAL, "not connected to the broker")
            with self._lock:
                job.stage = stage
                job.subscribed += filters
                # The meta's wait starts at its SUBACK; a stall of chunks counts from now.
                job.waiting_since = time.monotonic() if stage == "chunks" else 0.0
            conn.subscribe([(f, 1) for f in filters], timeout=30)
            with self._lock:
                job.waiting_since = time.monotonic()  # retained messages come after SUBACK
        except Exception as e:
            error = e if isinstance(e, ProtocolError) else ProtocolError(Code.INTERNAL, str(e))
            with self._lock:
                self._fail(job, error)

    def _unsubscribe(self, job: _Fetch) -> None:
        filters, job.subscribed = job.subscribed, []
        conn = self.subscriber()
        if filters and conn is not None:
            try:
                conn.unsubscribe(filters)
            except Exception as e:
                log.debug("unsubscribe after fetch: %s", e)

    def _roomy(self) -> list[_Fetch]:
        """Fetches whose meta came and fits this node: their memory is reserved now."""
        out = []
        for job in list(self._fetches.values()):
            if job.stage == "meta" and job.meta_error is not None:
                self._fail(job, job.meta_error)
                continue
            if job.stage != "room" or job.meta is None:
                continue
            size = job.meta.size
            limit = self.max_bytes()
            if size > limit:
                self._fail(
                    job,
                    ProtocolError(
                        Code.TOO_LARGE,
                        f"artifact {job.sha256[:12]} is {size / 2**20:.1f} MB; this node "
                        f"takes models of at most {limit / 2**20:.1f} MB (memory and "
                        "--max-model-mb)",
                    ),
                )
                continue
            try:
                self.store.check_room(size)
            except ProtocolError as e:
                self._fail(job, e)
                continue
            if self._reserved + size > limit and self._reserved > 0:
                continue  # waits until another fetch gives its memory back
            self._reserved += size
            job.reserved = size
            job.stage = "subscribing"
            out.append(job)
        return out

    def _late(self, now: float) -> list[tuple[_Fetch, ProtocolError]]:
        out = []
        for job in list(self._fetches.values()):
            waited = now - job.waiting_since
            if job.stage == "meta" and job.waiting_since and waited > self.meta_wait:
                out.append(
                    (
                        job,
                        ProtocolError(
                            Code.ARTIFACT_MISSING,
                            f"artifact {job.sha256}: no artifacts/{job.sha256[:12]}.../meta on "
                            f"the broker after {self.meta_wait:g} s (was the model uploaded? "
                            "`mqinfer deploy` uploads it)",
                        ),
                    )
                )
            elif job.stage == "chunks" and job.waiting_since and waited > self.chunk_wait:
                assert job.meta is not None
                missing = [i for i in range(job.meta.chunks) if i not in job.chunks]
                out.append(
                    (
                        job,
                        ProtocolError(
                            Code.BAD_ARTIFACT,
                            f"artifact {job.sha256[:12]}: chunks {missing[:10]} of "
                            f"{job.meta.chunks} are missing (none came for "
                            f"{self.chunk_wait:g} s; re-upload the model)",
                        ),
                    )
                )
        return out

    def _complete(self, job: _Fetch) -> None:
        if job.future.done():  # failed on the way
            return
        assert job.meta is not None
        data = b"".join(job.chunks[i] for i in range(job.meta.chunks))
        job.chunks.clear()
        try:
            path = self.store.put(job.sha256, job.fmt, data)
        except ProtocolError as e:
            with self._lock:
                self._finish(job)
            job.future.set_exception(e)
            return
        with self._lock:
            self._finish(job)
        job.future.set_result(path)

    def _abandon(self) -> None:
        for job in [*self._fetches.values(), *self._queue]:
            if not job.future.done():
                job.future.set_exception(ProtocolError(Code.INTERNAL, "the node is stopping"))
        self._fetches.clear()
        self._queue.clear()
