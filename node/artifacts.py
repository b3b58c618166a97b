"""Model artifacts on the node: fetched over MQTT in chunks, cached on disk by sha256.

An artifact is published retained as `artifacts/{sha256}/chunk/{i}` plus a meta message
that names the chunk count. The node subscribes, collects every chunk, checks the sha256 of
the whole and only then writes `{cache}/{sha256}{ext}`. A cached file is hashed again when
it is used, so a file damaged on disk is fetched anew instead of being run.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from mqinfer.client import Connection, Message
from protocol import codec
from protocol import messages as m
from protocol.errors import Code, ProtocolError
from protocol.manifest import FORMAT_SUFFIXES
from protocol.topics import Ref, Topics

log = logging.getLogger("mqinfer.node")

EXTENSIONS = {fmt: suffix for suffix, fmt in FORMAT_SUFFIXES}


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def default_cache_dir(node_id: str) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mqinfer" / node_id


@dataclass
class _Fetch:
    sha256: str
    meta: m.ArtifactMeta | None = None
    chunks: dict[int, bytes] = field(default_factory=dict)
    changed: threading.Condition = field(default_factory=threading.Condition)


class ArtifactStore:
    """The node's artifact cache, and the fetcher that fills it from the broker."""

    def __init__(self, cache_dir: Path, topics: Topics) -> None:
        self.dir = cache_dir
        self.topics = topics
        self._fetches: dict[str, _Fetch] = {}
        self._lock = threading.Lock()

    def path(self, sha256: str, fmt: str) -> Path:
        ext = EXTENSIONS.get(fmt)
        if ext is None:
            raise ProtocolError(
                Code.UNSUPPORTED_FORMAT, f"format {fmt!r}; expected one of {sorted(EXTENSIONS)}"
            )
        return self.dir / f"{sha256}{ext}"

    def cached(self) -> list[str]:
        """sha256 of every artifact in the cache (by file name; verified when used)."""
        if not self.dir.is_dir():
            return []
        names = {
            p.name[:64]
            for p in self.dir.iterdir()
            if len(p.name) > 64 and not p.name.endswith(".part")  # a write cut short
        }
        return sorted(n for n in names if all(c in "0123456789abcdef" for c in n))

    def _verified(self, sha256: str, fmt: str) -> Path | None:
        path = self.path(sha256, fmt)
        try:
            data = path.read_bytes()
        except OSError:
            return None
        if sha256_of(data) == sha256:
            return path
        log.warning("cached artifact %s is damaged; fetching it again", path)
        path.unlink(missing_ok=True)
        return None

    def put(self, sha256: str, fmt: str, data: bytes) -> Path:
        got = sha256_of(data)
        if got != sha256:
            raise ProtocolError(
                Code.BAD_ARTIFACT,
                f"artifact {sha256[:12]}: the {len(data)} bytes received hash to {got[:12]}; "
                "refusing it (re-upload the model)",
            )
        path = self.path(sha256, fmt)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return path

    # ---- fetching (the caller's thread; messages arrive on the network thread) ----------

    def get(self, conn: Connection, sha256: str, fmt: str, timeout: float) -> Path:
        """The cached file, fetched from the broker first if needed. Never on the
        network thread: it waits for the broker."""
        path = self._verified(sha256, fmt)
        if path is not None:
            return path
        fetch = _Fetch(sha256)
        with self._lock:
            self._fetches[sha256] = fetch
        filters = [self.topics.artifact_meta(sha256), self.topics.artifact_chunks(sha256)]
        try:
            conn.subscribe([(f, 1) for f in filters])
            data = self._wait(fetch, timeout)
        finally:
            with self._lock:
                self._fetches.pop(sha256, None)
            try:
                conn.unsubscribe(filters)
            except Exception as e:  # the session may be gone; nothing to undo then
                log.debug("unsubscribe after fetch: %s", e)
        return self.put(sha256, fmt, data)

    def _wait(self, fetch: _Fetch, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        with fetch.changed:
            while True:
                meta = fetch.meta
                if meta is not None and all(i in fetch.chunks for i in range(meta.chunks)):
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    if meta is None:
                        what = "no artifacts/.../meta was found (was the model uploaded?)"
                    else:
                        missing = [i for i in range(meta.chunks) if i not in fetch.chunks]
                        what = f"chunks {missing[:10]} of {meta.chunks} are missing"
                    raise ProtocolError(
                        Code.BAD_ARTIFACT,
                        f"artifact {fetch.sha256[:12]}: {what} after {timeout:.0f} s",
                    )
                fetch.changed.wait(min(left, 1.0))
            return b"".join(fetch.chunks[i] for i in range(meta.chunks))

    def on_message(self, ref: Ref, message: Message) -> None:
        """A meta or chunk message (network thread)."""
        if ref.artifact is None:
            return
        with self._lock:
            fetch = self._fetches.get(ref.artifact)
        if fetch is None or not message.payload:
            return
        with fetch.changed:
            if ref.chunk is not None:
                fetch.chunks[int(ref.chunk)] = message.payload
            else:
                try:
                    meta = codec.decode_for(ref, message.payload)
                except ProtocolError as e:
                    log.warning("artifact %s: unreadable meta: %s", ref.artifact[:12], e)
                    return
                if isinstance(meta, m.ArtifactMeta):
                    fetch.meta = meta
            fetch.changed.notify_all()
