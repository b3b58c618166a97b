"""Provisioning: turn retained service specs into replicas on nodes. Pure logic, no I/O.

The coordinator feeds specs, command replies and the registry in, calls `step` on every
tick, and carries out the actions it returns (commands to nodes, retained statuses). The
desired state lives in the retained specs and the placement in the retained statuses, so a
restarted coordinator picks up where the last one stopped ([T-COORD-4]).
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from mqinfer.coordinator import placement
from mqinfer.coordinator.registry import NodeRecord, Registry
from mqinfer.protocol import messages as m

log = logging.getLogger("mqinfer.coordinator")

DEPLOY_TIMEOUT = 120.0  # seconds for a node to fetch, load and warm a model
UNDEPLOY_TIMEOUT = 20.0
DEPLOY_ATTEMPTS = 2
RECONCILE_EVERY = 10.0  # seconds between undeploys of the same stray service on a node
# A deploy that failed for a reason that can pass (the model's meta had not reached the
# node's broker yet, a full disk, a busy node, no answer) is tried again on that node after
# RETRY_FAILED_S, doubling each time up to RETRY_FAILED_MAX_S; one refused for what the
# node or the model is (format, runtime, signature, a model that does not load) is not.
RETRY_FAILED_S = 30.0
RETRY_FAILED_MAX_S = 600.0
PASSING = frozenset({"artifact_missing", "bad_artifact", "storage_failed", "busy", "internal"})


@dataclass
class Replica:
    node: str
    state: m.ReplicaState
    session: int | None = None  # node session it was deployed to
    spec: m.ServiceSpec | None = None  # the spec it was sent
    cmd_id: str | None = None
    sent: float = 0.0
    attempts: int = 0
    ready_wall: float = 0.0  # wall clock when it became ready (compared with heartbeats)
    reason: str | None = None
    runtime: str | None = None  # what it serves with, as the deploy reply said


@dataclass
class Service:
    """One slot of a service: the whole model, or one stage of a pipeline ('name:k')."""

    name: str  # the slot
    service: str = ""  # the service's name
    stage: int | None = None
    spec: m.ServiceSpec | None = None  # the whole spec (a stage deploys its segment)
    replicas: dict[str, Replica] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # node -> why deploy failed there
    # node -> (when a deploy that failed for a passing reason may be tried again, times)
    retry: dict[str, tuple[float, int]] = field(default_factory=dict)
    removing: dict[str, Replica] = field(default_factory=dict)  # undeploys in flight
    adopted: bool = False


@dataclass(frozen=True)
class SendCommand:
    node: str
    command: m.Command


@dataclass(frozen=True)
class PublishStatus:
    name: str
    status: m.ServiceStatus | None  # None clears the retained status


Action = SendCommand | PublishStatus


class Provisioner:
    def __init__(self, grace: float = 1.0) -> None:
        self.services: dict[str, Service] = {}  # by slot
        self.published: dict[str, dict[str, Any]] = {}  # service -> its last status
        self.restored: dict[str, m.ServiceStatus] = {}  # retained statuses, before adoption
        self.costs: dict[str, dict[str, float]] = {}  # artifact -> node -> measured run ms
        self._by_cmd: dict[str, tuple[str, str]] = {}  # cmd id -> (service, node)
        self._stray: dict[tuple[str, str, int], float] = {}  # (node, service, session) -> sent
        self._start: float | None = None
        self.grace = grace  # seconds to read retained state before acting
        self.acting = False  # the grace is over: statuses are ours to publish
        self.rejected: dict[str, str] = {}  # service -> why its spec could not be read

    def _slots(self, name: str) -> list[Service]:
        return [svc for svc in self.services.values() if svc.service == name]

    # ---- input --------------------------------------------------------------------------

    def reject(self, name: str, why: str) -> None:
        """A spec that could not be read: nothing of it runs, and its status says why."""
        self.on_spec(name, None)
        self.rejected[name] = why

    def on_spec(self, name: str, spec: m.ServiceSpec | None) -> None:
        """A spec (None: removed). A pipeline spec has one slot per stage ([T-PIPE-1])."""
        self.rejected.pop(name, None)
        wanted: list[int | None] = []
        if spec is not None:
            wanted = list(range(spec.stages)) if spec.stages else [None]
        for old in self._slots(name):
            if old.stage not in wanted:
                old.spec = None  # torn down by the next step
        for stage in wanted:
            key = m.slot(name, stage)
            svc = self.services.get(key) or Service(key, name, stage)
            self.services[key] = svc
            if spec is not None and svc.spec is not None and spec != svc.spec:
                svc.failed.clear()  # a new spec gets a new chance everywhere
                svc.retry.clear()
            svc.spec = spec

    def on_status(self, name: str, status: m.ServiceStatus | None) -> None:
        """A retained status read back: adopted once, if nothing is known of the service."""
        known = name in self.published or any(svc.replicas for svc in self._slots(name))
        if status is not None and not known:
            self.restored[name] = status

    def on_reply(self, reply: m.CommandReply, now: float) -> None:
        target = self._by_cmd.pop(reply.id or "", None)
        if target is None:
            return
        name, node = target
        svc = self.services.get(name)
        if svc is None:
            return
        gone = svc.removing.get(node)
        if gone is not None and gone.cmd_id == reply.id:
            del svc.removing[node]
            return
        rep = svc.replicas.get(node)
        if rep is None or rep.cmd_id != reply.id:
            return
        if reply.ok:
            rep.state, rep.reason, rep.ready_wall = "ready", None, time.time()
            svc.retry.pop(node, None)
            in_place = reply.result.get("already") is True
            runtime = m.runtime_name(reply.result.get("runtime"))
            rep.runtime = runtime or (rep.runtime if in_place else None)
            log.info("service %s: replica on %s ready", name, node)
        else:
            why = f"{reply.error.code}: {reply.error.message}" if reply.error else "failed"
            log.warning("service %s: deploy on %s failed: %s", name, node, why)
            _fail(
                svc, node, why, now, passing=reply.error is not None and reply.error.code in PASSING
            )
            del svc.replicas[node]

    # ---- decisions ----------------------------------------------------------------------

    def step(self, registry: Registry, now: float) -> list[Action]:
        if self._start is None:
            self._start = now
        if now - self._start < self.grace:
            return []
        self.acting = True
        actions: list[Action] = []
        self._remember_costs(registry)
        statuses: dict[str, list[m.ServiceStatus]] = {}
        for key in list(self.services):
            svc = self.services[key]
            done, status = self._step_service(svc, registry, now)
            actions += done
            if status is not None:
                statuses.setdefault(svc.service, []).append(status)
        names = {svc.service for svc in self.services.values()} | set(self.rejected)
        for name in sorted(names | set(self.published) | set(self.restored)):
            actions += self._publish(name, statuses.get(name), now)
        actions += self._reconcile(registry, now)
        return actions

    def _remember_costs(self, registry: Registry) -> None:
        """What each node measured running each model, kept after the replica is gone so a
        later placement of the same model can prefer the nodes that ran it fastest."""
        for svc in self.services.values():
            if svc.spec is None:
                continue
            artifact = svc.spec.for_stage(svc.stage).artifact
            for node in svc.replicas:
                rec = registry.nodes.get(node)
                beat = rec.heartbeat if rec else None
                stats = beat.stats.get(svc.name) if beat else None
                if stats is not None and stats.inference_ms:
                    self.costs.setdefault(artifact, {})[node] = stats.inference_ms

    def _publish(
        self, name: str, statuses: list[m.ServiceStatus] | None, now: float
    ) -> list[Action]:
        """One retained status per service, merged from its slots."""
        actions: list[Action] = []
        why = self.rejected.get(name)
        if why is not None and not statuses:
            self.restored.pop(name, None)
            failed = m.ServiceStatus(name=name, state="failed", reason=why, ts=time.time())
            dumped = failed.model_dump(exclude={"ts"})
            if dumped != self.published.get(name):
                self.published[name] = dumped
                actions.append(PublishStatus(name, failed))
            return actions
        if statuses:
            self.restored.pop(name, None)  # every slot has had its chance to adopt
            status = _merge(statuses)
            dumped = status.model_dump(exclude={"ts"})
            if dumped != self.published.get(name):
                self.published[name] = dumped
                actions.append(PublishStatus(name, status))
            return actions
        restored = self.restored.pop(name, None)
        if restored is not None and restored.state != "removed" and name not in self.published:
            # undeployed while no coordinator ran: its retained status still says ready
            self.published[name] = restored.model_dump(exclude={"ts"})
        published = self.published.get(name)
        if published is not None and published.get("state") != "removed":
            removed = m.ServiceStatus(name=name, state="removed", ts=time.time())
            self.published[name] = removed.model_dump(exclude={"ts"})
            actions.append(PublishStatus(name, removed))
        if not self._slots(name) and name in self.published:
            actions.append(PublishStatus(name, None))
            del self.published[name]
        return actions

    def _command(self, svc: Service, node: str, op: str, args: dict[str, Any]) -> m.Command:
        cmd = m.Command(id=uuid.uuid4().hex, op=op, args=args)
        self._by_cmd[cmd.id] = (svc.name, node)
        return cmd

    def _deploy(
        self, svc: Service, rep: Replica, registry: Registry, now: float, in_place: bool = False
    ) -> Action:
        assert svc.spec is not None
        rec = registry.nodes.get(rep.node)
        spec = svc.spec.model_dump(mode="json", exclude_none=True)
        args: dict[str, Any] = {"spec": spec}
        if svc.stage is not None:
            args["stage"] = svc.stage
        cmd = self._command(svc, rep.node, "deploy", args)
        rep.state = "ready" if in_place else "deploying"
        if not in_place:
            rep.runtime = None  # reloaded: the node may measure another runtime faster
        rep.cmd_id, rep.sent, rep.spec = cmd.id, now, svc.spec
        rep.session = rec.session if rec else None
        rep.attempts += 1
        return SendCommand(rep.node, cmd)

    def _undeploy(self, svc: Service, rep: Replica, now: float) -> Action:
        cmd = self._command(svc, rep.node, "undeploy", _undeploy_args(svc.name))
        rep.state, rep.cmd_id, rep.sent = "removing", cmd.id, now
        svc.removing[rep.node] = rep
        return SendCommand(rep.node, cmd)

    def _adopt(self, svc: Service, registry: Registry) -> None:
        """Take over the placement a previous coordinator published."""
        svc.adopted = True
        status = self.restored.get(svc.service)
        if status is None or svc.spec is None or status.artifact != svc.spec.artifact:
            return
        if status.stages != svc.spec.stages:
            return
        for r in status.replicas:
            rec = registry.nodes.get(r.node)
            if r.stage != svc.stage:
                continue
            if r.state == "ready" and rec is not None and rec.state == "online":
                svc.replicas[r.node] = Replica(
                    r.node,
                    "ready",
                    rec.session,
                    svc.spec,
                    ready_wall=time.time(),
                    runtime=r.runtime,
                )
        log.info("service %s: adopted replicas on %s", svc.name, sorted(svc.replicas))

    def _step_service(
        self, svc: Service, registry: Registry, now: float
    ) -> tuple[list[Action], m.ServiceStatus | None]:
        actions: list[Action] = []
        for node, rep in list(svc.removing.items()):
            rec = registry.nodes.get(node)
            if now - rep.sent > UNDEPLOY_TIMEOUT or rec is None or rec.state != "online":
                del svc.removing[node]
        spec = svc.spec
        if spec is None:
            for rep in list(svc.replicas.values()):
                rec = registry.nodes.get(rep.node)
                if rec is not None and rec.state == "online":
                    actions.append(self._undeploy(svc, rep, now))
            svc.replicas.clear()
            if not svc.removing:
                del self.services[svc.name]
            return actions, None
        if not svc.adopted:
            self._adopt(svc, registry)

        for node, rep in list(svc.replicas.items()):
            rec = registry.nodes.get(node)
            if rec is None or rec.state != "online":
                gone = rec.state if rec else "unknown"
                level = logging.INFO if gone == "offline" else logging.WARNING
                log.log(level, "service %s: replica on %s gone (node %s)", svc.name, node, gone)
                del svc.replicas[node]
                continue
            unfit = placement.why_unfit(spec.for_stage(svc.stage), rec)
            if unfit is not None and rec.caps is not None:
                # [T-COORD-6] the spec changed to ask what this node is not: moved.
                log.info("service %s: moving the replica off %s (%s)", svc.name, node, unfit)
                del svc.replicas[node]
                actions.append(self._undeploy(svc, rep, now))
                continue
            if rep.spec != spec:
                # A ready replica takes a spec that needs no reload in place, and keeps serving.
                in_place = (
                    rep.state == "ready"
                    and rep.spec is not None
                    and not m.needs_reload(rep.spec, spec)
                )
                rep.attempts = 0
                actions.append(self._deploy(svc, rep, registry, now, in_place))
            elif rep.state == "deploying" and now - rep.sent > DEPLOY_TIMEOUT:
                if rep.attempts >= DEPLOY_ATTEMPTS:
                    why = f"no answer to deploy within {DEPLOY_TIMEOUT:.0f} s"
                    _fail(svc, node, why, now, passing=True)
                    del svc.replicas[node]
                else:
                    actions.append(self._deploy(svc, rep, registry, now))
            elif rep.state == "ready" and not _still_serving(rep, rec, svc.name):
                log.warning("service %s: %s restarted without it; deploying again", svc.name, node)
                rep.attempts = 0
                actions.append(self._deploy(svc, rep, registry, now))

        for node, (when, _times) in list(svc.retry.items()):
            if now >= when and node in svc.failed:
                log.info("service %s: trying %s again (%s)", svc.name, node, svc.failed[node])
                del svc.failed[node]
        active = list(svc.replicas.values())
        if len(active) < spec.replicas:
            exclude = {n: "has a replica" for n in svc.replicas}
            exclude.update({n: f"failed: {why}" for n, why in svc.failed.items()})
            # Stages of one pipeline go to different nodes where they can, to run in parallel.
            avoid = {n for s in self._slots(svc.service) if s is not svc for n in s.replicas}
            ours = spec.for_stage(svc.stage)
            found = placement.place(
                ours,
                registry.nodes,
                spec.replicas - len(active),
                exclude,
                avoid,
                self.costs.get(ours.artifact),
            )
            for node in found.chosen:
                rep = svc.replicas[node] = Replica(node, "deploying")
                actions.append(self._deploy(svc, rep, registry, now))
                log.info("service %s: placing a replica on %s", svc.name, node)
            refused = found.refused
        else:
            refused = {}
            # The surplus goes: replicas not ready first, then the slowest measured.
            cost = self.costs.get(spec.for_stage(svc.stage).artifact, {})
            extra = sorted(
                active, key=lambda r: (r.state == "ready", -cost.get(r.node, 0.0), r.node)
            )
            for rep in extra[: len(active) - spec.replicas]:
                del svc.replicas[rep.node]
                actions.append(self._undeploy(svc, rep, now))

        return actions, _status(svc, spec, refused)

    def _reconcile(self, registry: Registry, now: float) -> list[Action]:
        """[T-COORD-5] a node that runs a service it was not given is told to stop."""
        actions: list[Action] = []
        for rec in registry.nodes.values():
            beat = rec.heartbeat
            if rec.state != "online" or beat is None or beat.session != rec.session:
                continue
            for name in beat.services:
                svc = self.services.get(name)
                if svc is not None and (rec.id in svc.replicas or rec.id in svc.removing):
                    continue
                if svc is not None and not svc.adopted:
                    continue  # not adopted yet
                key = (rec.id, name, beat.session)
                if now - self._stray.get(key, -1e9) < RECONCILE_EVERY:
                    continue
                self._stray[key] = now
                log.info("node %s runs %s, which it was not given; undeploying", rec.id, name)
                cmd = m.Command(id=uuid.uuid4().hex, op="undeploy", args=_undeploy_args(name))
                actions.append(SendCommand(rec.id, cmd))
        return actions


def _still_serving(rep: Replica, rec: NodeRecord, name: str) -> bool:
    """False when a heartbeat of the node's current session, sent after the replica became
    ready, does not list the service (the node restarted and lost it)."""
    beat = rec.heartbeat
    if beat is None or beat.session != rec.session:
        return True
    if beat.ts <= rep.ready_wall + 1.0:
        return True
    return name in beat.services


def _undeploy_args(slot: str) -> dict[str, Any]:
    name, stage = m.parse_slot(slot)
    return {"service": name} if stage is None else {"service": name, "stage": stage}


def _merge(statuses: list[m.ServiceStatus]) -> m.ServiceStatus:
    """A pipeline's status from its stages': it serves only when every stage does."""
    if len(statuses) == 1 and not statuses[0].stages:
        return statuses[0]
    statuses = sorted(statuses, key=lambda s: m.parse_slot(s.name)[1] or 0)  # stage order
    first = statuses[0]
    states = [s.state for s in statuses]
    if "failed" in states:
        state = "failed"
    elif "deploying" in states:
        state = "deploying"
    elif "degraded" in states:
        state = "degraded"
    else:
        state = "ready"
    reasons = [f"{s.name}: {s.reason}" for s in statuses if s.reason]
    return first.model_copy(
        update={
            "name": m.parse_slot(first.name)[0],
            "state": state,
            "reason": "; ".join(reasons) or None,
            "replicas": [r for s in statuses for r in s.replicas],
        }
    )


def _status(svc: Service, spec: m.ServiceSpec, refused: dict[str, str]) -> m.ServiceStatus:
    stage = svc.stage
    replicas = [
        m.ReplicaStatus(
            node=r.node,
            state=r.state,
            reason=r.reason,
            stage=stage,
            runtime=r.runtime,
        )
        for r in sorted(svc.replicas.values(), key=lambda r: r.node)
    ]
    replicas += [
        m.ReplicaStatus(node=node, state="failed", reason=why, stage=stage)
        for node, why in sorted(svc.failed.items())
        if node not in svc.replicas
    ]
    ready = sum(r.state == "ready" for r in svc.replicas.values())
    deploying = sum(r.state == "deploying" for r in svc.replicas.values())
    want = spec.replicas
    reason: str | None = None
    if ready >= want:
        state = "ready"
    elif ready == 0 and deploying:
        state = "deploying"
    elif ready == 0:
        state = "failed"
        reason = _why(want, svc.failed, refused)
    else:
        state = "degraded"
        reason = f"{ready} of {want} replicas ready" + (
            "" if deploying else f"; {_why(want - ready, svc.failed, refused)}"
        )
    return m.ServiceStatus(
        name=svc.name,  # the slot: _merge names the service
        state=state,
        reason=reason,
        replicas=replicas,
        want=want,
        stages=spec.stages,
        artifact=spec.artifact,
        revision=spec.revision,
        ts=time.time(),
    )


def _why(missing: int, failed: dict[str, str], refused: dict[str, str]) -> str:
    reasons = {n: w for n, w in refused.items() if w != "has a replica"}
    reasons.update({n: f"failed: {w}" for n, w in failed.items()})
    if not reasons:
        return f"no node to place {missing} more replica(s) on"
    listed = "; ".join(f"{n}: {w}" for n, w in sorted(reasons.items()))
    return f"no node can take {missing} more replica(s): {listed}"


def _fail(svc: Service, node: str, why: str, now: float, passing: bool) -> None:
    """A deploy on `node` failed: no replica goes there again for this spec, unless the
    reason can pass (`passing`); then it is tried again later, later each time."""
    svc.failed[node] = why
    if passing:
        _, times = svc.retry.get(node, (0.0, 0))
        delay = min(RETRY_FAILED_S * 2**times, RETRY_FAILED_MAX_S)
        svc.retry[node] = (now + delay, times + 1)
