"""Publishing a model artifact to the broker: retained chunks, then the meta.

Nodes fetch artifacts from these retained messages, so a model deployed from a laptop
reaches nodes placed hours later. The meta goes last: a meta on the broker means every
chunk is there. An upload that was cut off is simply run again (chunks are idempotent),
on the same or a new connection; an artifact whose meta is already on the broker is not
sent again.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt

from mqinfer.mqtt import SUBSCRIBE_RETRIES, Connection, Message, NotConnected
from mqinfer.protocol import codec
from mqinfer.protocol import messages as m
from mqinfer.protocol.errors import ProtocolError
from mqinfer.protocol.manifest import Manifest
from mqinfer.protocol.topics import Topics

CHUNK_SIZE = 256 * 1024
WINDOW = 8  # chunks in flight before waiting for PUBACKs

Progress = Callable[[int, int], None]  # (bytes sent, total)


def chunk_count(size: int, chunk_size: int = CHUNK_SIZE) -> int:
    return (size + chunk_size - 1) // chunk_size


class Uploader:
    """Uploads artifacts; feed it the messages of the connection it uploads over."""

    def __init__(self, topics: Topics) -> None:
        self.topics = topics
        self._metas: dict[str, m.ArtifactMeta] = {}
        self._seen = threading.Event()

    def on_message(self, message: Message) -> None:
        try:
            ref = self.topics.parse(message.topic)
        except ValueError:
            return
        if ref.artifact is None or ref.chunk is not None or not message.payload:
            return
        try:
            meta = codec.decode_for(ref, message.payload)
        except ProtocolError:
            return
        if isinstance(meta, m.ArtifactMeta):
            self._metas[meta.sha256] = meta
            self._seen.set()

    def present(self, conn: Connection, sha256: str, size: int, wait: float = 1.5) -> bool:
        """Is a complete artifact with this hash and size already on the broker?"""
        self._seen.clear()
        # a clustered broker can refuse a subscription it could not set up in time
        conn.subscribe([(self.topics.artifact_meta(sha256), 1)], retries=SUBSCRIBE_RETRIES)
        self._seen.wait(wait)  # a retained meta arrives at once, or not at all
        conn.unsubscribe([self.topics.artifact_meta(sha256)])
        meta = self._metas.get(sha256)
        return meta is not None and meta.size == size

    def upload(
        self,
        conn: Connection,
        sha256: str,
        data: bytes,
        name: str,
        fmt: str,
        manifest: Manifest | None,
        progress: Progress | None = None,
        force: bool = False,
    ) -> bool:
        """Publish the artifact unless it is there (or `force`); True when it was sent."""
        if not force and self.present(conn, sha256, len(data)):
            return False
        count = chunk_count(len(data))
        pending = []
        for i in range(count):
            chunk = data[i * CHUNK_SIZE : (i + 1) * CHUNK_SIZE]
            info = conn.publish(self.topics.artifact_chunk(sha256, i), chunk, qos=1, retain=True)
            pending.append((info, min((i + 1) * CHUNK_SIZE, len(data))))
            while len(pending) >= WINDOW or (i == count - 1 and pending):
                first, sent = pending.pop(0)
                _wait(conn, first)
                if progress:
                    progress(sent, len(data))
        meta = m.ArtifactMeta(
            sha256=sha256,
            name=name,
            format=fmt,
            size=len(data),
            chunk_size=CHUNK_SIZE,
            chunks=count,
            manifest=manifest,
            ts=time.time(),
        )
        conn.publish_wait(self.topics.artifact_meta(sha256), codec.encode(meta), retain=True)
        return True


def _wait(conn: Connection, info: mqtt.MQTTMessageInfo, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not info.is_published():
        if time.monotonic() > deadline or not conn.alive:
            raise NotConnected("the broker stopped acknowledging the upload")
        info.wait_for_publish(0.05)


def progress_bar(label: str) -> Progress:
    """A one-line progress bar on stderr (only drawn on a terminal, and for > 1 MB)."""
    tty = sys.stderr.isatty()

    def show(sent: int, total: int) -> None:
        if not tty or total < 1_000_000:
            return
        width = 30
        filled = int(width * sent / total)
        bar = "#" * filled + "-" * (width - filled)
        sys.stderr.write(
            f"\r{label} [{bar}] {sent / 1e6:.1f}/{total / 1e6:.1f} MB {100 * sent // total}%"
        )
        if sent >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show
