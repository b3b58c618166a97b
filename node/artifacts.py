"""Model artifacts on the node: cached on disk by sha256, and only there.

A cached artifact is `{cache}/{sha256}{ext}`. The sha256 is checked (64 lowercase hex
digits) before any path is built, and every path is checked to lie in the cache directory,
so no message can make the node read, write or delete a file anywhere else. A cached file is
hashed again when it is used, so a file damaged on disk is fetched anew instead of run.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
from pathlib import Path

from mqinfer.protocol.errors import Code, ProtocolError
from mqinfer.protocol.manifest import FORMAT_SUFFIXES
from mqinfer.protocol.topics import TopicError, check_sha256

log = logging.getLogger("mqinfer.node")

EXTENSIONS = {fmt: suffix for suffix, fmt in FORMAT_SUFFIXES}
DISK_HEADROOM = 64 * 1024 * 1024  # bytes a cache write leaves free (a tenth of a smaller disk)


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def default_cache_dir(node_id: str) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mqinfer" / node_id


class ArtifactStore:
    """The node's artifact cache: one directory, files named by their sha256."""

    def __init__(self, cache_dir: Path) -> None:
        self.dir = cache_dir

    def path(self, sha256: str, fmt: str) -> Path:
        """The cache file of an artifact; never a path outside the cache directory."""
        try:
            check_sha256(sha256)
        except TopicError as e:
            raise ProtocolError(Code.BAD_MESSAGE, str(e)) from None
        ext = EXTENSIONS.get(fmt)
        if ext is None:
            raise ProtocolError(
                Code.UNSUPPORTED_FORMAT, f"format {fmt!r}; expected one of {sorted(EXTENSIONS)}"
            )
        path = self.dir / f"{sha256}{ext}"
        if path.parent != self.dir:  # cannot happen with a checked hash; kept as a guard
            raise ProtocolError(Code.BAD_MESSAGE, f"artifact {sha256!r} is not a file name")
        return path

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

    def verified(self, sha256: str, fmt: str) -> Path | None:
        """The cached file if its bytes still hash to its name; a damaged one is removed."""
        path = self.path(sha256, fmt)
        try:
            data = path.read_bytes()
        except OSError:
            return None
        if sha256_of(data) == sha256:
            return path
        log.warning("cached artifact %s is damaged; fetching it again", path.name)
        self._unlink(path)
        return None

    def check_room(self, size: int) -> None:
        """Refuse early an artifact the cache's disk cannot hold ([storage_failed])."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            disk = shutil.disk_usage(self.dir)
        except OSError as e:
            raise ProtocolError(
                Code.STORAGE_FAILED, f"cache {self.dir} is not usable: {e.strerror or e}"
            ) from None
        keep = min(DISK_HEADROOM, disk.total // 10)
        if size + keep > disk.free:
            raise ProtocolError(
                Code.STORAGE_FAILED,
                f"the model is {size / 2**20:.1f} MB and the cache's disk has "
                f"{disk.free / 2**20:.1f} MB free ({keep / 2**20:.1f} MB are kept free)",
            )

    def put(self, sha256: str, fmt: str, data: bytes) -> Path:
        got = sha256_of(data)
        if got != sha256:
            raise ProtocolError(
                Code.BAD_ARTIFACT,
                f"artifact {sha256[:12]}: the {len(data)} bytes received hash to {got[:12]}; "
                "refusing it (re-upload the model)",
            )
        path = self.path(sha256, fmt)
        tmp = path.with_name(path.name + ".part")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as e:
            self._unlink(tmp)
            full = e.errno in (errno.ENOSPC, errno.EDQUOT)
            why = "the disk is full" if full else (e.strerror or str(e))
            raise ProtocolError(
                Code.STORAGE_FAILED, f"could not write {len(data)} bytes to {self.dir}: {why}"
            ) from None
        return path

    def _unlink(self, path: Path) -> None:
        """Remove a file of the cache, and only of the cache."""
        if path.parent != self.dir:
            raise RuntimeError(f"refusing to remove {path}: not in the cache {self.dir}")
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            log.warning("could not remove %s: %s", path, e)
