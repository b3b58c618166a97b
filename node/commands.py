"""Commands a node accepts on nodes/{node}/cmd, answered on nodes/{node}/reply."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mqinfer.client import Connection, Message
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


OPS: dict[str, Handler] = {"ping": _ping, "announce": _announce}


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
            op = OPS.get(cmd.op)
            if op is None:
                raise ProtocolError(
                    Code.UNKNOWN_COMMAND,
                    f"unknown op {cmd.op!r}; this node accepts {sorted(OPS)}",
                )
            reply = m.CommandReply(
                node=self.agent.node_id, id=cmd_id, ok=True, result=op(self.agent, conn, cmd)
            )
        except ProtocolError as e:
            log.warning("%s: bad command: %s", self.agent.name, e)
            reply = m.CommandReply(
                node=self.agent.node_id,
                id=cmd_id or _peek_id(message.payload),
                ok=False,
                error=m.ErrorInfo(code=e.code, message=e.message),
            )
        conn.publish(self.agent.topics.node_reply(self.agent.node_id), codec.encode(reply))


def _peek_id(payload: bytes) -> str | None:
    """The command id of a command that failed validation, if one can be read."""
    try:
        data = codec.load_json(payload)
    except ProtocolError:
        return None
    value = data.get("id") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None
