"""The dispatcher: each request to exactly one replica, by what the hub measures. Pure logic.

The hub (coordinator.hub) feeds it requests, nodes' answers, the ready replicas and the time,
and carries out what it returns: work to one node, a result to the requester, the broker's
acknowledgement of the request. Nothing here waits or does I/O.

- **One copy per request.** A request goes to one replica as work on that node's own topic;
  a pipeline's tensors go back to the hub and on to one replica of the next stage.
- **Leases.** Each piece of work is a lease, named by a job token. Only the answer of the
  current lease counts: an answer of an expired or revoked lease, or from another node, is
  dropped (fenced), so a request is answered once whatever nodes do. Work is given to
  another replica only when its lease expires or its node's session ends.
- **Bounded, measured dispatch.** A replica takes at most its workers plus a prefetch of
  work; the rest waits here, first come first served. Work goes where it will finish first,
  by the time per job the hub itself measured for each replica (what a node reports of
  itself is a first guess until then, never more). A replica whose lease expired
  unanswered gets no more work until it answers again.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Literal

from mqinfer.protocol import messages as m
from mqinfer.protocol import work as w
from mqinfer.protocol.errors import Code
from mqinfer.protocol.payload import result_json

DEFAULT_JOB_MS = 10.0  # assumed time per job of a replica nothing is known of
LEASE_MIN_MS = 2000.0  # no lease is shorter: a busy node is not a dead one
LEASE_FACTOR = 5.0  # a lease is this many times the time the work should take
PREFETCH_MAX = 8
EWMA = 0.2  # weight of the newest measurement
ZOMBIE_S = 60.0  # an expired lease its node never answers is forgotten after this
MAX_HELD_BYTES = 512 * 2**20  # requests and tensors held at the hub, over all services
WAITING_MAX = 10_000  # requests held while the dispatcher starts
REPEAT_S = 60.0  # how long after its result (or the last repeat) a repeat gets it again
# ... after an error answer: a transport's second copy of the request (a QoS 1 retry, a
# cluster delivering twice) comes within seconds and must not be served after the error;
# a sender who wants a new try after that sends it with a new id, or waits.
ERROR_REPEAT_S = 10.0
REPEATS_MAX = 50_000  # requests remembered to tell a repeat from a new request
REPEAT_BYTES = 32 * 2**20  # results kept for repeats, over all services


@dataclass(frozen=True)
class SendWork:
    node: str
    payload: bytes


@dataclass(frozen=True)
class Reply:
    topic: str
    payload: bytes
    correlation: bytes | None = None


@dataclass(frozen=True)
class Ack:
    mid: int  # the broker's packet id of the request (0: QoS 0, nothing to acknowledge)


Action = SendWork | Reply | Ack


@dataclass(frozen=True)
class Incoming:
    """A request as it reached the hub."""

    service: str
    payload: bytes
    reply: str  # where its result goes ([T-SERVE-3])
    correlation: bytes | None
    request_id: str  # [T-REQ-2], as far as the hub can tell without reading the body
    id_fixed: bool  # the id came from the topic or the correlation data
    mid: int = 0
    refused: str = ""  # why the response topic was not used ([T-SERVE-5]): answered so


@dataclass(frozen=True)
class ReadyReplica:
    """A replica the provisioner has seen ready."""

    node: str
    session: int  # the node's session it was deployed to
    workers: int = 1
    reported_ms: float | None = None  # what the node says a request costs it


@dataclass(eq=False)
class _Request:
    n: int
    incoming: Incoming
    mid: int  # the broker's packet id, to acknowledge when answered (0: nothing to)
    arrived: float
    deadline: float
    stage: int | None
    body: bytes
    kind: Literal["request", "tensors"] = "request"
    trace: list[w.StageTrace] = field(default_factory=list)
    job: _Job | None = None
    attempts: int = 0
    key: bytes | None = None  # to tell a repeat of it ([T-REQ-4]); None: it has no id


@dataclass
class _Taken:
    """A request with an id of its own, remembered: being served (no result yet) or
    answered with `result` (an error result unless `ok`), until `until`."""

    until: float
    result: bytes | None = None
    ok: bool = False


@dataclass(eq=False)
class _Job:
    token: str
    request: _Request
    slot: str
    node: str
    session: int
    sent: float
    expires: float
    ahead: float  # work per worker at the replica when sent, this one included
    expired: bool = False


@dataclass(eq=False)
class _Replica:
    node: str
    session: int
    workers: int
    reported_ms: float | None = None
    jobs: dict[str, _Job] = field(default_factory=dict)
    est_ms: float | None = None  # measured time per job, transfer included
    overhead_ms: float | None = None  # measured time a job spends off the node
    suspect: bool = False  # a lease expired unanswered: no work until it answers again
    served: int = 0
    fenced: int = 0

    @property
    def job_ms(self) -> float:
        return self.est_ms or self.reported_ms or DEFAULT_JOB_MS

    @property
    def prefetch(self) -> int:
        """Work beyond its workers that keeps it busy while answers travel."""
        if not self.overhead_ms or not self.est_ms:
            return 1
        return max(1, min(PREFETCH_MAX, math.ceil(self.overhead_ms / self.est_ms)))

    @property
    def capacity(self) -> int:
        return self.workers + self.prefetch

    def finish_ms(self, extra: int = 1) -> float:
        """When `extra` more work given now would be done: per worker, after what it has."""
        return max(1.0, (len(self.jobs) + extra) / self.workers) * self.job_ms


@dataclass(eq=False)
class _Slot:
    name: str  # the service, or 'name:k' for stage k
    replicas: dict[str, _Replica] = field(default_factory=dict)
    queue: deque[_Request] = field(default_factory=deque)


# Upper bounds (seconds) of the latency histogram of each service (`mqinfer coordinator --http`).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
NO_SERVICE = "(none)"  # requests for a service that is not deployed are counted under this
MAX_COUNTED = 1000  # services counted one by one; any more are counted under NO_SERVICE
CODES = frozenset({*(c.value for c in Code), "error"})  # error codes counted by name


@dataclass
class ServiceCounters:
    """What one service's requests came to: answered, errors by code, and the time from
    reaching the hub to the answer of those a replica answered (non-cumulative buckets;
    the last counts those slower than every bound)."""

    answered: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0


@dataclass
class Counters:
    accepted: int = 0
    answered: int = 0
    fenced: int = 0  # answers dropped: their lease was not current
    redispatched: int = 0
    repeats: int = 0  # requests that repeated one being served or answered ([T-REQ-4])
    errors: dict[str, int] = field(default_factory=dict)
    services: dict[str, ServiceCounters] = field(default_factory=dict)

    def answer(self, service: str, code: str | None, seconds: float | None = None) -> None:
        """A request was answered (code: its error, None when ok), `seconds` after it came."""
        self.answered += 1
        if code is not None:
            code = code if code in CODES else "other"  # a node's code is any short string
            self.errors[code] = self.errors.get(code, 0) + 1
        s = self.services.get(service)
        if s is None:
            if len(self.services) >= MAX_COUNTED:
                service = NO_SERVICE
            s = self.services.setdefault(service, ServiceCounters())
        s.answered += 1
        if code is not None:
            s.errors[code] = s.errors.get(code, 0) + 1
        if seconds is not None:
            seconds = max(0.0, seconds)
            s.latency_sum += seconds
            s.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1


class Dispatcher:
    def __init__(
        self,
        epoch: str,
        max_request_bytes: int = 16 * 2**20,
        max_held_bytes: int = MAX_HELD_BYTES,
    ) -> None:
        """`epoch` makes this dispatcher's job tokens its own (a coordinator's id and
        session): a token of an earlier dispatcher is never current here."""
        self.epoch = epoch
        self.max_request_bytes = max_request_bytes
        self.max_held_bytes = max_held_bytes
        self.specs: dict[str, m.ServiceSpec] = {}
        self.slots: dict[str, _Slot] = {}
        self.jobs: dict[str, _Job] = {}
        self.requests: dict[int, _Request] = {}
        self.counters = Counters()
        self.held = 0
        self._n = 0
        self.opened = False  # until the provisioner has read the retained state
        self._waiting: deque[tuple[Incoming, float]] = deque()
        self._taken: dict[bytes, _Taken] = {}  # insertion ordered, bounded
        self._taken_bytes = 0

    def open(self, now: float) -> list[Action]:
        """Specs and replicas are known: take the requests that came before."""
        self.opened = True
        out: list[Action] = []
        while self._waiting:
            incoming, arrived = self._waiting.popleft()
            out += self.on_request(incoming, now, arrived)
        return out

    def forget_acks(self) -> None:
        """The broker lost our session: the requests held need no acknowledgement."""
        for req in self.requests.values():
            req.mid = 0
        self._waiting = deque((replace(i, mid=0), t) for i, t in self._waiting)

    # ---- what the provisioner knows -----------------------------------------------------

    def set_spec(self, name: str, spec: m.ServiceSpec | None, now: float) -> list[Action]:
        if spec is None:
            self.specs.pop(name, None)
        else:
            self.specs[name] = spec
        out: list[Action] = []
        wanted = (
            {m.slot(name, k) for k in range(spec.stages)}
            if spec and spec.stages
            else ({name} if spec else set())
        )
        for slot in [s for s in self.slots if m.parse_slot(s)[0] == name and s not in wanted]:
            out += self.set_ready(slot, [], now)
            gone = self.slots.pop(slot)
            while gone.queue:  # the service was removed or changed shape under them
                out += self._error(
                    gone.queue.popleft(), Code.UNAVAILABLE, f"{slot} was undeployed meanwhile", now
                )
        return out

    def set_ready(self, slot: str, ready: list[ReadyReplica], now: float) -> list[Action]:
        """The ready replicas of a slot. One that left (or whose node began a new session)
        gives its work to the others at once: its answers no longer count."""
        s = self.slots.get(slot)
        if s is None:
            s = self.slots[slot] = _Slot(slot)
        out: list[Action] = []
        keep = {r.node: r for r in ready}
        for node, rep in list(s.replicas.items()):
            new = keep.get(node)
            if new is None or new.session != rep.session:
                out += self._drop_replica(s, rep, now)
        for r in ready:
            have = s.replicas.get(r.node)
            if have is None:
                s.replicas[r.node] = _Replica(r.node, r.session, max(1, r.workers), r.reported_ms)
            else:
                have.workers, have.reported_ms = max(1, r.workers), r.reported_ms
        return out + self._pump(s, now)

    def _drop_replica(self, s: _Slot, rep: _Replica, now: float) -> list[Action]:
        del s.replicas[rep.node]
        requeue = []
        for job in list(rep.jobs.values()):
            self.jobs.pop(job.token, None)
            if job.request.job is job:
                job.request.job = None
                requeue.append(job.request)
        rep.jobs.clear()
        for req in reversed(requeue):  # ahead of the queue: they waited longest
            self.counters.redispatched += 1
            s.queue.appendleft(req)
        return []

    # ---- requests -----------------------------------------------------------------------

    def on_request(
        self, incoming: Incoming, now: float, arrived: float | None = None
    ) -> list[Action]:
        key = _repeat_key(incoming)
        taken = self._taken.get(key) if key is not None else None
        if key is not None and taken is not None and taken.until > now:
            # The same request again: most often the sender's QoS 1 retry after its
            # PUBACK was lost (the broker restarted, its link dropped), or a cluster's
            # second delivery. It is not served twice: the answer of the first copy goes
            # (went) to the same place.
            self.counters.repeats += 1
            if taken.result is None:
                return [Ack(incoming.mid)]
            if taken.ok:  # a sender still asking has not had it yet
                self._remember(key, replace(taken, until=now + REPEAT_S), now)
            return [Reply(incoming.reply, taken.result, incoming.correlation), Ack(incoming.mid)]
        if not self.opened:
            if len(self._waiting) >= WAITING_MAX:
                why = "the dispatcher is starting; retry"
                return self._refuse(incoming, key, now, Code.BUSY, why)
            self._waiting.append((incoming, now))
            return []
        if incoming.refused:
            return self._refuse(incoming, key, now, Code.BAD_TOPIC, incoming.refused)
        self.counters.accepted += 1
        spec = self.specs.get(incoming.service)
        if spec is None:
            known = ", ".join(sorted(self.specs)) or "none"
            return self._refuse(
                incoming,
                key,
                now,
                Code.UNAVAILABLE,
                f"no service named {incoming.service} is deployed (services: {known})",
            )
        if len(incoming.payload) > self.max_request_bytes:
            return self._refuse(
                incoming,
                key,
                now,
                Code.TOO_LARGE,
                f"request is {len(incoming.payload)} bytes; at most {self.max_request_bytes} "
                "are accepted",
            )
        head = m.slot(incoming.service, 0 if spec.stages else None)
        missing = self._missing(incoming.service, spec)
        if missing:
            return self._refuse(incoming, key, now, Code.UNAVAILABLE, missing)
        s = self.slots[head]
        room = spec.queue * max(1, len(s.replicas))
        if len(s.queue) >= room or self.held + len(incoming.payload) > self.max_held_bytes:
            return self._refuse(
                incoming,
                key,
                now,
                Code.BUSY,
                f"{incoming.service} has {len(s.queue)} requests waiting for a replica "
                f"(queue {spec.queue} per replica, {len(s.replicas)} ready); retry later",
            )
        self._n += 1
        start = now if arrived is None else arrived
        req = _Request(
            n=self._n,
            incoming=incoming,
            mid=incoming.mid,
            arrived=start,
            deadline=start + spec.deadline_ms / 1000,
            stage=0 if spec.stages else None,
            body=incoming.payload,
            key=key,
        )
        if key is not None:
            self._remember(key, _Taken(until=req.deadline + LEASE_MIN_MS / 1000), now)
        self.requests[req.n] = req
        self.held += len(req.body)
        s.queue.append(req)
        return self._pump(s, now)

    def _remember(self, key: bytes, taken: _Taken, now: float) -> None:
        """Keep `taken` under `key` (newest last); forget what expired, and the oldest
        beyond the bounds."""
        self._forget_key(key)
        self._taken[key] = taken
        if taken.result is not None:
            self._taken_bytes += len(taken.result)
        while self._taken:
            first = next(iter(self._taken))
            over = len(self._taken) > REPEATS_MAX or self._taken_bytes > REPEAT_BYTES
            if not over and self._taken[first].until > now:
                break
            self._forget_key(first)

    def _forget_key(self, key: bytes) -> None:
        old = self._taken.pop(key, None)
        if old is not None and old.result is not None:
            self._taken_bytes -= len(old.result)

    def _missing(self, service: str, spec: m.ServiceSpec) -> str | None:
        """Why the service cannot take requests now (no ready replica of a stage)."""
        stages = [None] if not spec.stages else list(range(spec.stages))
        empty = [k for k in stages if not self._ready(m.slot(service, k))]
        if not empty:
            return None
        if spec.stages:
            which = ", ".join(str(k) for k in empty)
            return f"service {service} has no ready replica for stage(s) {which}"
        return f"service {service} has no ready replica"

    def _ready(self, slot: str) -> bool:
        s = self.slots.get(slot)
        return s is not None and bool(s.replicas)

    def _refuse(
        self, incoming: Incoming, key: bytes | None, now: float, code: Code, message: str
    ) -> list[Action]:
        """Answer a request the hub does not take with an error; a repeat of it gets the
        same answer for ERROR_REPEAT_S."""
        known = incoming.service in self.specs
        self.counters.answer(incoming.service if known else NO_SERVICE, code.value)
        payload = result_json(
            request_id=incoming.request_id,
            service=incoming.service,
            node=None,
            ok=False,
            error=(code.value, message),
        )
        if key is not None:
            self._remember(key, _Taken(until=now + ERROR_REPEAT_S, result=payload), now)
        return [Reply(incoming.reply, payload, incoming.correlation), Ack(incoming.mid)]

    def _finish(
        self, req: _Request, reply: Reply | None, now: float, ok: bool = False
    ) -> list[Action]:
        """The request is answered (or answered with an error): forget it. Its answer is
        kept a while for repeats of the request: REPEAT_S, or ERROR_REPEAT_S after an error
        (a repeat after that is a new try)."""
        self.requests.pop(req.n, None)
        self.held -= len(req.body)
        req.job = None
        if req.key is not None:
            if reply is not None:
                keep = REPEAT_S if ok else ERROR_REPEAT_S
                self._remember(req.key, _Taken(now + keep, reply.payload, ok), now)
            else:
                self._forget_key(req.key)
        out: list[Action] = [reply] if reply is not None else []
        return [*out, Ack(req.mid)]

    def _error(self, req: _Request, code: Code, message: str, now: float) -> list[Action]:
        i = req.incoming
        self.counters.answer(i.service, code.value)
        payload = result_json(
            request_id=i.request_id,
            service=i.service,
            node=None,
            ok=False,
            error=(code.value, message),
        )
        return self._finish(req, Reply(i.reply, payload, i.correlation), now)

    # ---- giving out work ---------------------------------------------------------------------

    def _pump(self, s: _Slot, now: float) -> list[Action]:
        """Give queued work to replicas with room, best first; time out what waited too
        long."""
        out: list[Action] = []
        while s.queue:
            req = s.queue[0]
            if now >= req.deadline:
                s.queue.popleft()
                out += self._timeout(req, now)
                continue
            rep = self._best(s)
            if rep is None:
                # Every replica is busy, or none is ready now (one is being placed again):
                # it waits, until its deadline at most.
                break
            s.queue.popleft()
            out.append(self._give(s, rep, req, now))
        return out

    def _best(self, s: _Slot) -> _Replica | None:
        free = [r for r in s.replicas.values() if not r.suspect and len(r.jobs) < r.capacity]
        if not free:
            return None
        return min(free, key=lambda r: (r.finish_ms(), len(r.jobs), r.node))

    def _give(self, s: _Slot, rep: _Replica, req: _Request, now: float) -> SendWork:
        self._n += 1
        token = f"{self.epoch}-{self._n:x}"
        finish = rep.finish_ms()
        left_ms = (req.deadline - now) * 1000
        lease_ms = min(left_ms, max(LEASE_MIN_MS, LEASE_FACTOR * finish))
        job = _Job(
            token=token,
            request=req,
            slot=s.name,
            node=rep.node,
            session=rep.session,
            sent=now,
            expires=now + lease_ms / 1000,
            ahead=max(1.0, (len(rep.jobs) + 1) / rep.workers),
        )
        rep.jobs[token] = job
        self.jobs[token] = job
        req.job = job
        req.attempts += 1
        i = req.incoming
        header = w.Work(
            job=token,
            service=i.service,
            stage=req.stage,
            kind=req.kind,
            lease_ms=round(lease_ms, 3),
            deadline_ms=round(max(left_ms, 0.0), 3),
            age_ms=round((now - req.arrived) * 1000, 3),
            request_id=i.request_id,
            id_fixed=i.id_fixed,
            trace=req.trace,
        )
        return SendWork(rep.node, w.encode_work(header, req.body))

    def _timeout(self, req: _Request, now: float) -> list[Action]:
        spec = self.specs.get(req.incoming.service)
        limit = spec.deadline_ms if spec else 0
        if req.attempts:
            why = (
                f"no replica answered within the deadline of {limit} ms "
                f"({req.attempts} lease(s) given, none answered in time)"
            )
        else:
            waited = (now - req.arrived) * 1000
            why = f"waited {waited:.0f} ms for a free replica; the deadline is {limit} ms"
        return self._error(req, Code.TIMEOUT, why, now)

    # ---- answers ---------------------------------------------------------------------------

    def on_answer(self, node: str, answer: w.Answer, body: bytes, now: float) -> list[Action]:
        """An answer on nodes/{node}/answer. Only the current lease's counts."""
        job = self.jobs.get(answer.job)
        if job is None or job.node != node:
            self.counters.fenced += 1
            return []
        del self.jobs[answer.job]
        s = self.slots.get(job.slot)
        rep = s.replicas.get(node) if s else None
        if rep is not None and rep.jobs.pop(job.token, None) is not None:
            rep.suspect = False
            if answer.kind != "released":
                self._measure(rep, job, answer, now)
        req = job.request
        out: list[Action] = []
        if req.job is not job:  # expired and given to another meanwhile: too late
            self.counters.fenced += 1
            if rep is not None:
                rep.fenced += 1
            return self._pump(s, now) if s is not None else []
        req.job = None
        if answer.kind == "result":
            if rep is not None:
                rep.served += 1
            i = req.incoming
            code = None if answer.ok else (answer.code or "error")
            self.counters.answer(i.service, code, now - req.arrived)
            out += self._finish(req, Reply(i.reply, body, i.correlation), now, ok=answer.ok)
        elif answer.kind == "tensors":
            if rep is not None:
                rep.served += 1
            out += self._next_stage(req, answer, body, now)
        else:  # released: the node did not do it; someone else may
            if s is not None:
                s.queue.appendleft(req)
                self.counters.redispatched += 1
        if s is not None:
            out += self._pump(s, now)
        return out

    def _measure(self, rep: _Replica, job: _Job, answer: w.Answer, now: float) -> None:
        rtt = (now - job.sent) * 1000
        per_job = rtt / job.ahead
        rep.est_ms = per_job if rep.est_ms is None else (1 - EWMA) * rep.est_ms + EWMA * per_job
        if answer.node_ms is not None and job.ahead <= 1.0:
            off = max(0.0, rtt - answer.node_ms)
            rep.overhead_ms = (
                off if rep.overhead_ms is None else ((1 - EWMA) * rep.overhead_ms + EWMA * off)
            )

    def _next_stage(self, req: _Request, answer: w.Answer, body: bytes, now: float) -> list[Action]:
        spec = self.specs.get(req.incoming.service)
        stage = (req.stage or 0) + 1
        if spec is None or stage >= spec.stages:
            why = f"stage {stage - 1} passed tensors on, but there is no stage {stage}"
            return self._error(req, Code.BAD_TENSOR, why, now)
        self.held += len(body) - len(req.body)
        req.body, req.kind, req.stage = body, "tensors", stage
        if answer.trace is not None:
            req.trace.append(answer.trace)
        s = self.slots.get(m.slot(req.incoming.service, stage))
        if s is None or not s.replicas:
            return self._error(
                req,
                Code.UNAVAILABLE,
                f"service {req.incoming.service} has no ready replica for stage {stage}",
                now,
            )
        s.queue.appendleft(req)  # already waited its turn at the stages before
        return self._pump(s, now)

    # ---- time -----------------------------------------------------------------------------

    def tick(self, now: float) -> list[Action]:
        """Leases that expired go to another replica; requests past their deadline get
        `timeout`; expired leases never answered are forgotten after a while."""
        out: list[Action] = []
        touched: set[str] = set()
        for job in list(self.jobs.values()):
            if job.expired:
                if now - job.expires > ZOMBIE_S:
                    self._forget(job)
                continue
            if now < job.expires:
                continue
            job.expired = True
            s = self.slots.get(job.slot)
            rep = s.replicas.get(job.node) if s else None
            if rep is not None:
                rep.suspect = True
            req = job.request
            if req.job is job:
                req.job = None
                self.counters.redispatched += 1
                if s is not None:
                    s.queue.appendleft(req)
                    touched.add(s.name)
        for name in touched | set(self.slots):
            s = self.slots.get(name)
            if s is not None and s.queue:
                out += self._pump(s, now)
        return out

    def _forget(self, job: _Job) -> None:
        self.jobs.pop(job.token, None)
        s = self.slots.get(job.slot)
        rep = s.replicas.get(job.node) if s else None
        if rep is not None:
            rep.jobs.pop(job.token, None)

    # ---- what it is doing ---------------------------------------------------------------------

    def figures(self) -> dict[str, object]:
        """For the coordinator's heartbeat and `mqinfer status`."""
        slots: dict[str, object] = {}
        for name, s in sorted(self.slots.items()):
            slots[name] = {
                "queued": len(s.queue),
                "replicas": {
                    r.node: {
                        "inflight": len(r.jobs),
                        "capacity": r.capacity,
                        "job_ms": round(r.job_ms, 3),
                        "measured": r.est_ms is not None,
                        "served": r.served,
                        "fenced": r.fenced,
                        "suspect": r.suspect,
                    }
                    for r in sorted(s.replicas.values(), key=lambda r: r.node)
                },
            }
        c = self.counters
        return {
            "accepted": c.accepted,
            "answered": c.answered,
            "fenced": c.fenced,
            "redispatched": c.redispatched,
            "repeats": c.repeats,
            "errors": dict(sorted(c.errors.items())),
            "held_mb": round(self.held / 2**20, 3),
            "slots": slots,
        }


def _repeat_key(incoming: Incoming) -> bytes | None:
    """What makes a request a repeat of another ([T-REQ-4]): the same service, id of its
    own (from the topic or the correlation data), reply topic, correlation data and bytes.
    None for a request without an id of its own: identical frames a sensor sends to
    `request` are separate requests."""
    if not incoming.id_fixed:
        return None
    h = hashlib.blake2b(digest_size=16)
    for part in (
        incoming.service.encode(),
        incoming.request_id.encode(),
        incoming.reply.encode(),
        incoming.correlation or b"",
    ):
        h.update(len(part).to_bytes(4, "big"))
        h.update(part)
    h.update(incoming.payload)
    return h.digest()


def epoch_of(coordinator_id: str, session: int) -> str:
    """A short token prefix unique to one coordinator session."""
    tag = hashlib.blake2b(coordinator_id.encode(), digest_size=3).hexdigest()
    return f"{session:x}{tag}"
