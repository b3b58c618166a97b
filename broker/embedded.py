"""Embedded MQTT broker (amqtt) for demos and single-host setups.

``mqinfer broker`` runs an in-process amqtt broker with one plain TCP listener,
anonymous access and nothing else: no websocket listener, no ``$SYS`` topics,
no persistence (retained messages and sessions live in memory only and are
gone after a restart).

It is anonymous-only on purpose, and it is not meant for production:

* amqtt delivers retained messages to new subscribers without running its
  topic ACL checks, so ACLs on it would not protect retained state
  (capabilities, service specs, node state);
* it has no shared subscriptions (``$share/...``);
* it speaks MQTT 3.1.1 only; MQTT 5 clients are refused at CONNECT;
* sessions of anonymous clients are not kept, so ``clean_session=False``
  gets no offline queueing (mqinfer clients use clean sessions anyway).

Production deployments use Mosquitto with password and ACL files, see
``deploy/mosquitto/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from collections.abc import Callable, Iterator
from typing import Any

from amqtt.broker import Broker

from mqinfer.broker.ports import port_is_free

log = logging.getLogger(__name__)

HANDSHAKE_SETTLE = 0.2  # seconds
SHUTDOWN_TIMEOUT = 5.0  # seconds
READY_LINE = "mqinfer broker: listening on mqtt://{hostport} (embedded amqtt, MQTT 3.1.1 only)"


class PortInUse(Exception):
    """The TCP port the broker should listen on is already taken."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        local = host in ("", "0.0.0.0", "::")
        target = f"mqtt://{'127.0.0.1' if local else _url_host(host)}:{port}"
        super().__init__(
            f"port {port} on {host or 'all interfaces'} is already in use (another MQTT broker?): "
            f"pick another with --port, or point nodes at that broker with --broker {target}"
        )


def _url_host(host: str) -> str:
    """Host part of a URL: IPv6 literals get brackets, the wildcard becomes 0.0.0.0."""
    if not host:
        return "0.0.0.0"
    return f"[{host}]" if ":" in host else host


def broker_config(host: str, port: int) -> dict[str, Any]:
    """amqtt 0.12 configuration: one TCP listener, anonymous clients, no other plugins.

    Passing an explicit ``plugins`` mapping replaces amqtt's defaults, which
    would add the ``$SYS`` publisher and the packet/event logger plugins, and
    avoids the deprecated entry-point plugin loading. amqtt splits ``bind`` on
    the last colon, so IPv6 literals are given without brackets.
    """
    return {
        "listeners": {
            "default": {"type": "tcp", "bind": f"{host}:{port}", "max_connections": 0},
        },
        "plugins": {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
        },
    }


ExceptionHandler = Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object]


CONNECT_HEAD_WAIT = 10.0  # seconds for a new connection's first bytes
# CONNACK, remaining length 3: no session present, reason 0x84, no properties.
MQTT5_REFUSAL = b"\x20\x03\x00\x84\x00"


async def _connect_head(reader: asyncio.StreamReader) -> bytes:
    """The first bytes of a connection, up to a CONNECT's protocol level (fewer for a
    first packet that is not a CONNECT)."""
    head = await reader.readexactly(1)
    if head[0] >> 4 != 1:  # not CONNECT: amqtt says what is wrong
        return head
    for _ in range(4):  # the remaining length, 1-4 bytes
        byte = await reader.readexactly(1)
        head += byte
        if not byte[0] & 0x80:
            break
    size = await reader.readexactly(2)
    name_length = int.from_bytes(size, "big")
    if name_length > 6:  # "MQTT" or "MQIsdp": anything longer is amqtt's to refuse
        return head + size
    return head + size + await reader.readexactly(name_length + 1)


def _protocol_level(head: bytes) -> int | None:
    """The protocol level of a CONNECT read by `_connect_head`; None if not there."""
    if len(head) < 5 or head[0] >> 4 != 1:
        return None
    i = 1
    while head[i] & 0x80:
        i += 1
    name_length = int.from_bytes(head[i + 1 : i + 3], "big")
    at = i + 3 + name_length
    return head[at] if len(head) > at else None


class _Snapshots(dict[str, Any]):
    """amqtt's table of subscriptions, iterated over a copy.

    amqtt 0.12.1 walks this table with `await`s inside the loop (when a client connects,
    and for every message it broadcasts); a subscription made by another client meanwhile
    changes its size, the walk raises, and the client being served loses its connection.
    """

    def __iter__(self) -> Iterator[str]:
        return iter(list(super().keys()))

    def items(self) -> Any:
        return list(super().items())


class _Broker(Broker):  # type: ignore[misc]
    """amqtt's broker with two faults mended (see `serve`)."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self._subscriptions = _Snapshots(self._subscriptions)  # type: ignore[has-type]

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        # amqtt answers an MQTT 5 CONNECT with a 3.1.1 CONNACK, which MQTT 5 clients cannot
        # read: mosquitto_pub -V 5 and Node-RED set to MQTT 5 waited forever, nothing
        # logged. An MQTT 5 CONNECT gets an MQTT 5 CONNACK, reason 0x84 (unsupported
        # protocol version), and the connection is closed; anything else goes to amqtt
        # with the bytes read put back.
        try:
            head = await asyncio.wait_for(_connect_head(reader), CONNECT_HEAD_WAIT)
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            writer.close()
            return
        level = _protocol_level(head)
        if level == 5:
            peer = writer.get_extra_info("peername")
            log.info("refused an MQTT 5 client %s: this broker speaks MQTT 3.1.1 only", peer)
            with contextlib.suppress(ConnectionError):
                writer.write(MQTT5_REFUSAL)
                await writer.drain()
            writer.close()
            return
        reader._buffer[0:0] = head  # type: ignore[attr-defined]  # amqtt reads it again
        await super().stream_connected(reader, writer, listener_name)

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Any
    ) -> None:
        # amqtt 0.12.1 also calls this when any client connects, once for every filter
        # any client holds: a new client got every retained message others subscribed
        # to (every model's chunks). Only a filter this client holds brings it messages.
        holders = self._subscriptions.get(subscription[0], [])
        if any(held.client_id == session.client_id for held, _qos in holders):
            await super()._publish_retained_messages_for_subscription(subscription, session)


def _quiet_disconnect_races(previous: ExceptionHandler | None) -> ExceptionHandler:
    """Loop exception handler: one log line instead of a traceback for peer-closed sockets.

    amqtt answers a refused CONNECT (e.g. MQTT 5) and then half-closes the
    socket; if the client has already hung up, that raises ``OSError`` in the
    connection callback, which asyncio would print with a full traceback.
    Everything else goes to ``previous`` (or asyncio's default handler).
    """

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and "client_connected_cb" in str(context.get("message")):
            log.info("client connection closed while the broker was closing it: %s", exc)
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    return handler


def _is_addr_in_use(exc: BaseException) -> bool:
    """True if ``exc`` or one of its causes is an "address already in use" error."""
    cur: BaseException | None = exc
    while cur is not None:
        if isinstance(cur, OSError) and cur.errno == errno.EADDRINUSE:
            return True
        cur = cur.__cause__
    return False


async def _shutdown(broker: Broker) -> None:
    """``broker.shutdown()``, guarded against an amqtt 0.12.1 hang.

    A client whose CONNECT is being processed gets a reader task that shutdown
    may cancel before it has run; shutdown then waits forever for an event only
    that task would set. So handshakes already in progress get a moment to
    finish first, and the wait is bounded anyway.
    """
    await asyncio.sleep(HANDSHAKE_SETTLE)
    try:
        await asyncio.wait_for(broker.shutdown(), SHUTDOWN_TIMEOUT)
    except TimeoutError:
        log.warning(
            "embedded broker did not shut down within %.0f s, stopping anyway", SHUTDOWN_TIMEOUT
        )


class _ExpectedRefusals(logging.Filter):
    """Keep amqtt's log about refused connections to one line each.

    amqtt logs every refused CONNECT twice at WARNING: "Invalid connection from ..." and
    then "Failed to initialize client session: <reason>". The first adds nothing. (MQTT 5
    CONNECTs never reach amqtt: `_Broker.stream_connected` refuses them, at INFO.)
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Invalid connection from")


async def serve(host: str, port: int, stop: asyncio.Event) -> None:
    """Run the embedded broker on ``host:port`` until ``stop`` is set.

    Prints one ready line to stdout once the listener accepts connections.
    Raises ``PortInUse`` if the port is already taken.
    """
    if not port_is_free(host, port):
        raise PortInUse(host, port)

    amqtt_log = logging.getLogger("amqtt.broker")
    refusals = _ExpectedRefusals()
    amqtt_log.addFilter(refusals)
    loop = asyncio.get_running_loop()
    previous_handler = loop.get_exception_handler()
    loop.set_exception_handler(_quiet_disconnect_races(previous_handler))
    try:
        broker = _Broker(broker_config(host, port))
        try:
            await broker.start()
        except Exception as exc:
            if _is_addr_in_use(exc):  # lost a race for the port after the check above
                raise PortInUse(host, port) from None
            raise
        try:
            print(READY_LINE.format(hostport=f"{_url_host(host)}:{port}"), flush=True)
            await stop.wait()
        finally:
            log.info("stopping embedded broker")
            await _shutdown(broker)
    finally:
        loop.set_exception_handler(previous_handler)
        amqtt_log.removeFilter(refusals)
