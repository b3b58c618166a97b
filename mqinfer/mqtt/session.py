"""The session loop shared by the node and the coordinator.

A session is one connection: connect with the Will set, subscribe, announce (birth), then
tick until the connection is lost or a stop is asked for. A lost connection is followed by a
jittered, capped backoff and a whole new session; refused credentials end the loop.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from mqinfer.mqtt.connection import AuthRefused, Connection, Message, MQTTError, Will
from mqinfer.mqtt.url import Brokers, BrokerURL

log = logging.getLogger("mqinfer.session")

EXIT_AUTH = 3  # exit status when the broker refuses our credentials


class Agent(Protocol):
    """What a component supplies to run sessions."""

    name: str  # for log lines, e.g. "node edge-1"

    def client_id(self, session: int) -> str: ...

    def will(self, session: int) -> Will | None: ...

    def on_message(self, message: Message) -> None: ...

    def start(self, conn: Connection, session: int) -> None:
        """Subscribe, then announce. Runs once per session, after the CONNACK."""

    def tick(self, conn: Connection) -> None:
        """Periodic work (heartbeats, timeouts); called every `tick_seconds`."""

    def shutdown(self, conn: Connection) -> None:
        """Clean goodbye before a requested stop (e.g. retained 'offline')."""


class SessionCounter:
    """Strictly increasing session numbers: milliseconds since the epoch at connect time.

    A Will names the session it belongs to, so a late Will from an old connection can be
    told apart from the death of the current one ([T-STATE-3]).
    """

    def __init__(self) -> None:
        self._last = 0

    def next(self) -> int:
        self._last = max(time.time_ns() // 1_000_000, self._last + 1)
        return self._last


@dataclass
class Backoff:
    """Exponential backoff, capped, with jitter: each delay is drawn from [ceiling/2, ceiling]."""

    initial: float = 0.5
    cap: float = 30.0
    attempt: int = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.initial * 2.0 ** min(self.attempt, 32))
        self.attempt += 1  # (bounded above, so hours of outage cannot overflow the float)
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0


def run(
    agent: Agent,
    urls: Brokers,
    stop: threading.Event,
    protocol: str = "auto",
    tick_seconds: float = 0.2,
    keepalive: int = 30,
) -> int:
    """Run sessions until `stop` is set; return an exit status (0, or EXIT_AUTH). With
    several URLs (members of a clustered broker) each new session tries the one that
    worked last first, then the others."""
    counter = SessionCounter()
    backoff = Backoff()
    brokers = [urls] if isinstance(urls, BrokerURL) else list(urls)
    while not stop.is_set():
        session = counter.next()
        conn = Connection(
            brokers,
            agent.client_id(session),
            agent.on_message,
            will=agent.will(session),
            protocol=protocol,
            keepalive=keepalive,
        )
        try:
            conn.open()
        except AuthRefused as e:
            log.error("%s: %s; check the user name and password in --broker", agent.name, e)
            return EXIT_AUTH
        except MQTTError as e:
            delay = backoff.next_delay()
            log.warning("%s: %s; retrying in %.1f s", agent.name, e, delay)
            stop.wait(delay)
            continue
        protocol = conn.version or protocol  # remember what the broker speaks
        brokers = [conn.url, *(u for u in brokers if u != conn.url)]  # that one first next time
        log.info(
            "%s: connected to %s (MQTT %s, session %d)", agent.name, conn.url, conn.version, session
        )
        try:
            agent.start(conn, session)
            backoff.reset()
            while not stop.is_set() and conn.alive:
                agent.tick(conn)
                stop.wait(tick_seconds)
            if stop.is_set() and conn.alive:
                agent.shutdown(conn)
                conn.close()
                return 0
        except MQTTError as e:
            log.warning("%s: session %d ended: %s", agent.name, session, e)
        conn.drop()
        if not stop.is_set():
            delay = backoff.next_delay()
            log.warning("%s: reconnecting in %.1f s", agent.name, delay)
            stop.wait(delay)
    return 0
