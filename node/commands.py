"""Commands a node accepts on nodes/{node}/cmd, answered on nodes/{node}/reply."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mqinfer.mqtt import Connection, Message, MQTTError, NotConnected
from mqinfer.protocol import codec
from mqinfer.protocol import messages as m
from mqinfer.protocol.errors import Code, ProtocolError

if TYPE_CHECKING:
    from mqinfer.node.agent import NodeAgent

log = logging.getLogger("mqinfer.node")

Handler = Callable[["NodeAgent", Connection, m.Command], dict[str, Any]]


def _ping(agent: NodeAgent, _conn: Connection, cmd: m.Command) -> dict[str, Any]:
    return {"pong": time.time(), "session": agent.session}


def _announce(agent: NodeAgent, conn: Connection, _cmd: m.Command) -> dict[str, Any]:
    """Re-publish caps and state (the coordinator asks when it has a gap)."""
    agent.announce(conn, wait=False)  # on the network thread: it cannot wait for its own PUBACK
    agent.publish_state(conn, "online")
    return {"session": agent.session}


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
# Slow operations wait on the broker and on the runtime: node.provisioning queues them and
# answers when they are done.
SLOW_OPS = ("deploy", "undeploy")


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
            if cmd.op in SLOW_OPS:
                self.agent.provisioning.submit(cmd)  # answered when done
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

    def finished(self, cmd: m.Command, outcome: dict[str, Any] | ProtocolError) -> None:
        """The one reply to a provisioning command (provisioning thread)."""
        if isinstance(outcome, ProtocolError):
            reply = self._error(cmd.id, outcome)
        else:
            reply = self._ok(cmd, outcome)
        conn = self.agent.connection()
        try:
            if conn is None:
                raise NotConnected("no connection")
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
