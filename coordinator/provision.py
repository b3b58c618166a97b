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

from coordinator import placement
from coordinator.registry import NodeRecord, Registry
from protocol import messages as m

log = logging.getLogger("mqinfer.coordinator")

DEPLOY_TIMEOUT = 120.0  # seconds for a node to fetch, load and warm a model
UNDEPLOY_TIMEOUT = 20.0
DEPLOY_ATTEMPTS = 2
RECONCILE_EVERY = 10.0  # seconds between undeploys of the same stray service on a node


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


@dataclass
class Service:
    name: str
    spec: m.ServiceSpec | None = None
    replicas: dict[str, Replica] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # node -> why deploy failed there
    restored: m.ServiceStatus | None = None  # retained status, before adoption
    published: dict[str, Any] | None = None
    removing: dict[str, Replica] = field(default_factory=dict)  # undeploys in flight


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
        self.services: dict[str, Service] = {}
        self._by_cmd: dict[str, tuple[str, str]] = {}  # cmd id -> (service, node)
        self._stray: dict[tuple[str, str, int], float] = {}  # (node, service, session) -> sent
        self._start: float | None = None
        self.grace = grace  # seconds to read retained state before acting

    def _service(self, name: str) -> Service:
        svc = self.services.get(name)
        if svc is None:
            svc = self.services[name] = Service(name)
        return svc

    # ---- input --------------------------------------------------------------------------

    def on_spec(self, name: str, spec: m.ServiceSpec | None) -> None:
        svc = self._service(name)
        if spec is not None and svc.spec is not None and spec != svc.spec:
            svc.failed.clear()  # a new spec gets a new chance everywhere
        svc.spec = spec

    def on_status(self, name: str, status: m.ServiceStatus | None) -> None:
        """A retained status read back: adopted once, if nothing is known of the service."""
        svc = self._service(name)
        if status is not None and not svc.replicas and svc.published is None:
            svc.restored = status

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
            log.info("service %s: replica on %s ready", name, node)
        else:
            why = f"{reply.error.code}: {reply.error.message}" if reply.error else "failed"
            log.warning("service %s: deploy on %s failed: %s", name, node, why)
            svc.failed[node] = why
            del svc.replicas[node]

    # ---- decisions ----------------------------------------------------------------------

    def step(self, registry: Registry, now: float) -> list[Action]:
        if self._start is None:
            self._start = now
        if now - self._start < self.grace:
            return []
        actions: list[Action] = []
        for name in list(self.services):
            actions += self._step_service(self.services[name], registry, now)
        actions += self._reconcile(registry, now)
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
        cmd = self._command(svc, rep.node, "deploy", {"spec": spec})
        rep.state = "ready" if in_place else "deploying"
        rep.cmd_id, rep.sent, rep.spec = cmd.id, now, svc.spec
        rep.session = rec.session if rec else None
        rep.attempts += 1
        return SendCommand(rep.node, cmd)

    def _undeploy(self, svc: Service, rep: Replica, now: float) -> Action:
        cmd = self._command(svc, rep.node, "undeploy", {"service": svc.name})
        rep.state, rep.cmd_id, rep.sent = "removing", cmd.id, now
        svc.removing[rep.node] = rep
        return SendCommand(rep.node, cmd)

    def _adopt(self, svc: Service, registry: Registry) -> None:
        """Take over the placement a previous coordinator published."""
        status, svc.restored = svc.restored, None
        if status is None or svc.spec is None or status.artifact != svc.spec.artifact:
            return
        for r in status.replicas:
            rec = registry.nodes.get(r.node)
            if r.state == "ready" and rec is not None and rec.state == "online":
                svc.replicas[r.node] = Replica(
                    r.node, "ready", rec.session, svc.spec, ready_wall=time.time()
                )
        log.info("service %s: adopted replicas on %s", svc.name, sorted(svc.replicas))

    def _step_service(self, svc: Service, registry: Registry, now: float) -> list[Action]:
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
            if svc.restored is not None and svc.restored.state != "removed":
                # undeployed while no coordinator ran: its retained status still says ready
                svc.published, svc.restored = svc.restored.model_dump(exclude={"ts"}), None
            if svc.published is not None and svc.published.get("state") != "removed":
                removed = m.ServiceStatus(name=svc.name, state="removed", ts=time.time())
                svc.published = removed.model_dump(exclude={"ts"})
                actions.append(PublishStatus(svc.name, removed))
            if not svc.removing:
                if svc.published is not None:
                    actions.append(PublishStatus(svc.name, None))
                del self.services[svc.name]
            return actions
        if svc.restored is not None:
            self._adopt(svc, registry)

        for node, rep in list(svc.replicas.items()):
            rec = registry.nodes.get(node)
            if rec is None or rec.state != "online":
                gone = rec.state if rec else "unknown"
                level = logging.INFO if gone == "offline" else logging.WARNING
                log.log(level, "service %s: replica on %s gone (node %s)", svc.name, node, gone)
                del svc.replicas[node]
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
                    svc.failed[node] = f"no answer to deploy within {DEPLOY_TIMEOUT:.0f} s"
                    del svc.replicas[node]
                else:
                    actions.append(self._deploy(svc, rep, registry, now))
            elif rep.state == "ready" and not _still_serving(rep, rec, svc.name):
                log.warning("service %s: %s restarted without it; deploying again", svc.name, node)
                rep.attempts = 0
                actions.append(self._deploy(svc, rep, registry, now))

        active = list(svc.replicas.values())
        if len(active) < spec.replicas:
            exclude = {n: "has a replica" for n in svc.replicas}
            exclude.update({n: f"failed: {why}" for n, why in svc.failed.items()})
            found = placement.place(spec, registry.nodes, spec.replicas - len(active), exclude)
            for node in found.chosen:
                rep = svc.replicas[node] = Replica(node, "deploying")
                actions.append(self._deploy(svc, rep, registry, now))
                log.info("service %s: placing a replica on %s", svc.name, node)
            refused = found.refused
        else:
            refused = {}
            extra = sorted(active, key=lambda r: (r.state == "ready", r.node))
            for rep in extra[: len(active) - spec.replicas]:
                del svc.replicas[rep.node]
                actions.append(self._undeploy(svc, rep, now))

        status = _status(svc, spec, refused)
        dumped = status.model_dump(exclude={"ts"})
        if dumped != svc.published:
            svc.published = dumped
            actions.append(PublishStatus(svc.name, status))
        return actions

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
                if svc is not None and svc.restored is not None:
                    continue  # not adopted yet
                key = (rec.id, name, beat.session)
                if now - self._stray.get(key, -1e9) < RECONCILE_EVERY:
                    continue
                self._stray[key] = now
                log.info("node %s runs %s, which it was not given; undeploying", rec.id, name)
                cmd = m.Command(id=uuid.uuid4().hex, op="undeploy", args={"service": name})
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


def _status(svc: Service, spec: m.ServiceSpec, refused: dict[str, str]) -> m.ServiceStatus:
    replicas = [
        m.ReplicaStatus(node=r.node, state=r.state, reason=r.reason)
        for r in sorted(svc.replicas.values(), key=lambda r: r.node)
    ]
    replicas += [
        m.ReplicaStatus(node=node, state="failed", reason=why)
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
        name=svc.name,
        state=state,
        reason=reason,
        replicas=replicas,
        want=want,
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
