"""`mqinfer demo`: embedded broker, a coordinator and two nodes on this machine, then status."""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from types import FrameType

from mqinfer import deploy, infer
from mqinfer.broker.ports import free_port, port_is_free
from mqinfer.coordinator import status
from mqinfer.coordinator.registry import Registry
from mqinfer.mqtt import Brokers, BrokerURL, MQTTError
from mqinfer.node.runtimes import RUNTIME_MODULES
from mqinfer.protocol.topics import Topics
from mqinfer.servicefile import load_spec_file

HOST = "127.0.0.1"
NODES = ("demo-node-1", "demo-node-2")
# The digits classifier ships inside the package (mqinfer/demo_models/digits: the service
# file, the int8 model with its manifest and the sample digits, the same files as
# models/digits), so that the demo runs from an installed wheel in any directory.
DEMO_MODEL = ("demo_models", "digits")


def packaged_digits() -> Traversable:
    """The packaged digits service directory (service.yaml, the model, samples/)."""
    return resources.files("mqinfer").joinpath(*DEMO_MODEL)


@contextmanager
def as_directory(found: Traversable) -> Iterator[Path]:
    """A packaged directory as a real one. An installed package is on disk and is used
    where it lies; one imported from an archive is copied out first."""
    if isinstance(found, Path):
        yield found
        return
    with tempfile.TemporaryDirectory(prefix="mqinfer-digits-") as tmp:
        _copy_out(found, Path(tmp))
        yield Path(tmp)


def _copy_out(src: Traversable, dest: Path) -> None:
    for item in src.iterdir():
        if item.is_dir():
            (dest / item.name).mkdir()
            _copy_out(item, dest / item.name)
        else:
            with item.open("rb") as f, (dest / item.name).open("wb") as out:
                shutil.copyfileobj(f, out)


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "demo",
        help="run a whole cluster on this machine and show its status",
        description="Start the embedded broker (port 1883, or a free port if 1883 is taken), "
        "a coordinator and two nodes as separate processes, wait until both nodes are online, "
        "deploy the digits classifier on both (the copy of models/digits/service.yaml that "
        "ships in the package), classify its sample digits, print the cluster status, then stop "
        "everything (or keep it running with --keep). SIGTERM stops it and everything it "
        "started, as Ctrl-C does.",
    )
    p.add_argument("--port", type=int, default=1883, help="preferred broker port (default 1883)")
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the cluster running until Ctrl-C or SIGTERM, to explore it",
    )
    p.set_defaults(func=run, parser=p)


def _stop_on_sigterm() -> None:
    """Make SIGTERM (what `timeout`, systemd and CI send) unwind like Ctrl-C, so that the
    broker, coordinator and nodes started here are stopped too instead of left running.
    A second SIGTERM while they are being stopped is ignored: the stopping is bounded."""

    def handler(_sig: int, _frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


@contextmanager
def _process(name: str, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    cmd = [sys.executable, "-m", "mqinfer", *args]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                print(f"demo: {name} did not stop on SIGTERM; killing it", file=sys.stderr)
                proc.kill()
                proc.wait()


def _wait_online(url: Brokers, topics: Topics, deadline: float) -> Registry:
    while True:
        try:
            registry = status.collect(url, topics, protocol="3.1.1", settle=0.3)
            nodes_up = all(
                n in registry.nodes and registry.nodes[n].state == "online" for n in NODES
            )
            coord = registry.coordinator
            if nodes_up and coord is not None and coord.state == "online":
                return registry
        except MQTTError:
            pass  # the broker may still be starting
        if time.monotonic() > deadline:
            raise TimeoutError("the nodes did not come online within 60 s (see the log above)")
        time.sleep(0.5)


def _classify(url: Brokers, topics: Topics, digits: Path) -> bool:
    """Deploy the digits service on both nodes and classify the sample digits."""
    spec_file, model = load_spec_file(digits / "service.yaml")
    print(f"demo: deploying {spec_file.name} ({model.path.name}, {spec_file.replicas} replicas)")
    if deploy.deploy(url, topics, spec_file, model, wait=90, protocol="3.1.1") != 0:
        print("demo: error: the digits service did not become ready", file=sys.stderr)
        return False
    samples = sorted(digits.glob("samples/*.png"))
    results = infer.request(
        url, topics, spec_file.name, [p.read_bytes() for p in samples], 30, "3.1.1"
    )
    print("demo: classifying the sample digits (file name: digit_<label>_<index>.png)")
    right = 0
    for path, result in zip(samples, results, strict=True):
        line = infer.describe(result) if result else "no result"
        print(f"  {path.name}: {line}")
        if result and result.get("ok") and result["top"][0]["label"] == path.name.split("_")[1]:
            right += 1
    print(f"demo: {right} of {len(samples)} classified correctly")
    return all(r is not None and r.get("ok") for r in results)


def _wait_listening(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        if not port_is_free(HOST, port):
            return
        time.sleep(0.1)


def _missing() -> str | None:
    """Why the demo cannot run here, or None: the packaged model is gone, or no runtime
    for it imports (the nodes would never get the service ready)."""
    if not packaged_digits().joinpath("service.yaml").is_file():
        return "the packaged digits model (mqinfer/demo_models/digits) is missing: reinstall"
    for key in ("litert", "tflite_runtime"):
        try:
            importlib.import_module(RUNTIME_MODULES[key])
            return None
        except Exception:  # a broken native build raises more than ImportError
            continue
    return (
        "the demo's digits model is a .tflite file and no TFLite runtime imports here; "
        "install one with: pip install 'mqinfer[litert]'"
    )


def run(args: argparse.Namespace) -> int:
    _stop_on_sigterm()
    missing = _missing()
    if missing:
        print(f"demo: error: {missing}", file=sys.stderr)
        return 1
    port = args.port
    if not port_is_free(HOST, port):
        port = free_port(HOST)
        print(f"demo: port {args.port} is taken (another broker?); the embedded broker uses {port}")
    broker_url = f"mqtt://{HOST}:{port}"
    url, topics = BrokerURL.parse(broker_url), Topics()
    # The embedded broker speaks MQTT 3.1.1 only: say so rather than probe for MQTT 5.
    common = ["--broker", broker_url, "--mqtt-version", "3.1.1", "--log-level", "warning"]
    print(f"demo: embedded broker on {broker_url}; starting a coordinator and {len(NODES)} nodes")
    cache = tempfile.TemporaryDirectory(prefix="mqinfer-demo-")
    with (
        cache,
        as_directory(packaged_digits()) as digits,
        _process("broker", "broker", "--host", HOST, "--port", str(port)) as broker,
    ):
        _wait_listening(port, time.monotonic() + 30)
        nodes = [
            _process(
                n,
                "node",
                "--id",
                n,
                "--heartbeat",
                "1",
                "--cache-dir",
                f"{cache.name}/{n}",
                *common,
            )
            for n in NODES
        ]
        with _process("coordinator", "coordinator", "--id", "demo", *common), nodes[0], nodes[1]:
            try:
                _wait_online(url, topics, time.monotonic() + 60)
            except TimeoutError as e:
                print(f"demo: error: {e}", file=sys.stderr)
                return 1
            if not _classify(url, topics, digits):
                return 1
            registry = status.collect(url, topics, protocol="3.1.1", settle=0.3)
            print()
            print(status.as_text(status.as_json(registry)))
            print()
            if args.keep:
                sample = sorted(digits.glob("samples/*.png"))[0]
                print(f"try: mosquitto_sub -h {HOST} -p {port} -t 'mqinfer/#' -v -R")
                print(
                    f"     mosquitto_pub -h {HOST} -p {port} -V mqttv311 "
                    f"-t mqinfer/services/digits/request/cam-1 -f {sample}"
                )
                print(f"     mqinfer infer digits {digits}/samples/*.png --broker {broker_url}")
                print(f"     mqinfer status --broker {broker_url}")
                print("demo: running; Ctrl-C (or SIGTERM) stops it")
                try:
                    while broker.poll() is None:
                        time.sleep(0.5)
                except KeyboardInterrupt:
                    pass
        print(
            "demo: stopped the nodes and the coordinator cleanly "
            "(`mqinfer demo --keep` leaves the cluster running)"
        )
    return 0
