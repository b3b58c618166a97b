"""The commands behave like those of any installed package, and are never silently wrong."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import orjson
from PIL import Image

from mqinfer.broker.ports import free_port
from tests.integration.harness import Broker, InProcessCoordinator, Procs, wait_for
from tests.integration.requests import DIGITS, Requester, deploy, mqinfer

MQINFER = [sys.executable, "-m", "mqinfer"]


def test_version_prints_the_package_version() -> None:
    out = subprocess.run([*MQINFER, "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"mqinfer {version('mqinfer')}\n"


def _descendants(pid: int) -> set[int]:
    """Every live process below `pid`, found through the parent ids in /proc/*/stat."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # pid (comm) state ppid ...; comm may hold spaces and parentheses.
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z":
            parents[int(entry.name)] = int(fields[1])
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        children = {p for p, pp in parents.items() if pp == parent and p not in found}
        found |= children
        todo.extend(children)
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def test_demo_stops_everything_it_started_on_sigterm(tmp_path: Path) -> None:
    """SIGTERM (what `timeout`, systemd and CI send) to `mqinfer demo --keep` alone stops its
    broker, coordinator and nodes, as Ctrl-C does."""
    log = tmp_path / "demo.log"
    with open(log, "wb") as out:
        demo = subprocess.Popen(
            [*MQINFER, "demo", "--keep", "--port", str(free_port())],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,  # its own process group, cleaned up below whatever happens
        )
    try:
        wait_for(
            lambda: "demo: running" in log.read_text() or demo.poll() is not None,
            "the demo to serve",
            timeout=120,
        )
        assert demo.poll() is None, log.read_text()
        children = _descendants(demo.pid)
        assert len(children) >= 4, (children, log.read_text())  # broker, coordinator, 2 nodes

        os.kill(demo.pid, signal.SIGTERM)  # the demo process only, not its group
        assert demo.wait(60) == 0, log.read_text()
        wait_for(lambda: not any(_alive(p) for p in children), "the demo's processes to stop", 30)
        text = log.read_text()
        assert "stopped the nodes and the coordinator cleanly" in text
        assert "did not stop on SIGTERM" not in text
        assert "XNNPACK" not in text  # the nodes loaded the model quietly
        assert "Traceback" not in text, text
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(demo.pid, signal.SIGKILL)
        demo.wait()


def test_json_integers_are_values_not_quantized_integers(
    broker: Broker, prefix: str, procs: Procs, coordinator: InProcessCoordinator
) -> None:
    """[T-REQ-3] A thresholded digit written with the integers 1 and 0 (as JavaScript writes
    1.0 and 0.0) is classified as the same digit written with floats; the quantized
    integers go in as they are only with `"quantized": true`."""
    procs.node(broker, prefix, "n1")
    wait_for(lambda: coordinator.state("n1") == "online", "n1 online")
    deploy(broker, prefix, "--model", str(DIGITS / "digits_int8.tflite"), "--name", "digits")
    samples = sorted((DIGITS / "samples").glob("digit_*.png"))
    assert len(samples) == 5
    payloads: dict[str, bytes] = {}
    for i, path in enumerate(samples):
        pixels = np.array(Image.open(path).convert("L"), dtype=np.int64).reshape(8, 8, 1)
        # The model takes pixel / 255 (manifest: mean 0, std 255), values in 0..1.
        bits = (pixels >= 128).astype(np.int64)
        ints = orjson.dumps({"inputs": bits.tolist()})
        assert b"[[[0],[0]," in ints and b".0" not in ints  # really integers on the wire
        payloads[f"int-{i}"] = ints
        payloads[f"float-{i}"] = orjson.dumps({"inputs": bits.astype(float).tolist()})
        payloads[f"png-{i}"] = path.read_bytes()
        quantized = (pixels - 128).tolist()  # q = value / (1/255) - 128 = pixel - 128
        payloads[f"q-{i}"] = orjson.dumps({"inputs": quantized, "quantized": True})
    req = Requester(broker, prefix, "digits")
    try:
        results = req.run(payloads)
    finally:
        req.close()
    failed = {k: r["error"] for k, r in results.items() if not r["ok"]}
    assert not failed, failed
    for i, path in enumerate(samples):
        label = path.name.split("_")[1]
        top = {kind: results[f"{kind}-{i}"]["top"][0] for kind in ("int", "float", "png", "q")}
        assert top["int"]["label"] == label, (path.name, top)
        assert top["int"] == top["float"], (path.name, top)
        assert top["png"]["label"] == label, (path.name, top)
        assert results[f"q-{i}"]["outputs"] == results[f"png-{i}"]["outputs"], path.name


def _infer(broker: Broker, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`mqinfer infer` as a user runs it, with a --timeout far beyond the test's limit: an
    answer that only came after waiting it out would fail the test."""
    return mqinfer(
        "infer", *args, "--timeout", "600", "--broker", broker.url, "--prefix", prefix, timeout=120
    )


def test_infer_for_a_service_that_does_not_exist_fails_at_once(
    broker: Broker, prefix: str, procs: Procs, coordinator: InProcessCoordinator
) -> None:
    """[T-SERVE-4] the coordinator's `unavailable` answer names the services there are;
    `mqinfer infer` says so once and exits 1 without waiting for its other requests."""
    procs.node(broker, prefix, "n1")
    wait_for(lambda: coordinator.state("n1") == "online", "n1 online")
    deploy(broker, prefix, "--model", str(DIGITS / "digits_int8.tflite"), "--name", "digits")
    samples = [str(p) for p in sorted((DIGITS / "samples").glob("*.png"))]
    out = _infer(broker, prefix, "nosuch", *samples)
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert out.stdout == ""
    assert out.stderr == (
        "mqinfer infer: error: no service named nosuch is deployed (services: digits)\n"
    )
    ok = _infer(broker, prefix, "digits", *samples)
    assert ok.returncode == 0, ok.stderr
    assert len(ok.stdout.splitlines()) == len(samples)


def test_infer_for_a_service_that_does_not_exist_without_a_coordinator(
    broker: Broker, prefix: str
) -> None:
    """With no coordinator to answer, the retained specs say which services exist; a
    deployed service's requests still wait for a coordinator, as they should."""
    # A spec on the broker (published by deploy without --wait), and no coordinator.
    out = mqinfer(
        "deploy",
        "--model",
        str(DIGITS / "digits_int8.tflite"),
        "--name",
        "digits",
        "--broker",
        broker.url,
        "--prefix",
        prefix,
    )
    assert out.returncode == 0, out.stderr
    sample = str(DIGITS / "samples" / "digit_3_2.png")
    out = _infer(broker, prefix, "nosuch", sample)
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "no service named nosuch is deployed (services: digits)" in out.stderr
    assert "no coordinator answered" in out.stderr
    waits = mqinfer(
        "infer", "digits", sample, "--timeout", "3", "--broker", broker.url, "--prefix", prefix
    )
    assert waits.returncode == 4, (waits.stdout, waits.stderr)  # waited: no result in time
    assert "no result within 3 s" in waits.stdout


_LOAD_DIRECTLY = """
from ai_edge_litert.interpreter import Interpreter
Interpreter(model_path={model!r}).allocate_tensors()
"""

_LOAD_THROUGH_THE_NODE = """
import logging, os
from mqinfer.node.runtimes import available_backends
from mqinfer.node.runtimes.litert import without_native_noise
logging.basicConfig(format="%(message)s")
with without_native_noise():  # what else is written meanwhile is kept
    os.write(2, b"a native line\\n")
    logging.warning("a log line")
    model = available_backends()["tflite"].load({model!r}, 1)
print(model.outputs[0].shape)
"""


def test_loading_a_tflite_model_writes_nothing_to_stderr() -> None:
    """LiteRT's C++ logger writes 'INFO: Created TensorFlow Lite XNNPACK delegate for CPU.'
    to fd 2 (TF_CPP_MIN_LOG_LEVEL does not reach it); a node loads models without it, and
    keeps everything else written to stderr meanwhile."""
    model = str(DIGITS / "digits_int8.tflite")
    direct = subprocess.run(
        [sys.executable, "-c", _LOAD_DIRECTLY.format(model=model)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert direct.returncode == 0, direct.stderr
    assert "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." in direct.stderr
    node = subprocess.run(
        [sys.executable, "-c", _LOAD_THROUGH_THE_NODE.format(model=model)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert node.returncode == 0, node.stderr
    assert node.stdout == "[1, 10]\n"
    assert node.stderr == "a native line\na log line\n"
