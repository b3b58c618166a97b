"""The connection of a command that runs once (deploy, undeploy, infer, artifacts).

A broker may drop a connection midway: a clustered one does under load. The command then
connects again, to the next broker given when that one does not answer, subscribes again,
and runs the step that was cut off again from its start. Every step can be run twice:
chunks, metas and specs are retained under their own identity, and a request sent again
under its id is answered without being served twice (topics.md [T-REQ-4]).
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Callable, Sequence
from typing import TypeVar

from mqinfer.mqtt import (
    SUBSCRIBE_RETRIES,
    Brokers,
    ConnectError,
    Connection,
    Message,
    NotConnected,
)

RECONNECTS = 5  # times a command connects again before it gives up

T = TypeVar("T")


class Link:
    def __init__(
        self, url: Brokers, protocol: str, on_message: Callable[[Message], None], what: str
    ) -> None:
        """Connect now: a first failure to connect is final (a wrong address, say)."""
        self._url, self._protocol, self._on_message = url, protocol, on_message
        self._client_id = f"mqinfer-{what}-{uuid.uuid4().hex[:12]}"
        self._filters: list[tuple[str, int]] = []
        self.reconnects = 0
        self.conn: Connection | None = self._open()

    def _open(self) -> Connection:
        conn = Connection(self._url, self._client_id, self._on_message, protocol=self._protocol)
        conn.open()
        return conn

    def follow(self, filters: Sequence[tuple[str, int]]) -> None:
        """Subscribe, now and on every connection to come."""
        self._filters += filters
        self.run(lambda conn: conn.subscribe(list(filters), retries=SUBSCRIBE_RETRIES))

    def run(self, step: Callable[[Connection], T]) -> T:
        """`step(conn)`, run again on a new connection whenever the connection is lost."""
        while True:
            try:
                if self.conn is None:
                    self.conn = self._open()
                    if self._filters:
                        self.conn.subscribe(self._filters, retries=SUBSCRIBE_RETRIES)
                return step(self.conn)
            except (NotConnected, ConnectError) as e:
                if self.reconnects >= RECONNECTS:
                    raise
                self.reconnects += 1
                print(f"{e}; connecting again ({self.reconnects} of {RECONNECTS})", file=sys.stderr)
                if self.conn is not None:
                    self.conn.drop()
                    self.conn = None
                time.sleep(min(2.0 ** (self.reconnects - 1), 8.0))

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def check(conn: Connection) -> None:
    """Raise NotConnected if the connection is lost (for steps that only wait)."""
    if not conn.alive:
        raise NotConnected(f"connection to {conn.url} lost")
