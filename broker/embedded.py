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
    """Keep amqtt's log about refused connections to one line each, and MQTT 5 quiet.

    amqtt logs every refused CONNECT twice at WARNING: "Invalid connection from ..." and
    then "Failed to initialize client session: <reason>". The first adds nothing. An
    MQTT 5 CONNECT is refused by design and mqinfer clients then retry with 3.1.1, so
    that refusal is logged at INFO.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if text.startswith("Invalid connection from"):
            return False
        if text.startswith("Failed to initialize client session: Invalid protocol") and (
            text.endswith(": 5")
        ):
            record.levelno, record.levelname = logging.INFO, "INFO"
            return logging.getLogger(record.name).isEnabledFor(logging.INFO)
        return True


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
