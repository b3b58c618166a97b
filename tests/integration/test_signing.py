"""Signed deploys on a real Mosquitto: keys made with `mqinfer keys generate`, specs signed
by `mqinfer deploy --sign-key`, nodes started with `--trust-key` (or MQINFER_TRUST_KEYS)
that run only what a trusted key signed and refuse the rest with `untrusted` before they
fetch anything."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from mqinfer.protocol.topics import Topics
from tests.integration.harness import (
    Broker,
    InProcessCoordinator,
    Observer,
    Procs,
    need_client_tool,
    wait_for,
)
from tests.integration.requests import DIGITS, REPO, deploy
from tests.integration.test_discovery import status_json
from tests.integration.test_serving import check_digits, ready_on, status

INT8 = DIGITS / "digits_int8.tflite"
F32 = DIGITS / "digits_f32.tflite"


@pytest.fixture
def broker(mosquitto: Broker) -> Broker:
    """These tests run against Mosquitto only (the fixtures that take `broker` follow)."""
    return mosquitto


@dataclass(frozen=True)
class KeyPair:
    key: Path
    pub: Path
    id: str


def generate(out: Path, name: str) -> KeyPair:
    run = subprocess.run(
        [sys.executable, "-m", "mqinfer", "keys", "generate", "--out", str(out), "--name", name],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert run.returncode == 0, run.stderr
    kid = run.stdout.strip()
    assert len(kid) == 16 and all(c in "0123456789abcdef" for c in kid), kid
    return KeyPair(out / f"{name}.key", out / f"{name}.pub", kid)


def deploy_failing(broker: Broker, prefix: str, *args: str) -> str:
    """`mqinfer deploy --wait` that must end with the service failed (exit 1); its stderr."""
    where = ["--broker", broker.url, "--prefix", prefix]
    out = subprocess.run(
        [sys.executable, "-m", "mqinfer", "deploy", *args, "--wait", "--timeout", "60", *where],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert out.returncode == 1, f"expected failed ({out.returncode}):\n{out.stdout}{out.stderr}"
    return out.stderr


def pub(broker: Broker, topic: str, *what: str) -> None:
    """A retained message published by hand with mosquitto_pub (`-m TEXT` or `-f FILE`)."""
    tool = need_client_tool("mosquitto_pub")
    args = [tool, "-p", str(broker.port), "-q", "1", "-r", "-t", topic, *what]
    subprocess.run(args, check=True, timeout=30, capture_output=True)


def node_replies(obs: Observer, prefix: str, node: str) -> list[dict[str, Any]]:
    return [r for r in obs.seen(Topics(prefix).node_reply(node)) if not r["ok"]]


def cached(procs: Procs, node: str) -> list[str]:
    folder = procs.tmp_path / f"cache-{node}"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_trusting_node_serves_signed_deploys_and_refuses_the_rest(
    broker: Broker,
    prefix: str,
    procs: Procs,
    coordinator: InProcessCoordinator,
    observer: Observer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """[T-SIGN-1] A node with --trust-key refuses an unsigned deploy and one signed by
    another key with `untrusted` (in the deployer's output, the node's reply, the status
    and `mqinfer status --json`), fetches nothing for them, and serves a signed one."""
    ops = generate(tmp_path / "keys", "ops")
    stranger = generate(tmp_path / "keys", "stranger")
    node = procs.node(broker, prefix, "n1", "--trust-key", str(ops.pub))
    wait_for(lambda: coordinator.state("n1") == "online", "n1 online")
    wait_for(lambda: f"runs only specs signed by trusted keys {ops.id}" in node.log(), "key log")

    # Unsigned: refused, and the reason reaches the deployer, the status and the reply.
    said = deploy_failing(broker, prefix, "--model", str(INT8), "--name", "digits")
    assert "untrusted: spec 'digits'" in said and "is unsigned" in said, said
    st = status(observer, prefix, "digits")
    assert st and st["state"] == "failed"
    [replica] = st["replicas"]
    assert replica["node"] == "n1" and replica["state"] == "failed"
    assert replica["reason"].startswith("untrusted: spec 'digits' (revision ")
    assert f"key ids {ops.id}" in replica["reason"] and "--sign-key" in replica["reason"]
    [reply] = node_replies(observer, prefix, "n1")
    assert reply["error"]["code"] == "untrusted"
    view = status_json(broker, prefix)
    [svc] = [s for s in view["services"] if s["name"] == "digits"]
    assert "untrusted" in svc["reason"] and "is unsigned" in svc["reason"]
    assert cached(procs, "n1") == [], "fetched before the signature was checked"

    # Signed by a key the node does not trust (given in the environment this time).
    monkeypatch.setenv("MQINFER_SIGN_KEY", str(stranger.key))
    said = deploy_failing(broker, prefix, "--model", str(INT8), "--name", "digits")
    monkeypatch.delenv("MQINFER_SIGN_KEY")
    assert f"signed by key {stranger.id}" in said, said
    assert "untrusted: spec 'digits'" in said
    assert f"signed by key {stranger.id}, which this node does not trust" in said
    assert f"expected a signature by one of the key ids {ops.id}" in said
    assert [r["error"]["code"] for r in node_replies(observer, prefix, "n1")] == ["untrusted"] * 2
    assert cached(procs, "n1") == []

    # Signed by the trusted key: it runs, and answers digits as the model itself does.
    out = deploy(
        broker, prefix, "--model", str(INT8), "--name", "digits", "--sign-key", str(ops.key)
    )
    assert f"signed by key {ops.id}" in out.stderr
    assert ready_on(observer, prefix, "digits", 1) == ["n1"]
    spec = observer.json(Topics(prefix).service_spec("digits"))
    assert spec and spec["signature"]["key"] == ops.id
    check_digits(broker, prefix, "digits", "digits_int8.tflite", {"n1"})


def test_a_spec_changed_after_signing_is_refused(
    broker: Broker,
    prefix: str,
    procs: Procs,
    coordinator: InProcessCoordinator,
    observer: Observer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """[T-SIGN-1] Someone who may publish specs takes a signed one and points it at another
    model that is on the broker: the node (trusting by MQINFER_TRUST_KEYS) refuses it
    without fetching that model, and the next signed deploy runs again."""
    ops = generate(tmp_path / "keys", "ops")
    # Both separators, and the same key twice: trusted once, named by its id.
    monkeypatch.setenv("MQINFER_TRUST_KEYS", f"{ops.pub}:{ops.pub},")
    node = procs.node(broker, prefix, "n1")
    monkeypatch.delenv("MQINFER_TRUST_KEYS")
    wait_for(lambda: coordinator.state("n1") == "online", "n1 online")
    wait_for(lambda: f"trusted keys {ops.id}\n" in node.log(), "the trusted key in the log")
    deploy(broker, prefix, "--model", str(INT8), "--name", "digits", "--sign-key", str(ops.key))
    assert ready_on(observer, prefix, "digits", 1) == ["n1"]
    # The other model goes onto the broker by hand, as one retained chunk and its meta.
    t = Topics(prefix)
    size = F32.stat().st_size
    meta = {"v": 1, "sha256": sha(F32), "name": F32.name, "format": "tflite", "size": size}
    meta |= {"chunk_size": 256 * 1024, "chunks": 1}
    pub(broker, t.artifact_chunk(sha(F32), 0), "-f", str(F32))
    pub(broker, t.artifact_meta(sha(F32)), "-m", orjson.dumps(meta).decode())
    assert cached(procs, "n1") == [f"{sha(INT8)}.tflite"]

    signed = observer.json(t.service_spec("digits"))
    assert signed and signed["signature"]["key"] == ops.id
    tampered = {
        **signed,
        "artifact": sha(F32),
        "model": F32.name,
        "size": F32.stat().st_size,
    }
    tampered.pop("manifest")
    pub(broker, t.service_spec("digits"), "-m", orjson.dumps(tampered).decode())

    def refused() -> dict[str, Any] | None:
        st = status(observer, prefix, "digits")
        return st if st and st["state"] == "failed" else None

    st = wait_for(refused, "the tampered spec refused")
    assert st["artifact"] == sha(F32)
    assert "untrusted: spec 'digits'" in st["reason"]
    assert f"the signature by key {ops.id} does not match its content" in st["reason"]
    assert node_replies(observer, prefix, "n1")[-1]["error"]["code"] == "untrusted"
    assert cached(procs, "n1") == [f"{sha(INT8)}.tflite"], "the tampered model was fetched"

    deploy(broker, prefix, "--model", str(INT8), "--name", "digits", "--sign-key", str(ops.key))
    assert ready_on(observer, prefix, "digits", 1) == ["n1"]


def test_a_node_without_trusted_keys_runs_any_spec(
    broker: Broker, prefix: str, procs: Procs, coordinator: InProcessCoordinator, observer: Observer
) -> None:
    """[T-SIGN-1] Without --trust-key nothing changes: an unsigned deploy runs."""
    assert "MQINFER_TRUST_KEYS" not in os.environ
    node = procs.node(broker, prefix, "n1")
    wait_for(lambda: coordinator.state("n1") == "online", "n1 online")
    deploy(broker, prefix, "--model", str(INT8), "--name", "digits")
    assert ready_on(observer, prefix, "digits", 1) == ["n1"]
    assert "no trusted keys (--trust-key): runs any spec" in node.log()
