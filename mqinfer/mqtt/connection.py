"""One MQTT connection (paho-mqtt 2.x, public API only) with the habits every mqinfer
component needs.

- TCP_NODELAY on the socket (without it a QoS 1 round trip on loopback is ~88 ms, not ~0.6 ms).
- MQTT 5 when the broker speaks it, MQTT 3.1.1 otherwise (the embedded amqtt broker).
- Several broker URLs (members of a clustered broker): each is tried in turn.
- The network loop is ours: paho's external-loop calls (`loop_read`, `loop_write`,
  `loop_misc`) in a thread of this connection, around a select() that a small socket pair of
  ours can wake. Every call into paho, from any thread, holds one lock, so a publish from a
  worker thread is written at once and never interleaves with the network thread's writes.
- Connecting, subscribing and publishing raise a specific error; nothing is dropped
  silently while disconnected: a plain connection raises NotConnected, a persistent one
  (a session the broker keeps) queues QoS 1 messages in paho and sends them on reconnect.
- A lost connection ends the network thread. A plain connection is then done (the session
  loop makes a new one, with a new Will and session number); a persistent one can be
  reopened, keeping its session on the broker and its unacknowledged messages.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from mqinfer.mqtt.url import Brokers, BrokerURL, TLSFileError

log = logging.getLogger("mqinfer.mqtt")


class MQTTError(Exception):
    """Base of the connection errors."""


class ConnectError(MQTTError):
    """The broker could not be reached or refused for a reason worth retrying."""


class AuthRefused(MQTTError):
    """The broker refused the credentials or the authorisation: retrying will not help."""


class NotConnected(MQTTError):
    """A publish or subscribe was attempted without a live connection."""


class SubscribeRefused(MQTTError):
    """The broker refused some filters of a SUBSCRIBE (an ACL, or a clustered broker that
    could not set the subscription up in time)."""

    def __init__(self, message: str, refused: list[str]) -> None:
        super().__init__(message)
        self.refused = refused


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class Persistence:
    """A session the broker keeps while this client is away (MQTT 5 session expiry; a
    3.1.1 clean-session-false session), so QoS 1 messages wait for it there."""

    expiry: int = 3600  # seconds the broker keeps the session after a disconnect (MQTT 5)
    receive_maximum: int = 65535  # unacknowledged QoS 1 messages the broker may send us


@dataclass(frozen=True)
class Message:
    """A received message, decoupled from paho's types."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    response_topic: str | None = None
    correlation_data: bytes | None = None
    mid: int = 0  # the broker's packet id (QoS 1): what a manual acknowledgement names
    dup: bool = False  # a redelivery by the broker of a message not acknowledged before


# CONNACK reason codes that no retry can fix (3.1.1: 4, 5; MQTT 5: 134, 135, 138, 140).
_FATAL = {"Bad user name or password", "Not authorized", "Banned", "Bad authentication method"}
_VERSION_REFUSED = {"Unsupported protocol version"}

PROTOCOLS = {"5": mqtt.MQTTv5, "3.1.1": mqtt.MQTTv311}
LOOP_TIMEOUT = 0.5  # seconds the network thread sleeps in select() when nothing happens
# Times a refused subscription is asked again, a second apart: a NATS cluster refuses a
# QoS 1 subscription it could not set up within 4 s, as it does under load.
SUBSCRIBE_RETRIES = 10


class Connection:
    """A paho client driven by a network thread of its own."""

    def __init__(
        self,
        urls: Brokers,
        client_id: str,
        on_message: Callable[[Message], None],
        will: Will | None = None,
        protocol: str = "auto",
        keepalive: int = 30,
        persistence: Persistence | None = None,
        manual_ack: bool = False,
        on_connect: Callable[[bool], None] | None = None,
    ) -> None:
        """`on_connect(session_present)` runs on the network thread when the broker accepts
        a connection, before any message that connection brings."""
        if protocol not in ("auto", *PROTOCOLS):
            raise ValueError(f"protocol must be auto, 5 or 3.1.1; got {protocol!r}")
        self.urls = [urls] if isinstance(urls, BrokerURL) else list(urls)
        if not self.urls:
            raise ValueError("no broker URL")
        self.url = self.urls[0]  # the one connected to (or tried last)
        self.client_id = client_id
        self.keepalive = keepalive
        self.persistence = persistence
        self.manual_ack = manual_ack
        self._on_message = on_message
        self._on_connect = on_connect
        self._will = will
        self._protocol = protocol
        self.version: str | None = None  # negotiated: "5" or "3.1.1"
        self.session_present = False  # the broker still had our session (persistent only)
        self.taken_over = False  # the broker closed us for another client with our id
        self._client: mqtt.Client | None = None
        self._io = threading.RLock()  # held around every call into paho
        self._connack = threading.Event()
        self._connack_rc: ReasonCode | None = None
        self._lost = threading.Event()
        self._lost.set()
        self._closing = False
        self._acks: dict[int, tuple[threading.Event, list[Any]]] = {}
        self._acks_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._waker: tuple[socket.socket, socket.socket] | None = None  # of the network thread
        self._tls: mqtt.Client | None = None  # the client TLS was set up on
        self._socket_error: str | None = None  # why the socket failed before CONNACK

    def set_will(self, will: Will | None) -> None:
        """The Will of the next connection (a persistent connection names its session)."""
        self._will = will
        if self._client is not None:
            with self._io:
                self._client.will_clear()
                if will is not None:
                    self._client.will_set(will.topic, will.payload, will.qos, will.retain)

    # ---- connecting -------------------------------------------------------------

    def open(self, timeout: float = 10.0) -> None:
        """Connect to the first URL that answers, with MQTT 5 when the broker speaks it
        and protocol is auto. Refused credentials are final; other failures try the next."""
        errors: list[str] = []
        for url in self._order():
            self.url = url
            try:
                self._open_url(timeout)
                return
            except AuthRefused:
                raise
            except MQTTError as e:
                errors.append(str(e))
        raise ConnectError("; ".join(errors))

    def _order(self) -> list[BrokerURL]:
        """The URL that worked last first, then the others in the order given."""
        i = self.urls.index(self.url) if self.url in self.urls else 0
        return self.urls[i:] + self.urls[:i]

    def _open_url(self, timeout: float) -> None:
        if self.version is not None or self._protocol != "auto":
            self._open_version(self.version or self._protocol, timeout)
            return
        if self._will is not None:
            # A broker that only speaks 3.1.1 (amqtt) misreads an MQTT 5 CONNECT that
            # carries a Will and never answers; a CONNECT without one it refuses at once.
            probe = Connection(self.url, self.client_id + "-probe", lambda _m: None)
            try:
                probe._open_version("5", timeout)
                probe.close()
                version = "5"
            except _VersionRefused:
                version = "3.1.1"
            self._open_version(version, timeout)
            return
        try:
            self._open_version("5", timeout)
        except _VersionRefused:
            self._open_version("3.1.1", timeout)

    def _open_version(self, version: str, timeout: float) -> None:
        try:
            self._open(version, timeout)
        except _VersionRefused as e:
            if version == "5" and self._protocol == "auto":
                raise
            raise ConnectError(f"{self.url} refused MQTT {version}: {e}") from None
        self.version = version

    def _make_client(self, version: str) -> mqtt.Client:
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=PROTOCOLS[version],
            clean_session=(self.persistence is None) if version == "3.1.1" else None,
            manual_ack=self.manual_ack,
        )
        paho_log = logging.getLogger("mqinfer.paho")
        if paho_log.isEnabledFor(logging.DEBUG):
            client.enable_logger(paho_log)
        if self._will is not None:
            w = self._will
            client.will_set(w.topic, w.payload, w.qos, w.retain)
        client.on_socket_open = _nodelay
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_subscribe = self._handle_subscribe
        client.max_inflight_messages_set(1000)
        client.max_queued_messages_set(0)
        return client

    def _configure(self, client: mqtt.Client) -> None:
        """Credentials and TLS of the URL about to be tried."""
        if self.url.username is not None:
            client.username_pw_set(self.url.username, self.url.password)
        if self.url.tls and self._tls is not client:  # paho allows it once per client
            try:
                context = self.url.tls_files.context()
            except TLSFileError as e:
                raise ConnectError(f"cannot connect to {self.url}: {e}") from None
            client.tls_set_context(context)
            self._tls = client
        # Only until the CONNACK: paho formats every log line for it, a cost per message.
        client.on_log = self._handle_log if self.url.tls else None

    def _open(self, version: str, timeout: float) -> None:
        self._connack.clear()
        self._connack_rc = None
        self._socket_error = None
        self.taken_over = False
        client = self._client
        if client is None or self.persistence is None or self.version != version:
            client = self._make_client(version)
        self._configure(client)
        props = None
        if version == "5" and self.persistence is not None:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = self.persistence.expiry
            props.ReceiveMaximum = self.persistence.receive_maximum
        with self._io:
            self._client = client
            self._lost.clear()
            try:
                if version == "5":
                    client.connect(
                        self.url.host,
                        self.url.port,
                        keepalive=self.keepalive,
                        clean_start=self.persistence is None,
                        properties=props,
                    )
                else:  # 3.1.1: the session is kept by clean_session (the Client's)
                    client.connect(self.url.host, self.url.port, keepalive=self.keepalive)
            except (OSError, ssl.SSLError) as e:
                self._lost.set()
                raise ConnectError(f"cannot reach {self.url}: {e}") from None
        waker = socket.socketpair()
        for end in waker:
            end.setblocking(False)
        self._waker = waker
        self._thread = threading.Thread(
            target=self._network_loop, args=(waker,), name=f"mqtt-{self.client_id}", daemon=True
        )
        self._thread.start()
        if not self._connack.wait(timeout) and not self._lost.is_set():
            self.drop()
            raise ConnectError(f"{self.url} did not answer CONNECT within {timeout:.0f} s")
        rc = self._connack_rc
        if rc is None and self._socket_error is not None:  # a TLS alert (no certificate...)
            self.drop()
            raise ConnectError(
                f"{self.url} closed the TLS connection before answering CONNECT "
                f"({self._socket_error}): does it want a client certificate signed by a CA "
                "it trusts?"
            )
        if rc is None:  # the broker closed the connection without a CONNACK
            self.drop()
            if version == "5":
                raise _VersionRefused("connection closed before CONNACK")
            raise ConnectError(f"{self.url} closed the connection before answering CONNECT")
        if rc.is_failure:
            self.drop()
            name = rc.getName()
            if name in _VERSION_REFUSED:
                raise _VersionRefused(name)
            if name in _FATAL:
                raise AuthRefused(f"{self.url} refused the connection: {name}")
            raise ConnectError(f"{self.url} refused the connection: {name}")

    def _network_loop(self, waker: tuple[socket.socket, socket.socket]) -> None:
        client = self._client
        assert client is not None
        sock = client.socket()
        wake = waker[0]
        while not self._lost.is_set() and sock is not None:
            with self._io:
                writing = client.want_write()
                pending = getattr(sock, "pending", lambda: 0)()
            try:
                readable, _writable, _ = select.select(
                    [sock, wake], [sock] if writing else [], [], 0 if pending else LOOP_TIMEOUT
                )
            except (OSError, ValueError):
                break
            if wake in readable:
                with contextlib.suppress(OSError):
                    wake.recv(4096)
            with self._io:
                rc = MQTTErrorCode.MQTT_ERR_SUCCESS
                if sock in readable or pending:
                    rc = client.loop_read()
                if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and client.want_write():
                    rc = client.loop_write()
                if rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                    rc = client.loop_misc()
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or client.socket() is not sock:
                    break
        self._lost.set()
        self._connack.set()
        self._fail_pending()
        with self._io:
            s = client.socket()
            with contextlib.suppress(OSError):
                if s is not None:
                    s.close()
            if self._waker is waker:
                self._waker = None
        for end in waker:
            end.close()

    def _wake(self) -> None:
        """Make the network thread look again (a write left over, a new subscription).
        Not needed on that thread itself (a message handler's publish): it writes what is
        pending before it waits again, and a wake-up would only cost two system calls and a
        turn of the loop."""
        if threading.current_thread() is self._thread:
            return
        waker = self._waker
        if waker is not None:
            with contextlib.suppress(OSError):
                waker[1].send(b"w")

    # ---- paho callbacks (network thread, io lock held) --------------------------------

    def _handle_connect(
        self, _c: mqtt.Client, _u: Any, flags: Any, rc: ReasonCode, _p: Properties | None
    ) -> None:
        self._connack_rc = rc
        _c.on_log = None
        self.session_present = bool(getattr(flags, "session_present", False))
        if not rc.is_failure and self._on_connect is not None:
            try:
                self._on_connect(self.session_present)
            except Exception:  # a handler bug must not kill the network loop
                log.exception("error handling the connection to %s", self.url)
        self._connack.set()

    def _handle_log(self, _c: mqtt.Client, _u: Any, level: int, text: str) -> None:
        """Keep why the socket failed before a CONNACK (a broker's TLS alert comes as a
        failed read: the only place paho tells it)."""
        if level == mqtt.MQTT_LOG_ERR and self._connack_rc is None and "(_ssl.c:" in text:
            self._socket_error = text.removeprefix("failed to receive on socket: ")

    def _handle_disconnect(
        self, _c: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Properties | None
    ) -> None:
        if rc.getName() == "Session taken over":
            self.taken_over = True
        if not self._closing and self._connack_rc is not None and not self._connack_rc.is_failure:
            log.warning("connection to %s lost: %s", self.url, rc.getName())
        self._lost.set()

    def _handle_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        message = Message(
            topic=msg.topic,
            payload=bytes(msg.payload),
            qos=msg.qos,
            retain=bool(msg.retain),
            response_topic=getattr(props, "ResponseTopic", None),
            correlation_data=getattr(props, "CorrelationData", None),
            mid=msg.mid,
            dup=bool(msg.dup),
        )
        try:
            self._on_message(message)
        except Exception:  # a handler bug must not kill the network loop
            log.exception("error handling message on %s", msg.topic)

    def _handle_subscribe(
        self, _c: mqtt.Client, _u: Any, mid: int, codes: list[ReasonCode], _p: Properties | None
    ) -> None:
        with self._acks_lock:
            waiter = self._acks.pop(mid, None)
        if waiter is not None:
            waiter[1].extend(codes)
            waiter[0].set()

    def _fail_pending(self) -> None:
        with self._acks_lock:
            waiters, self._acks = list(self._acks.values()), {}
        for event, _ in waiters:
            event.set()

    # ---- use ------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._client is not None and not self._lost.is_set()

    def wait_lost(self, timeout: float) -> bool:
        return self._lost.wait(timeout)

    def _live_client(self) -> mqtt.Client:
        if self._client is None or self._lost.is_set():
            raise NotConnected(f"not connected to {self.url}")
        return self._client

    def subscribe(
        self, filters: Sequence[tuple[str, int]], timeout: float = 10.0, retries: int = 0
    ) -> None:
        """Subscribe and wait for the SUBACK; raise if the broker refused any filter, after
        asking `retries` more times, a second apart, for the ones it refused (a NATS
        cluster refuses a QoS 1 subscription it could not set up within 4 s). Not on the
        network thread (it would wait for itself)."""
        todo = list(filters)
        for attempt in range(retries + 1):
            try:
                self._subscribe(todo, timeout)
                return
            except SubscribeRefused as e:
                if attempt == retries:
                    raise
                log.warning("%s; asking again", e)
                todo = [(f, q) for f, q in todo if f in e.refused]
                self._lost.wait(1.0)

    def _subscribe(self, filters: Sequence[tuple[str, int]], timeout: float) -> None:
        if threading.current_thread() is self._thread:
            raise RuntimeError("subscribe in a message handler would wait for itself")
        event, codes = threading.Event(), []  # type: ignore[var-annotated]
        with self._io:
            client = self._live_client()
            with self._acks_lock:
                rc, mid = client.subscribe(list(filters))
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
                    raise NotConnected(f"subscribe failed: {mqtt.error_string(rc)}")
                self._acks[mid] = (event, codes)
        self._wake()
        if not event.wait(timeout) or not codes:
            if self._lost.is_set():
                raise NotConnected(f"connection to {self.url} lost before its SUBACK")
            raise NotConnected(f"no SUBACK from {self.url} within {timeout:.0f} s")
        refused = [f for (f, _), c in zip(filters, codes, strict=False) if c.is_failure]
        if refused:
            raise SubscribeRefused(f"{self.url} refused subscriptions {refused}", refused)

    def unsubscribe(self, filters: Sequence[str]) -> None:
        """Unsubscribe without waiting for the UNSUBACK (any thread)."""
        with self._io:
            rc, _mid = self._live_client().unsubscribe(list(filters))
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise NotConnected(f"unsubscribe failed: {mqtt.error_string(rc)}")
        self._wake()

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
    ) -> mqtt.MQTTMessageInfo:
        """Write a message (any thread). A plain connection raises NotConnected rather
        than drop it; a persistent one keeps a QoS 1 message for its next connection."""
        props = None
        if self.version == "5" and (response_topic or correlation_data):
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if response_topic:
                props.ResponseTopic = response_topic
            if correlation_data:
                props.CorrelationData = correlation_data
        with self._io:
            client = self._client
            if client is None or (self._lost.is_set() and (self.persistence is None or qos == 0)):
                raise NotConnected(f"not connected to {self.url}; nothing sent to {topic}")
            info = client.publish(topic, payload, qos=qos, retain=retain, properties=props)
            partial = client.want_write()
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and self.persistence is not None:
            return info  # kept by paho; sent when the session is reopened
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise NotConnected(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        if partial:
            self._wake()  # the rest is written when the socket takes it
        return info

    def publish_many(self, messages: Sequence[Outgoing]) -> None:
        """Several messages written back to back (any thread): no other thread's write
        comes between them."""
        with self._io:
            for out in messages:
                self.publish(out.topic, out.payload, out.qos, correlation_data=out.correlation)

    def ack(self, mid: int, qos: int = 1) -> None:
        """Acknowledge a received QoS 1 message (manual_ack connections)."""
        with self._io:
            client = self._client
            if client is not None and not self._lost.is_set():
                client.ack(mid, qos)
                partial = client.want_write()
            else:
                partial = False
        if partial:
            self._wake()

    def publish_wait(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, timeout: float = 10.0
    ) -> None:
        """Publish and wait until the broker has it (PUBACK for QoS 1)."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("publish_wait in a message handler would wait for itself")
        info = self.publish(topic, payload, qos=qos, retain=retain)
        waited = 0.0
        while not info.is_published():
            if self._lost.is_set() or waited >= timeout:
                raise NotConnected(f"{self.url} did not acknowledge a publish to {topic}")
            info.wait_for_publish(0.05)
            waited += 0.05

    def close(self, timeout: float = 2.0) -> None:
        """Clean DISCONNECT: the broker discards the Will."""
        client = self._client
        if client is None:
            return
        self._closing = True
        if not self._lost.is_set():
            with self._io:
                client.disconnect()
            self._wake()
        self._lost.wait(timeout)
        self.drop()

    def drop(self) -> None:
        """Stop the network thread without a DISCONNECT (as a crash would)."""
        self._lost.set()
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)
        self._fail_pending()


@dataclass(frozen=True)
class Outgoing:
    topic: str
    payload: bytes
    qos: int = 1
    correlation: bytes | None = None


class _VersionRefused(Exception):
    pass


def _nodelay(_client: mqtt.Client, _userdata: Any, sock: Any) -> None:
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
