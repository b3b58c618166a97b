"""Commands a node accepts on nodes/{node}/cmd, answered on nodes/{node}/reply."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from mqinfer.client import Connection, Message, MQTTError
from node.serving import Replica
from protocol import codec
from protocol import messages as m
from protocol.errors import Code, ProtocolError

if TYPE_CHECKING:
    from node.agent import NodeAgent

log = logging.getLogger("mqinfer.node")

Handler = Callable[["NodeAgent", Connection, m.Command], dict[str, Any]]


def _ping(agent: NodeAgent, _conn: Connection, cmd: m.Command) -> dict[str, Any]:
    return {"pong": time.time(), "session": agent.session}


def _announce(agent: NodeAgent, conn: Connection, _cmd: m.Command) -> dict[str, Any]:
    """Re-publish caps and state (the coordinator asks when it has a gap)."""
    agent.announce(conn, wait=False)  # on the network thread: it cannot wait for its own PUBACK
    agent.publish_state(conn, "online")
    return {"session": agent.session}


def _deploy(agent: NodeAgent, conn: Connection, cmd: m.Command) -> dict[str, Any]:
    """Fetch the artifact, load and warm the model, subscribe, then answer 'ready'."""
    spec = _spec(cmd)
    stage = _stage(cmd, spec)
    slot = m.slot(spec.name, stage)
    ours = spec.for_stage(stage)
    with agent.provision_lock:
        current = agent.replicas.get(slot)
        if current is not None and current.update(spec):
            return {"service": spec.name, "stage": stage, "state": "ready", "already": True}
        if current is not None:
            _remove(agent, conn, slot)
        backend = agent.backends.get(spec.format)
        if backend is None:
            raise ProtocolError(
                Code.UNSUPPORTED_FORMAT,
                f"{ours.model} is {spec.format!r}; this node runs {sorted(agent.backends)}",
            )
        path = agent.store.get(conn, ours.artifact, spec.format, agent.fetch_timeout)
        replica = Replica(
            node_id=agent.node_id,
            spec=spec,
            path=path,
            backend=backend,
            topics=agent.topics,
            send=agent.send,
            max_request_bytes=agent.max_request_bytes,
            stage=stage,
            max_workers=agent.max_workers,
            artificial_slowdown=agent.artificial_slowdown,
        )
        detail = replica.load()
        agent.replicas[slot] = replica
        # Subscribed before the reply: once the coordinator lists us as ready, we see every
        # request the other replicas see ([T-SERVE-1]).
        conn.subscribe([(f, 1) for f in replica.filters()])
        replica.start()
    agent.announce(conn)  # the cache changed
    log.info("%s: serving %s (%s)", agent.name, slot, ours.model)
    return {"service": spec.name, "stage": stage, "state": "ready", **detail}


def _undeploy(agent: NodeAgent, conn: Connection, cmd: m.Command) -> dict[str, Any]:
    """args.service, and args.stage for one stage of a pipeline (else all of the service)."""
    name = cmd.args.get("service")
    if not isinstance(name, str):
        raise ProtocolError(Code.BAD_MESSAGE, "undeploy needs args.service (a service name)")
    stage = cmd.args.get("stage")
    if stage is not None and (not isinstance(stage, int) or isinstance(stage, bool)):
        raise ProtocolError(Code.BAD_MESSAGE, f"undeploy args.stage must be an int, not {stage!r}")
    with agent.provision_lock:
        if stage is None:
            slots = [s for s, r in agent.replicas.items() if r.name == name]
        else:
            slots = [m.slot(name, stage)]
        removed = [s for s in slots if _remove(agent, conn, s)]
    return {"service": name, "stage": stage, "removed": bool(removed), "slots": removed}


def _remove(agent: NodeAgent, conn: Connection, name: str) -> bool:
    replica = agent.replicas.pop(name, None)
    if replica is None:
        return False
    # Another stage of the same pipeline on this node may share a filter (the status).
    still = {f for r in list(agent.replicas.values()) for f in r.filters()}
    try:
        gone = [f for f in replica.filters() if f not in still]
        if gone:
            conn.unsubscribe(gone)
    except MQTTError as e:
        log.debug("unsubscribe %s: %s", name, e)
    replica.stop()
    log.info("%s: stopped serving %s", agent.name, name)
    return True


def _stage(cmd: m.Command, spec: m.ServiceSpec) -> int | None:
    stage = cmd.args.get("stage")
    if stage is None and not spec.stages:
        return None
    if not isinstance(stage, int) or isinstance(stage, bool) or not 0 <= stage < spec.stages:
        want = f"0-{spec.stages - 1}" if spec.stages else "none (not a pipeline)"
        raise ProtocolError(
            Code.BAD_MESSAGE, f"deploy args.stage is {stage!r}; {spec.name} takes {want}"
        )
    return stage


def _spec(cmd: m.Command) -> m.ServiceSpec:
    try:
        return m.ServiceSpec.model_validate(cmd.args.get("spec"))
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "spec"
        raise ProtocolError(Code.BAD_MESSAGE, f"deploy args.spec.{where}: {first['msg']}") from None


def _artificial_slowdown(agent: NodeAgent, conn: Connection, cmd: m.Command) -> dict[str, Any]:
    """For experiments only: make every model run on this node `factor` times slower from
    now on (1 restores full speed). Announced as `artificial_slowdown`, never as hardware."""
    factor = cmd.args.get("factor")
    if not isinstance(factor, int | float) or isinstance(factor, bool) or not 1 <= factor <= 100:
        raise ProtocolError(
            Code.BAD_MESSAGE, f"args.factor must be a number from 1 to 100, not {factor!r}"
        )
    agent.artificial_slowdown = float(factor)
    for replica in list(agent.replicas.values()):
        replica.artificial_slowdown = float(factor)
    agent.announce(conn, wait=False)
    return {"artificial_slowdown": float(factor)}


OPS: dict[str, Handler] = {
    "ping": _ping,
    "announce": _announce,
    "artificial_slowdown": _artificial_slowdown,
}
# Slow operations wait on the broker and on the runtime: each runs on its own thread and
# answers from there.
SLOW_OPS: dict[str, Handler] = {"deploy": _deploy, "undeploy": _undeploy}


class CommandHandler:
    """Runs on the MQTT network thread: operations must be quick and must not wait on the
    broker (a PUBACK is read by this same thread)."""

    def __init__(self, agent: NodeAgent) -> None:
        self.agent = agent

    def handle(self, conn: Connection, message: Message) -> None:
        """[T-CMD-2] every command gets exactly one reply: a result or an error."""
        cmd_id: str | None = None
        try:
            cmd = codec.decode_as(m.Command, message.payload)
            cmd_id = cmd.id
            slow = SLOW_OPS.get(cmd.op)
            if slow is not None:
                threading.Thread(
                    target=self._run, args=(conn, cmd, slow), name=f"cmd-{cmd.op}", daemon=True
                ).start()
                return
            op = OPS.get(cmd.op)
            if op is None:
                raise ProtocolError(
                    Code.UNKNOWN_COMMAND,
                    f"unknown op {cmd.op!r}; this node accepts {sorted([*OPS, *SLOW_OPS])}",
                )
            reply = self._ok(cmd, op(self.agent, conn, cmd))
        except ProtocolError as e:
            reply = self._error(cmd_id or _peek_id(message.payload), e)
        self._send(conn, reply)

    def _run(self, conn: Connection, cmd: m.Command, op: Handler) -> None:
        try:
            reply = self._ok(cmd, op(self.agent, conn, cmd))
        except ProtocolError as e:
            reply = self._error(cmd.id, e)
        except MQTTError as e:
            reply = self._error(cmd.id, ProtocolError(Code.INTERNAL, f"broker: {e}"))
        except Exception as e:  # [T-CMD-2] still exactly one reply
            log.exception("%s: %s failed", self.agent.name, cmd.op)
            reply = self._error(cmd.id, ProtocolError(Code.INTERNAL, f"{type(e).__name__}: {e}"))
        try:
            self._send(conn, reply)
        except MQTTError as e:
            log.warning("%s: reply to %s lost: %s", self.agent.name, cmd.op, e)

    def _ok(self, cmd: m.Command, result: dict[str, Any]) -> m.CommandReply:
        return m.CommandReply(node=self.agent.node_id, id=cmd.id, ok=True, result=result)

    def _error(self, cmd_id: str | None, e: ProtocolError) -> m.CommandReply:
        log.warning("%s: command failed: %s", self.agent.name, e)
        return m.CommandReply(
            node=self.agent.node_id,
            id=cmd_id,
            ok=False,
            error=m.ErrorInfo(code=e.code, message=e.message),
        )

    def _send(self, conn: Connection, reply: m.CommandReply) -> None:
        conn.publish(self.agent.topics.node_reply(self.agent.node_id), codec.encode(reply))


def _peek_id(payload: bytes) -> str | None:
    """The command id of a command that failed validation, if one can be read."""
    try:
        data = codec.load_json(payload)
    except ProtocolError:
        return None
    value = data.get("id") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None
