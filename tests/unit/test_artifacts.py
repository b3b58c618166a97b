"""The node's artifact cache and the fetcher that fills it (no broker: the test delivers
the retained messages when the fetcher subscribes)."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from mqinfer.node.artifacts import ArtifactStore
from mqinfer.node.fetch import Fetcher
from mqinfer.protocol import codec
from mqinfer.protocol import messages as m
from mqinfer.protocol.errors import Code, ProtocolError
from mqinfer.protocol.topics import Topics

T = Topics()
DATA = bytes(range(256)) * 40 + b"tail"  # 10244 bytes
SHA = hashlib.sha256(DATA).hexdigest()
CHUNK = 4096


def chunks(data: bytes = DATA, size: int = CHUNK) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def meta(sha: str = SHA, size: int = len(DATA), fmt: str = "tflite") -> bytes:
    n = -(-size // CHUNK)
    msg = m.ArtifactMeta(
        sha256=sha, name="m.tflite", format=fmt, size=size, chunk_size=CHUNK, chunks=n
    )
    return codec.encode(msg)


def retained(data: bytes = DATA, sha: str = SHA) -> list[tuple[str, bytes]]:
    """What the broker holds for an uploaded artifact."""
    out = [(T.artifact_chunk(sha, i), p) for i, p in enumerate(chunks(data))]
    return [*out, (T.artifact_meta(sha), meta(sha, len(data)))]


class Broker:
    """Delivers retained messages matching what the fetcher subscribes to, like a broker."""

    def __init__(self, messages: Sequence[tuple[str, bytes]] = ()) -> None:
        self.messages = list(messages)
        self.fetcher: Fetcher | None = None
        self.subscribed: list[str] = []
        self.unsubscribed: list[str] = []
        self.lock = threading.Lock()

    def subscribe(self, filters: Sequence[tuple[str, int]], timeout: float = 10.0) -> None:
        assert self.fetcher is not None
        with self.lock:
            self.subscribed += [f for f, _ in filters]
        for want, _ in filters:
            for topic, payload in self.messages:
                if want == topic or (want.endswith("/+") and topic.startswith(want[:-1])):
                    self.fetcher.on_message(T.parse(topic), payload)

    def unsubscribe(self, filters: Sequence[str]) -> None:
        with self.lock:
            self.unsubscribed += filters


def fetcher(
    store: ArtifactStore,
    broker: Broker,
    max_bytes: int = 1 << 30,
    meta_wait: float = 0.3,
    chunk_wait: float = 0.5,
) -> Fetcher:
    f = Fetcher(
        store,
        T,
        lambda: broker,
        lambda: max_bytes,
        meta_wait=meta_wait,
        chunk_wait=chunk_wait,
    )
    broker.fetcher = f
    return f


def failure(future: object) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        future.result(timeout=10)  # type: ignore[attr-defined]
    return info.value


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "cache")


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


@pytest.mark.parametrize(
    "artifact", ["/tmp/victim/other", "../../victim/other", "a" * 63, "A" * 64, "", "x/" + "a" * 62]
)
def test_an_artifact_that_is_not_a_hash_names_no_file(
    store: ArtifactStore, tmp_path: Path, artifact: str
) -> None:
    """A path (or anything else) in place of a sha256 is refused before a path is built."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "other.onnx").write_bytes(b"x")
    with pytest.raises(ProtocolError) as info:
        store.path(artifact, "onnx")
    assert info.value.code is Code.BAD_MESSAGE
    assert "expected 64 lowercase hex digits" in info.value.message
    assert (victim / "other.onnx").read_bytes() == b"x"


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
    assert store.verified(SHA, "tflite") == path
    path.write_bytes(DATA[:100])
    assert store.verified(SHA, "tflite") is None
    assert not path.exists()
    assert store.verified(SHA, "tflite") is None  # missing: still None


def test_a_partial_write_is_not_a_cached_artifact(store: ArtifactStore) -> None:
    store.dir.mkdir(parents=True)
    (store.dir / f"{SHA}.tflite.part").write_bytes(DATA[:10])
    assert store.cached() == []


def test_a_cache_that_cannot_be_written_is_a_storage_failure(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the cache directory should be")
    store = ArtifactStore(blocked / "cache")
    with pytest.raises(ProtocolError) as info:
        store.put(SHA, "tflite", DATA)
    assert info.value.code is Code.STORAGE_FAILED
    assert "could not write 10244 bytes" in info.value.message


def test_a_model_larger_than_the_free_disk_is_refused_before_fetching(
    store: ArtifactStore,
) -> None:
    with pytest.raises(ProtocolError) as info:
        store.check_room(1 << 60)
    assert info.value.code is Code.STORAGE_FAILED
    assert "MB free" in info.value.message


# ---- fetching ---------------------------------------------------------------------------


def test_chunks_are_assembled_checked_and_cached(store: ArtifactStore) -> None:
    messages = retained()
    broker = Broker([messages[1], messages[3], messages[0], messages[2]])  # any order
    f = fetcher(store, broker)
    try:
        path = f.fetch(SHA, "tflite").result(timeout=10)
        assert path.read_bytes() == DATA
        assert store.cached() == [SHA]
        assert sorted(broker.subscribed) == sorted([T.artifact_meta(SHA), T.artifact_chunks(SHA)])
        deadline = time.monotonic() + 5
        while sorted(broker.unsubscribed) != sorted(broker.subscribed):
            assert time.monotonic() < deadline, "the fetch did not unsubscribe"
            time.sleep(0.01)
        # Cached now: no second fetch.
        again = Broker()
        g = fetcher(store, again)
        assert g.fetch(SHA, "tflite").result(timeout=10) == path
        assert again.subscribed == []
        g.close()
    finally:
        f.close()


def test_a_damaged_cached_file_is_fetched_again(store: ArtifactStore) -> None:
    store.put(SHA, "tflite", DATA).write_bytes(b"bit rot")
    f = fetcher(store, Broker(retained()))
    try:
        assert f.fetch(SHA, "tflite").result(timeout=10).read_bytes() == DATA
    finally:
        f.close()


def test_a_model_never_uploaded_fails_fast_as_missing(store: ArtifactStore) -> None:
    f = fetcher(store, Broker(), meta_wait=0.3)
    try:
        error = failure(f.fetch(SHA, "tflite"))
        assert error.code is Code.ARTIFACT_MISSING
        assert "no artifacts/" in error.message and "after 0.3 s" in error.message
    finally:
        f.close()


def test_missing_models_fail_side_by_side_and_hold_up_no_other(store: ArtifactStore) -> None:
    """40 deploys of models that are not on the broker, then a real one: the real one is
    not queued behind them, and they all fail after one wait, not one wait each."""
    bogus = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(40)]
    f = fetcher(store, Broker(retained()), meta_wait=0.5)
    try:
        started = time.monotonic()
        failing = [f.fetch(sha, "onnx") for sha in bogus]
        real = f.fetch(SHA, "tflite")
        assert real.result(timeout=10).read_bytes() == DATA
        real_took = time.monotonic() - started
        codes = {failure(fut).code for fut in failing}
        assert codes == {Code.ARTIFACT_MISSING}
        all_took = time.monotonic() - started
        assert real_took < 0.5 < all_took  # the real one came before the first wait ended
        assert f.pending() == 0
    finally:
        f.close()


def test_missing_chunks_fail_naming_them(store: ArtifactStore) -> None:
    messages = retained()
    f = fetcher(store, Broker([messages[0], messages[3]]), chunk_wait=0.3)
    try:
        error = failure(f.fetch(SHA, "tflite"))
        assert error.code is Code.BAD_ARTIFACT
        assert "chunks [1, 2] of 3 are missing" in error.message
        assert store.cached() == []
    finally:
        f.close()


def test_a_chunk_of_the_wrong_length_is_refused(store: ArtifactStore) -> None:
    messages = retained()
    messages[1] = (messages[1][0], messages[1][1] + b"more")
    f = fetcher(store, Broker(messages))
    try:
        error = failure(f.fetch(SHA, "tflite"))
        assert error.code is Code.BAD_ARTIFACT
        assert f"chunk 1 is {CHUNK + 4} bytes; its meta says {CHUNK}" in error.message
    finally:
        f.close()


def test_chunks_that_do_not_add_up_are_refused(store: ArtifactStore) -> None:
    messages = [(t, p[::-1]) if "/chunk/" in t else (t, p) for t, p in retained()]
    f = fetcher(store, Broker(messages))
    try:
        error = failure(f.fetch(SHA, "tflite"))
        assert error.code is Code.BAD_ARTIFACT
        assert "hash to" in error.message
        assert store.cached() == []
    finally:
        f.close()


def test_a_model_over_the_memory_limit_is_refused_before_its_chunks(
    store: ArtifactStore,
) -> None:
    broker = Broker(retained())
    f = fetcher(store, broker, max_bytes=4096)
    try:
        error = failure(f.fetch(SHA, "tflite"))
        assert error.code is Code.TOO_LARGE
        assert "at most 0.0 MB" in error.message
        assert T.artifact_chunks(SHA) not in broker.subscribed
    finally:
        f.close()


@pytest.mark.parametrize(
    ("field", "value", "said"),
    [
        ("chunks", 10**10, "less than or equal to 1000000"),
        ("chunk_size", 10**9, "less than or equal to 262144"),
        ("size", 10**12, "do not hold"),
        ("format", "onnx", "uploaded as onnx; the spec says tflite"),
    ],
)
def test_a_meta_out_of_bounds_is_refused(
    store: ArtifactStore, field: str, value: object, said: str
) -> None:
    import orjson

    data = orjson.loads(meta())
    data[field] = value
    messages = [*retained()[:-1], (T.artifact_meta(SHA), orjson.dumps(data))]
    f = fetcher(store, Broker(messages))
    try:
        error = failure(f.fetch(SHA, "tflite"))
        assert error.code is Code.BAD_ARTIFACT
        assert said in error.message
    finally:
        f.close()


def test_one_fetch_per_artifact(store: ArtifactStore) -> None:
    broker = Broker(retained())
    f = fetcher(store, broker)
    try:
        a, b = f.fetch(SHA, "tflite"), f.fetch(SHA, "tflite")
        assert a is b
        assert a.result(timeout=10).read_bytes() == DATA
        assert broker.subscribed.count(T.artifact_meta(SHA)) == 1
    finally:
        f.close()


def test_messages_of_other_artifacts_are_ignored(store: ArtifactStore) -> None:
    other = hashlib.sha256(b"x").hexdigest()
    f = fetcher(store, Broker())
    try:
        for topic, payload in retained():
            f.on_message(T.parse(topic.replace(SHA, other)), payload)  # nobody fetches it
        assert f.pending() == 0
    finally:
        f.close()
