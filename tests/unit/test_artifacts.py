"""The node's artifact cache and the chunk assembly that fills it (no broker)."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import pytest

from mqinfer.client import Connection, Message
from node.artifacts import ArtifactStore, _Fetch
from protocol import codec
from protocol import messages as m
from protocol.errors import Code, ProtocolError
from protocol.topics import Topics

T = Topics()
DATA = bytes(range(256)) * 40 + b"tail"  # 10244 bytes
SHA = hashlib.sha256(DATA).hexdigest()
CHUNK = 4096


def chunks(data: bytes = DATA, size: int = CHUNK) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def meta(sha: str = SHA, n: int = 3) -> bytes:
    msg = m.ArtifactMeta(
        sha256=sha, name="m.tflite", format="tflite", size=len(DATA), chunk_size=CHUNK, chunks=n
    )
    return codec.encode(msg)


def chunk_message(index: int, payload: bytes, sha: str = SHA) -> tuple[str, bytes]:
    return T.artifact_chunk(sha, index), payload


def meta_message(sha: str = SHA, n: int = 3) -> tuple[str, bytes]:
    return T.artifact_meta(sha), meta(sha, n)


def deliver(store: ArtifactStore, messages: Sequence[tuple[str, bytes]]) -> None:
    for topic, payload in messages:
        store.on_message(T.parse(topic), Message(topic, payload, qos=1, retain=True))


class FakeConnection:
    """Delivers the retained artifact messages when the store subscribes."""

    def __init__(self, store: ArtifactStore, messages: Sequence[tuple[str, bytes]]) -> None:
        self.store = store
        self.messages = messages
        self.subscribed: list[str] = []
        self.unsubscribed: list[str] = []

    def subscribe(self, filters: Sequence[tuple[str, int]], timeout: float = 10.0) -> None:
        self.subscribed += [f for f, _qos in filters]
        deliver(self.store, self.messages)

    def unsubscribe(self, filters: Sequence[str]) -> None:
        self.unsubscribed += filters


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "cache", T)


def fetching(store: ArtifactStore, sha: str = SHA) -> _Fetch:
    fetch = _Fetch(sha)
    store._fetches[sha] = fetch
    return fetch


# ---- the cache --------------------------------------------------------------------------


def test_put_writes_the_file_under_its_hash(store: ArtifactStore) -> None:
    assert store.cached() == []  # no cache directory yet
    path = store.put(SHA, "tflite", DATA)
    assert path == store.dir / f"{SHA}.tflite"
    assert path.read_bytes() == DATA
    assert store.cached() == [SHA]
    assert [p.name for p in store.dir.iterdir()] == [f"{SHA}.tflite"]


def test_put_refuses_bytes_that_do_not_match(store: ArtifactStore) -> None:
    with pytest.raises(ProtocolError) as info:
        store.put(SHA, "tflite", DATA[:-1])
    assert info.value.code is Code.BAD_ARTIFACT
    assert SHA[:12] in info.value.message
    assert f"the {len(DATA) - 1} bytes received" in info.value.message
    assert not store.dir.exists() or list(store.dir.iterdir()) == []
    assert store.cached() == []


def test_path_per_format(store: ArtifactStore) -> None:
    assert store.path(SHA, "tflite").name == f"{SHA}.tflite"
    assert store.path(SHA, "edgetpu_tflite").name == f"{SHA}_edgetpu.tflite"
    assert store.path(SHA, "onnx").name == f"{SHA}.onnx"
    with pytest.raises(ProtocolError) as info:
        store.path(SHA, "pb")
    assert info.value.code is Code.UNSUPPORTED_FORMAT


def test_cached_lists_each_artifact_once(store: ArtifactStore) -> None:
    other = b"other model"
    other_sha = hashlib.sha256(other).hexdigest()
    store.put(SHA, "tflite", DATA)
    store.put(SHA, "onnx", DATA)
    store.put(other_sha, "edgetpu_tflite", other)
    (store.dir / "README.txt").write_text("not an artifact")
    (store.dir / ("Z" * 64 + ".tflite")).write_text("not a hash")
    assert store.cached() == sorted([SHA, other_sha])


def test_a_damaged_cached_file_is_detected_and_removed(store: ArtifactStore) -> None:
    path = store.put(SHA, "tflite", DATA)
    assert store._verified(SHA, "tflite") == path
    path.write_bytes(DATA[:100])
    assert store._verified(SHA, "tflite") is None
    assert not path.exists()
    assert store._verified(SHA, "tflite") is None  # missing: still None


def test_a_partial_write_is_not_a_cached_artifact(store: ArtifactStore) -> None:
    store.dir.mkdir(parents=True)
    (store.dir / f"{SHA}.tflite.part").write_bytes(DATA[:10])
    assert store.cached() == []


# ---- fetching ---------------------------------------------------------------------------


def test_chunks_out_of_order_are_assembled(store: ArtifactStore) -> None:
    parts = chunks()
    assert len(parts) == 3
    fetch = fetching(store)
    deliver(store, [chunk_message(2, parts[2]), meta_message(), chunk_message(0, parts[0])])
    deliver(store, [chunk_message(1, parts[1])])
    assert store._wait(fetch, timeout=1.0) == DATA


def test_a_leftover_chunk_past_the_count_is_ignored(store: ArtifactStore) -> None:
    parts = chunks()
    fetch = fetching(store)
    leftover = chunk_message(3, b"left over from an upload in bigger chunks")
    deliver(store, [leftover, *(chunk_message(i, p) for i, p in enumerate(parts))])
    deliver(store, [meta_message()])
    assert store._wait(fetch, timeout=1.0) == DATA


def test_missing_chunks_time_out_naming_them(store: ArtifactStore) -> None:
    parts = chunks()
    fetch = fetching(store)
    deliver(store, [meta_message(), chunk_message(1, parts[1])])
    with pytest.raises(ProtocolError) as info:
        store._wait(fetch, timeout=0.05)
    assert info.value.code is Code.BAD_ARTIFACT
    assert "chunks [0, 2] of 3 are missing" in info.value.message
    assert SHA[:12] in info.value.message


def test_no_meta_times_out_saying_so(store: ArtifactStore) -> None:
    fetch = fetching(store)
    deliver(store, [chunk_message(0, chunks()[0])])
    with pytest.raises(ProtocolError) as info:
        store._wait(fetch, timeout=0.05)
    assert info.value.code is Code.BAD_ARTIFACT
    assert "no artifacts/.../meta was found" in info.value.message


def test_messages_of_other_artifacts_and_empty_payloads_are_ignored(
    store: ArtifactStore,
) -> None:
    other = "cd" * 32
    fetch = fetching(store)
    deliver(store, [chunk_message(0, b"x", sha=other), meta_message(sha=other, n=1)])
    deliver(store, [chunk_message(0, b""), (T.artifact_meta(SHA), b"")])  # cleared retained
    assert fetch.meta is None and fetch.chunks == {}
    deliver(store, [(T.service_request("digits"), b"not an artifact")])
    assert fetch.meta is None and fetch.chunks == {}


def test_a_meta_for_another_hash_is_not_taken(store: ArtifactStore) -> None:
    fetch = fetching(store)
    topic, _ = meta_message()
    deliver(store, [(topic, meta(sha="cd" * 32))])  # payload names another artifact
    deliver(store, [(topic, b"{not json")])
    assert fetch.meta is None


def test_chunks_arriving_while_waiting(store: ArtifactStore) -> None:
    parts = chunks()
    fetch = fetching(store)
    deliver(store, [meta_message(), chunk_message(0, parts[0])])
    late = threading.Timer(
        0.05, deliver, args=(store, [chunk_message(2, parts[2]), chunk_message(1, parts[1])])
    )
    late.start()
    try:
        assert store._wait(fetch, timeout=5.0) == DATA
    finally:
        late.join()


def test_get_fetches_checks_and_caches(store: ArtifactStore) -> None:
    parts = chunks()
    retained = [chunk_message(1, parts[1]), meta_message(), chunk_message(2, parts[2])]
    retained.append(chunk_message(0, parts[0]))
    conn = FakeConnection(store, retained)
    path = store.get(cast(Connection, conn), SHA, "tflite", timeout=1.0)
    assert path.read_bytes() == DATA
    assert sorted(conn.subscribed) == sorted([T.artifact_meta(SHA), T.artifact_chunks(SHA)])
    assert sorted(conn.unsubscribed) == sorted(conn.subscribed)
    assert store._fetches == {}
    # Cached now: no second fetch.
    again = FakeConnection(store, [])
    assert store.get(cast(Connection, again), SHA, "tflite", timeout=1.0) == path
    assert again.subscribed == []


def test_get_refetches_a_damaged_file(store: ArtifactStore) -> None:
    store.put(SHA, "tflite", DATA).write_bytes(b"bit rot")
    messages = [meta_message(), *(chunk_message(i, p) for i, p in enumerate(chunks()))]
    conn = FakeConnection(store, messages)
    path = store.get(cast(Connection, conn), SHA, "tflite", timeout=1.0)
    assert path.read_bytes() == DATA
    assert conn.subscribed


def test_get_refuses_chunks_that_do_not_add_up(store: ArtifactStore) -> None:
    parts = chunks()
    messages = [meta_message(), *(chunk_message(i, p[::-1]) for i, p in enumerate(parts))]
    conn = FakeConnection(store, messages)
    with pytest.raises(ProtocolError) as info:
        store.get(cast(Connection, conn), SHA, "tflite", timeout=1.0)
    assert info.value.code is Code.BAD_ARTIFACT
    assert store.cached() == []
    assert conn.unsubscribed
