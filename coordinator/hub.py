"""The coordinator's roles: active on the hub session, or standing by.

One coordinator is active. It holds the hub session: a session the broker keeps under one
client id (`hub_client_id`), in which every request waits until the active coordinator has
answered it and acknowledged it. Whoever connects with that id takes the session over, and
the broker closes the connection that held it, so a coordinator that stalled or was cut
off cannot go on answering once another has taken over ([T-HUB-1]).

Any other coordinator stands by: it watches the active one's state and heartbeats on a
connection of its own, keeping its registry warm, and takes the hub session over when the
active one's Will or `offline` comes, or its heartbeats stop ([T-HUB-2]). A coordinator
that was taken over goes back to standing by; one that merely lost its connection looks
first, and reconnects only when no other has taken its place.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from mqinfer.coordinator.agent import HEARTBEAT, CoordinatorAgent, hub_client_id, subscriptions
from mqinfer.mqtt import (
    AuthRefused,
    Brokers,
    Connection,
    Message,
    MQTTError,
    Persistence,
)
from mqinfer.mqtt.session import EXIT_AUTH, Backoff, SessionCounter
from mqinfer.protocol import codec
from mqinfer.protocol import messages as m
from mqinfer.protocol.errors import ProtocolError

log = logging.getLogger("mqinfer.coordinator")

SILENCE = 3.0  # heartbeat intervals without one before a standby takes over
READ_RETAINED = 1.0  # seconds a new standby reads before it decides nobody is active
SESSION_EXPIRY = 3600  # seconds the broker keeps the hub session (and its requests) unowned


@dataclass
class _Active:
    """The active coordinator as a standby sees it."""

    state: m.CoordinatorState | None = None
    beat: float | None = None  # monotonic time of its last live heartbeat


class Watch:
    """A standby's view: the active coordinator's state and heartbeats, and the registry."""

    def __init__(self, agent: CoordinatorAgent) -> None:
        self.agent = agent
        self.topics = agent.topics
        self.seen = _Active()
        self.lock = threading.Lock()

    def on_message(self, message: Message) -> None:
        t = self.topics
        if message.topic == t.coordinator_heartbeat():
            try:
                beat = codec.decode_as(m.CoordinatorHeartbeat, message.payload)
            except ProtocolError:
                return
            with self.lock:
                st = self.seen.state
                if st is not None and beat.session == st.session:
                    self.seen.beat = time.monotonic()
            return
        if message.topic == t.coordinator_state():
            try:
                state = (
                    codec.decode_as(m.CoordinatorState, message.payload)
                    if message.payload
                    else None
                )
            except ProtocolError:
                state = None
            with self.lock:
                old = self.seen.state
                if state is None or old is None or state.session >= old.session:
                    self.seen.state = state
                    if state is not None and (old is None or state.session != old.session):
                        self.seen.beat = time.monotonic()  # a new one: its beats count from now
        self.agent.on_message(message)  # the registry, kept warm

    def vacant(self, started: float, now: float, mine: int) -> tuple[str, bool] | None:
        """Why the hub session is free to take, and whether this coordinator held it last
        (its session is still the one on record); None while another coordinator holds it."""
        with self.lock:
            st, beat = self.seen.state, self.seen.beat
        if st is None:
            return ("no coordinator", False) if now - started >= READ_RETAINED else None
        ours = st.id == self.agent.id and st.session == mine
        if ours:
            return "this coordinator held it last", True
        if st.state != "online":
            return f"coordinator {st.id} is {st.state}", False
        last = beat if beat is not None else started
        if now - last > SILENCE * HEARTBEAT:
            return f"coordinator {st.id} sent no heartbeat for {now - last:.1f} s", False
        return None


def stand_by(
    agent: CoordinatorAgent,
    urls: Brokers,
    stop: threading.Event,
    protocol: str,
    mine: int = 0,
    announce: bool = True,
) -> str | None:
    """Watch until the hub session is free: 'ours' when this coordinator held it last (its
    leases go on), 'vacant' when another did or none did, None when stopped. Raises
    AuthRefused when the broker refuses the credentials."""
    watch = Watch(agent)
    backoff = Backoff()
    while not stop.is_set():
        conn = Connection(
            urls,
            f"mqinfer-coordinator-{agent.id}-{time.time_ns():x}",
            watch.on_message,
            protocol=protocol,
        )
        try:
            conn.open()
            conn.subscribe(
                [*subscriptions(agent.topics), (agent.topics.coordinator_heartbeat(), 0)]
            )
        except AuthRefused:
            raise
        except MQTTError as e:
            conn.drop()
            delay = backoff.next_delay()
            log.warning("%s: %s; retrying in %.1f s", agent.name, e, delay)
            stop.wait(delay)
            continue
        started = time.monotonic()
        said = False
        try:
            while not stop.is_set() and conn.alive:
                free = watch.vacant(started, time.monotonic(), mine)
                if free is not None:
                    why, ours = free
                    log.info("%s: taking the hub (%s)", agent.name, why)
                    return "ours" if ours else "vacant"
                if announce and not said and watch.seen.state is not None:
                    log.info(
                        "%s: standing by; coordinator %s is active", agent.name, watch.seen.state.id
                    )
                    said = True
                stop.wait(0.05)
        finally:
            conn.close()
    return None


def run(
    agent: CoordinatorAgent,
    urls: Brokers,
    stop: threading.Event,
    protocol: str = "auto",
    keepalive: int = 10,
    tick_seconds: float = 0.1,
) -> int:
    """Stand by until the hub is free, hold it until stopped or taken over; return an exit
    status (0, or EXIT_AUTH)."""
    counter = SessionCounter()
    mine = 0
    try:
        while not stop.is_set():
            if stand_by(agent, urls, stop, protocol, mine) is None:
                return 0
            mine, outcome = _hold(agent, urls, stop, protocol, keepalive, tick_seconds, counter)
            if outcome == "stopped":
                return 0
    except AuthRefused as e:
        log.error("%s: %s; check the user name and password in --broker", agent.name, e)
        return EXIT_AUTH
    return 0


def _hub(agent: CoordinatorAgent, urls: Brokers, protocol: str, keepalive: int) -> Connection:
    return Connection(
        urls,
        hub_client_id(agent.topics, urls),
        agent.on_message,
        protocol=protocol,
        keepalive=keepalive,
        persistence=Persistence(expiry=SESSION_EXPIRY),
        manual_ack=True,
        on_connect=agent.connected,
    )


def _hold(
    agent: CoordinatorAgent,
    urls: Brokers,
    stop: threading.Event,
    protocol: str,
    keepalive: int,
    tick_seconds: float,
    counter: SessionCounter,
) -> tuple[int, str]:
    """The active role: the hub session, kept across lost connections as long as no other
    coordinator has held it meanwhile. Returns (last session, 'stopped' | 'taken over')."""
    conn = _hub(agent, urls, protocol, keepalive)
    backoff = Backoff()
    fresh = True  # a new dispatcher: leases of its own
    session = 0
    while not stop.is_set():
        session = counter.next()
        conn.set_will(agent.will(session))
        agent.prepare(conn, session, fresh=fresh, warm=True)
        try:
            conn.open()
        except AuthRefused:
            raise
        except MQTTError as e:
            delay = backoff.next_delay()
            log.warning("%s: %s; retrying in %.1f s", agent.name, e, delay)
            stop.wait(delay)
            continue
        log.info(
            "%s: connected to %s (MQTT %s, session %d, %s)",
            agent.name,
            conn.url,
            conn.version,
            session,
            "the broker kept the hub session" if conn.session_present else "a new hub session",
        )
        try:
            fresh = False
            agent.begin(conn)
            backoff.reset()
            while not stop.is_set() and conn.alive:
                agent.tick(conn)
                stop.wait(tick_seconds)
            if stop.is_set() and conn.alive:
                agent.shutdown(conn)
                conn.close()
                agent.end()
                return session, "stopped"
        except MQTTError as e:
            log.warning("%s: session %d ended: %s", agent.name, session, e)
        conn.drop()
        if conn.taken_over:
            log.warning("%s: another coordinator took the hub over; standing by", agent.name)
            agent.end()
            return session, "taken over"
        if stop.is_set():
            break
        # Lost, and MQTT 3.1.1 cannot say whether it was taken over: look before taking
        # the hub session back, or we would take it from a coordinator that took our place.
        stop.wait(backoff.next_delay())
        how = stand_by(agent, urls, stop, protocol, session, announce=False)
        if how is None:
            break
        if how == "vacant":
            # Another coordinator held the hub meanwhile: what this one held was answered
            # there. A new dispatcher, and a new client without the messages it queued.
            agent.end()
            conn = _hub(agent, urls, protocol, keepalive)
            fresh = True
    agent.end()
    return session, "stopped"
