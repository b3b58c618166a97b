"""Work from the hub, as it reaches a node: read on the network thread, queued for a
replica's workers, answered to the hub.

A work message is read here only as far as its header (never its body: the network thread
decodes no image), checked, and queued with its lease for the replica of its slot. Work
this node cannot take is released at once, with the reason, so the hub gives it to another
replica. An answer goes out on the connection the work came on, or not at all: after a
reconnect the hub counts the old session's leases as ended ([T-WORK-3]).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from mqinfer.mqtt import Connection, Message, MQTTError
from mqinfer.node.jobs import Job, Served, release
from mqinfer.protocol import messages as m
from mqinfer.protocol import work as w
from mqinfer.protocol.errors import ProtocolError
from mqinfer.protocol.topics import Topics

if TYPE_CHECKING:
    from mqinfer.node.replica import Replica

log = logging.getLogger("mqinfer.node")

SEEN = 4096  # job tokens remembered, so a redelivered work message is not done twice


class Intake:
    def __init__(
        self,
        node_id: str,
        topics: Topics,
        replicas: dict[str, Replica],
        connection: Callable[[], tuple[Connection | None, int]],
    ) -> None:
        """`connection` gives the live connection and its session (None while down)."""
        self.node_id = node_id
        self.topics = topics
        self.replicas = replicas
        self.connection = connection
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._epoch: str | None = None  # the dispatcher whose work came last
        self.refused = 0

    def on_work(self, message: Message, session: int) -> None:
        """A work message (network thread)."""
        now = time.monotonic()
        try:
            work, body = w.decode_work(message.payload)
        except ProtocolError as e:
            self.refused += 1
            log.warning("node %s: refused work: %s", self.node_id, e)
            return  # no job to name: nothing to answer
        if work.job in self._seen:
            return  # a redelivery of work already taken
        self._seen[work.job] = None
        while len(self._seen) > SEEN:
            self._seen.popitem(last=False)
        job = Job(work, body, now, session)
        epoch = work.job.rpartition("-")[0]
        if epoch != self._epoch:
            if self._epoch is not None:
                self._drop_epoch(epoch)
            self._epoch = epoch
        replica = self.replicas.get(m.slot(work.service, work.stage))
        if replica is None:
            slot = m.slot(work.service, work.stage)
            self.answer(job, release(job, "not_deployed", f"{self.node_id} runs no {slot}", now))
        elif not replica.offer(job):
            why = "is being stopped" if replica.state != "ready" else "has its queue full"
            self.answer(job, release(job, "busy", f"the replica on {self.node_id} {why}", now))

    def _drop_epoch(self, current: str) -> None:
        """Work of an earlier dispatcher is void once a new one gives work: it resends
        what it has; the queued copies would only be done for nothing."""
        for replica in list(self.replicas.values()):
            n = replica.purge(
                lambda job: job.work.job.rpartition("-")[0] != current,
                "a newer dispatcher took over",
                "stale",
            )
            if n:
                log.info("node %s: dropped %d jobs of an earlier dispatcher", self.node_id, n)

    def new_session(self, session: int) -> None:
        """After a reconnect: queued work of the old session cannot be answered any more."""
        for replica in list(self.replicas.values()):
            replica.purge(lambda job: job.session != session, "the node reconnected", "stale")

    def answer(self, job: Job, served: Served) -> None:
        """Send an answer to the hub (any thread), on the session the work came on."""
        conn, session = self.connection()
        if conn is None or session != job.session:
            log.debug("node %s: no answer to %s: its session ended", self.node_id, job.work.job)
            return
        payload = w.encode_answer(served.answer, served.body)
        try:
            conn.publish(self.topics.node_answer(self.node_id), payload, qos=1)
        except MQTTError as e:
            log.warning("node %s: answer to %s lost: %s", self.node_id, job.work.job, e)
