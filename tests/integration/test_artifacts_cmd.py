"""`mqinfer artifacts list|rm|gc` against a real Mosquitto, with real deploys, checked with
the real mosquitto_sub."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson

from mqinfer.broker.ports import free_port
from tests.integration.harness import (
    REPO,
    Broker,
    CuttingProxy,
    need_client_tool,
    need_mosquitto,
)
from tests.integration.requests import mqinfer as run

MODELS = REPO / "models" / "digits"
TFLITE = MODELS / "digits_int8.tflite"
ONNX = MODELS / "digits.onnx"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def mqinfer(broker: Broker, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mqinfer", *args, "--broker", broker.url, "--prefix", prefix],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def ok(broker: Broker, prefix: str, *args: str) -> str:
    done = mqinfer(broker, prefix, *args)
    assert done.returncode == 0, f"mqinfer {' '.join(args)}: {done.returncode}\n{done.stderr}"
    return done.stdout


def listed(broker: Broker, prefix: str, *extra: str) -> dict[str, dict[str, Any]]:
    items = orjson.loads(ok(broker, prefix, "artifacts", "list", "--json", *extra))
    return {item["sha256"]: item for item in items}


def retained(broker: Broker, prefix: str) -> dict[str, set[str]]:
    """What mosquitto_sub sees under artifacts/: {sha256: {"meta", "chunk/0", ...}}."""
    out = subprocess.run(
        [
            need_client_tool("mosquitto_sub"),
            "-h",
            "127.0.0.1",
            "-p",
            str(broker.port),
            "-t",
            f"{prefix}/artifacts/#",
            "-W",
            "2",
            "-v",
        ],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert out.returncode in (0, 27), out.stderr  # 27: -W ran out, as it must here
    found: dict[str, set[str]] = {}
    pattern = re.escape(prefix).encode() + rb"/artifacts/([0-9a-f]{64})/(meta|chunk/\d+) "
    for sha, what in re.findall(pattern, out.stdout):
        found.setdefault(sha.decode(), set()).add(what.decode())
    return found


def test_gc_removes_exactly_the_artifact_no_spec_uses(mosquitto: Broker, prefix: str) -> None:
    ints, floats = sha256(TFLITE), sha256(ONNX)
    ok(mosquitto, prefix, "deploy", "--model", str(TFLITE), "--name", "ints")
    ok(mosquitto, prefix, "deploy", "--model", str(ONNX), "--name", "floats")

    found = listed(mosquitto, prefix)
    assert set(found) == {ints, floats}
    assert found[ints]["used_by"] == ["ints"]
    assert found[floats]["used_by"] == ["floats"]
    assert (found[ints]["size"], found[ints]["format"]) == (TFLITE.stat().st_size, "tflite")
    assert (found[floats]["name"], found[floats]["chunks"]) == ("digits.onnx", 1)
    text = ok(mosquitto, prefix, "artifacts", "list")
    assert re.search(rf"^{ints[:12]} .* digits_int8\.tflite .* ints$", text, re.M), text
    assert "0 used by no service" in text

    ok(mosquitto, prefix, "undeploy", "floats")
    assert listed(mosquitto, prefix)[floats]["used_by"] == []

    # Just uploaded: kept by the default --min-age (a deploy may be about to publish its spec).
    out = ok(mosquitto, prefix, "artifacts", "gc")
    assert f"kept {floats[:12]} (digits.onnx" in out
    assert "removed 0 artifacts" in out
    out = ok(mosquitto, prefix, "artifacts", "gc", "--min-age", "0", "--dry-run")
    assert f"would remove {floats[:12]} (digits.onnx, 1 chunk" in out
    assert retained(mosquitto, prefix) == {ints: {"meta", "chunk/0"}, floats: {"meta", "chunk/0"}}

    out = ok(mosquitto, prefix, "artifacts", "gc", "--min-age", "0")
    assert f"removed {floats[:12]} (digits.onnx" in out
    assert "removed 1 artifact (163.5 kB); kept 1 in use" in out
    # No retained message of the unused one is left; the used one is whole.
    assert retained(mosquitto, prefix) == {ints: {"meta", "chunk/0"}}
    assert set(listed(mosquitto, prefix)) == {ints}


def test_list_cut_off_while_reading_reads_it_again(mosquitto: Broker, prefix: str) -> None:
    """`artifacts list` whose connection is dropped while the retained metas and specs come
    in reads them again on a new connection: it never lists part of them as the whole."""
    ok(mosquitto, prefix, "deploy", "--model", str(TFLITE), "--name", "ints")
    ok(mosquitto, prefix, "deploy", "--model", str(ONNX), "--name", "floats")
    proxy = CuttingProxy(mosquitto.port)
    proxy.cut_after(600, from_broker=True)  # two metas and two specs are more
    try:
        out = run("artifacts", "list", "--json", "--broker", proxy.url, "--prefix", prefix)
    finally:
        proxy.close()
    assert out.returncode == 0, out.stderr
    assert proxy.cuts == 1
    assert "; connecting again (1 of 5)" in out.stderr, out.stderr
    found = {item["sha256"]: item["used_by"] for item in orjson.loads(out.stdout)}
    assert found == {sha256(TFLITE): ["ints"], sha256(ONNX): ["floats"]}


def test_rm_refuses_what_a_spec_uses_and_names_the_services(mosquitto: Broker, prefix: str) -> None:
    ints = sha256(TFLITE)
    ok(mosquitto, prefix, "deploy", "--model", str(TFLITE), "--name", "whole")
    ok(mosquitto, prefix, "deploy", "--model", str(TFLITE), "--name", "piped", "--segments", "2")
    found = listed(mosquitto, prefix)
    segments = sorted(sha for sha in found if sha != ints)
    assert len(segments) == 2
    # A pipeline uses its segments, not the whole model (its nodes never fetch that).
    assert found[ints]["used_by"] == ["whole"]
    assert all(found[s]["used_by"] == ["piped"] for s in segments)

    done = mqinfer(mosquitto, prefix, "artifacts", "rm", ints, segments[0][:8])
    assert done.returncode == 2, done.stderr
    assert f"{ints[:12]} (digits_int8.tflite, 1 chunk, 49.9 kB) is used by service whole:" in (
        done.stderr
    )
    assert f"{segments[0][:12]} (digits_int8.seg" in done.stderr
    assert "is used by service piped" in done.stderr
    assert "nothing removed" in done.stderr
    assert set(retained(mosquitto, prefix)) == {ints, *segments}

    done = mqinfer(mosquitto, prefix, "artifacts", "rm", "0" * 64)
    assert done.returncode == 1
    assert f"not on the broker under {prefix}/artifacts/: {'0' * 64}" in done.stderr
    done = mqinfer(mosquitto, prefix, "artifacts", "rm", "digits")
    assert done.returncode == 2
    assert "expected its sha256 (64 lowercase hex digits)" in done.stderr

    out = ok(mosquitto, prefix, "artifacts", "rm", "--force", segments[0][:8])
    assert f"removed {segments[0][:12]}" in out
    assert "(still used by piped)" in out
    assert retained(mosquitto, prefix) == {
        ints: {"meta", "chunk/0"},
        segments[1]: {"meta", "chunk/0"},
    }
    ok(mosquitto, prefix, "undeploy", "whole")
    out = ok(mosquitto, prefix, "artifacts", "rm", ints)
    assert f"removed {ints[:12]} (digits_int8.tflite, 1 chunk, 49.9 kB)\n" == out
    assert retained(mosquitto, prefix) == {segments[1]: {"meta", "chunk/0"}}


def test_scan_chunks_finds_an_upload_cut_off_before_its_meta(
    mosquitto: Broker, prefix: str
) -> None:
    """An upload that stopped after some chunks left no meta: only reading the chunks
    finds it, and gc --scan-chunks clears them."""
    data = b"half a model"
    cut = hashlib.sha256(data).hexdigest()
    pub = need_client_tool("mosquitto_pub")
    for i in (0, 1):
        topic = f"{prefix}/artifacts/{cut}/chunk/{i}"
        base = [pub, "-h", "127.0.0.1", "-p", str(mosquitto.port), "-q", "1", "-r"]
        subprocess.run([*base, "-t", topic, "-m", data.decode()], check=True, timeout=30)
    ok(mosquitto, prefix, "deploy", "--model", str(TFLITE), "--name", "whole")
    assert set(listed(mosquitto, prefix)) == {sha256(TFLITE)}

    found = listed(mosquitto, prefix, "--scan-chunks")
    assert found[cut]["state"] == "incomplete"
    assert found[cut]["chunks"] == 2
    text = ok(mosquitto, prefix, "artifacts", "list", "--scan-chunks")
    assert re.search(rf"^{cut[:12]} +- +2 +- +incomplete upload \(no meta\) +- +-$", text, re.M)

    out = ok(mosquitto, prefix, "artifacts", "gc", "--min-age", "0")
    assert "removed 0 artifacts" in out  # without --scan-chunks it is not seen
    out = ok(mosquitto, prefix, "artifacts", "gc", "--min-age", "0", "--scan-chunks")
    assert f"removed {cut[:12]} (incomplete upload: no meta, 2 chunks)" in out
    assert retained(mosquitto, prefix) == {sha256(TFLITE): {"meta", "chunk/0"}}


def test_an_account_that_may_not_write_artifacts_is_told_so(tmp_path: Path, prefix: str) -> None:
    """Mosquitto acknowledges a publish its ACL refuses and drops it: the command reads the
    artifacts back and says they are still there, instead of reporting them removed."""
    need_mosquitto()
    site = tmp_path / "site"
    made = subprocess.run(
        [sys.executable, "-m", "mqinfer", "accounts", "--out", str(site), "--prefix", prefix,
         "--operator", "ops", "--observer", "audit"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    # An auditor that reads the whole tree and writes nothing.
    acl = (site / "mqinfer.acl").read_text() + f"\nuser audit\ntopic read {prefix}/#\n"
    (site / "audit.acl").write_text(acl)
    broker = Broker(
        "mosquitto", free_port(), tmp_path, passwd=site / "mqinfer.passwd", acl=site / "audit.acl"
    )
    broker.start()
    try:
        ops = ["--username", "ops", "--password-file", str(site / "secrets" / "ops")]
        audit = ["--username", "audit", "--password-file", str(site / "secrets" / "audit")]
        ok(broker, prefix, "deploy", "--model", str(ONNX), "--name", "floats", *ops)
        ok(broker, prefix, "undeploy", "floats", *ops)
        floats = sha256(ONNX)

        done = mqinfer(broker, prefix, "artifacts", "gc", "--min-age", "0", *audit)
        assert done.returncode == 1, done.stdout + done.stderr
        assert f"the broker still has {floats[:12]} (digits.onnx, 1 chunk, 163.5 kB)" in (
            done.stderr
        )
        assert f"may the account write {prefix}/artifacts/#" in done.stderr
        assert set(listed(broker, prefix, *audit)) == {floats}

        out = ok(broker, prefix, "artifacts", "gc", "--min-age", "0", *ops)
        assert f"removed {floats[:12]}" in out
        assert listed(broker, prefix, *ops) == {}
    finally:
        broker.stop()
