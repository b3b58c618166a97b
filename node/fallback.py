"""A node cut off from its hub answers requests `unavailable` itself.

A site joined to the hub by a bridge, or a node on a cluster member that lost the others,
can be cut off from the coordinator while sensors next to it go on publishing. Those
requests never reach the hub: without this, their senders wait for their own timeout.

When no coordinator heartbeat has come for `SILENCE` seconds while the coordinator's
state still says `online` (it did not die: its Will would say so; the node lost sight of
it), the node joins a shared subscription to the request topics, so that each request at
its broker goes to one node of the group, and answers it `unavailable`, saying why. When
heartbeats come again it leaves ([T-HUB-4]).

Only over MQTT 5 (shared subscriptions); the silence is longer than a standby's takeover,
so on the hub's own broker, where requests wait for a coordinator that restarts, a node
never answers for it.
"""

from __future__ import annotations

import hashlib
import logging
import threading

from mqinfer.mqtt import Connection, Message, MQTTError
from mqinfer.protocol import codec, replies
from mqinfer.protocol import messages as m
from mqinfer.protocol.errors import Code, ProtocolError
from mqinfer.protocol.payload import result_json
from mqinfer.protocol.topics import Ref, Topics

log = logging.getLogger("mqinfer.node")

SILENCE = 5.0  # seconds without a coordinator heartbeat (a standby takes over after 3)


class Fallback:
    def __init__(self, node_id: str, topics: Topics) -> None:
        self.node_id = node_id
        self.topics = topics
        group = hashlib.blake2b(topics.prefix.encode(), digest_size=4).hexdigest()
        self.filters = [f"$share/mqinfer-{group}/{f}" for f in topics.all_requests()]
        self._lock = threading.Lock()
        self._state: m.CoordinatorState | None = None
        self._beat = 0.0  # monotonic time of the last heartbeat (or of the session start)
        self.subscribed = False
        self.answered = 0

    def start(self, now: float) -> None:
        """A new session: nothing subscribed, the silence counts from now."""
        with self._lock:
            self._beat = now
            self.subscribed = False

    def on_state(self, payload: bytes, now: float) -> None:
        """The coordinator's state. One that says `online` is contact too: a bridge that
        reconnects brings the retained state with it, a heartbeat interval before the next
        heartbeat, and from then on a request here also reaches the hub, which answers it."""
        try:
            state = codec.decode_as(m.CoordinatorState, payload) if payload else None
        except ProtocolError:
            return
        with self._lock:
            self._state = state
            if state is not None and state.state == "online":
                self._beat = now

    def on_heartbeat(self, now: float) -> None:
        with self._lock:
            self._beat = now

    def cut_off(self, now: float) -> float | None:
        """Seconds of silence from a coordinator that should be there; None if not cut off."""
        with self._lock:
            state, beat = self._state, self._beat
        if state is None or state.state != "online":
            return None  # none ever ran, or it stopped or died: its requests wait for it
        silent = now - beat
        return silent if silent > SILENCE else None

    def tick(self, conn: Connection, now: float) -> None:
        """Join or leave the shared subscription (the session thread)."""
        if conn.version != "5":
            return
        want = self.cut_off(now) is not None
        if want == self.subscribed:
            return
        try:
            if want:
                conn.subscribe([(f, 1) for f in self.filters])
                log.warning(
                    "node %s: no heartbeat from the coordinator for %.0f s; answering "
                    "requests here 'unavailable' until it is back",
                    self.node_id,
                    SILENCE,
                )
            else:
                conn.unsubscribe(self.filters)
                log.info("node %s: the coordinator is back", self.node_id)
            self.subscribed = want
        except MQTTError as e:
            log.warning("node %s: fallback subscription: %s", self.node_id, e)

    def on_request(self, conn: Connection, ref: Ref, message: Message, now: float) -> None:
        """A request from the shared subscription (network thread)."""
        silent = self.cut_off(now)
        if silent is None or ref.service is None:
            return  # the hub is back: it has this one
        corr = message.correlation_data
        key = replies.request_key(message.topic, message.payload, corr, message.response_topic)
        payload = result_json(
            request_id=replies.request_id(ref, corr, None, key),
            service=ref.service,
            node=self.node_id,
            ok=False,
            error=(
                str(Code.UNAVAILABLE),
                f"the coordinator is unreachable from {self.node_id} (no heartbeat for "
                f"{silent:.0f} s): this request was not served; retry later",
            ),
        )
        topic = replies.result_topic(self.topics, ref.service, ref, message.response_topic)
        try:
            conn.publish(topic, payload, qos=1, correlation_data=corr)
            self.answered += 1
        except (MQTTError, ValueError) as e:
            log.warning("node %s: could not answer a request: %s", self.node_id, e)
