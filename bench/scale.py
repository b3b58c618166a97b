"""Scale benchmark: one coordinator and `--nodes` simulated nodes (default 1000) on Mosquitto.

    python -m bench.scale [--nodes 1000] [--seconds 20] [--no-save]

The coordinator is a real `mqinfer coordinator` process. The nodes are simulated: each has
its own MQTT connection, client id, session and Will, and publishes what node/agent.py
publishes (retained caps and `online`, then a retained QoS 0 heartbeat every second), built
from the protocol's own models and topic builders. A few worker processes each drive a few
hundred paho clients from one selector loop, so a thousand nodes fit on a small machine.

Measured:
- how long the coordinator takes to register every node as online, from the first
  connect (read from the coordinator's own log: `node X: unknown -> online`);
- the coordinator's CPU with every node heartbeating at 1 Hz, per 1000 heartbeats/s,
  beside the in-process cost of reading one heartbeat (decode + registry);
- placement on a registry of that size: `place()` and a full `Provisioner.step`.

There is no baseline to compare with: the figures are absolute, measured in one run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import random
import re
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.enums import CallbackAPIVersion

from bench.common import REPO, Cluster, Report, machine, spread
from bench.simnodes import INTERVAL, Kit, SimStats, Simulators, node_beat, node_caps, node_ids
from mqinfer.coordinator.agent import read
from mqinfer.coordinator.placement import place
from mqinfer.coordinator.provision import Provisioner, SendCommand
from mqinfer.coordinator.registry import Registry
from mqinfer.mqtt import Message
from mqinfer.node.capabilities import probe_host, probe_runtimes, reference_ms
from mqinfer.protocol import codec
from mqinfer.protocol import messages as m
from mqinfer.protocol.errors import ProtocolError
from mqinfer.protocol.topics import DEFAULT_PREFIX, Kind, Topics
from tests.integration.harness import mosquitto_binary

MODEL = REPO / "models" / "digits" / "digits_int8.tflite"  # the spec placed in-process
SETTLE = 2.0  # seconds between the last node online and the CPU window
ONLINE_LIMIT = 60.0  # seconds for every node to be registered (a limit, not a goal)
PLACE_RUNS = 50


# ---- watching the cluster from outside ------------------------------------------------------

_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\S+) (\w+) (.*)$")
_CHANGE = re.compile(r"^node (\S+): (\S+) -> (\S+) \((.*)\)$")


class CoordinatorLog:
    """Reads the coordinator's log as it grows: when each node became online, lost nodes,
    warnings. Times are the log's own (wall clock, millisecond resolution)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.rest = b""
        self.online: dict[str, float] = {}  # node -> first time it went online
        self.lost: set[str] = set()
        self.by_heartbeat = 0  # registered by a live heartbeat that overtook the 'online'
        self.warnings = 0
        self.first_warning = ""

    def poll(self) -> None:
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        *lines, self.rest = (self.rest + data).split(b"\n")
        for raw in lines:
            line = _LINE.match(raw.decode(errors="replace"))
            if line is None:
                continue
            stamp, _name, level, text = line.groups()
            if level in ("WARNING", "ERROR", "CRITICAL"):
                self.warnings += 1
                self.first_warning = self.first_warning or text
            change = _CHANGE.match(text)
            if change is None:
                continue
            node, _old, new, why = change.groups()
            if new == "online" and node not in self.online:
                self.online[node] = _wall(stamp)
                self.by_heartbeat += why == "heartbeat"
            elif new == "lost":
                self.lost.add(node)


def _wall(stamp: str) -> float:
    """The logging module's asctime (local time) as Unix time."""
    return datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


class BeatCounter:
    """A subscriber like the coordinator: counts the live heartbeats the broker delivers, and
    tells when the coordinator is online."""

    def __init__(self, port: int, topics: Topics) -> None:
        self.count = 0
        self.coordinator_online = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_socket_open = _nodelay
        self.client.on_message = self._on_message
        self.state_topic = topics.coordinator_state()
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe([(topics.all_nodes(Kind.NODE_HEARTBEAT), 0), (self.state_topic, 1)])
        if not subscribed.wait(10):
            raise RuntimeError("heartbeat counter: no SUBACK")

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == self.state_topic:
            with contextlib.suppress(ProtocolError):
                if codec.decode_as(m.CoordinatorState, bytes(msg.payload)).state == "online":
                    self.coordinator_online.set()
        elif not msg.retain:
            self.count += 1

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _nodelay(_c: Any, _u: Any, sock: Any) -> None:
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def raise_open_files() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit, before the broker starts (it inherits it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if want > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def mosquitto_version() -> str:
    binary = mosquitto_binary()
    if binary is None:
        return "Mosquitto"
    out = subprocess.run([binary, "-h"], capture_output=True, text=True)
    found = re.search(r"version (\S+)", out.stdout + out.stderr)
    return f"Mosquitto {found.group(1)}" if found else "Mosquitto"


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far."""
    t = psutil.cpu_times()
    total = sum(t)
    return total - t.idle - getattr(t, "iowait", 0.0), total


# ---- the in-process placement figures -----------------------------------------------------


def build_registry(kit: Kit, ids: list[str], artifact: str) -> tuple[Registry, list[Message]]:
    """A registry filled the way the coordinator fills it (coordinator.agent.read), from the
    messages simulated nodes publish; nodes differ in cores, load, speed and cached models."""
    topics = Topics(kit.prefix)
    registry = Registry()
    rng = random.Random(1)
    now = time.monotonic()
    beats: list[Message] = []
    for i, node in enumerate(ids):
        session = 1_795_000_000_000 + i
        cores = rng.choice((2, 4, 4, 8))
        load = round(rng.uniform(0, cores), 2)
        caps = node_caps(kit, node, session, cores, [artifact] if rng.random() < 0.05 else [])
        caps = caps.model_copy(update={"speed_ms": round(kit.speed_ms * rng.uniform(0.9, 3), 3)})
        state = m.NodeState(node=node, state="online", session=session, ts=time.time())
        beat = node_beat(node, session, 0, 10.0, (load, load, load), 2048)
        beats.append(Message(topics.node_heartbeat(node), codec.encode(beat), 0, False))
        for topic, msg in ((topics.node_caps(node), caps), (topics.node_state(node), state)):
            read(topics, registry, Message(topic, codec.encode(msg), 1, True), now)
        read(topics, registry, beats[-1], now)
    return registry, beats


def timed(fn: Callable[[], object], runs: int, warmup: int = 5) -> list[float]:
    """Milliseconds per call of fn(), `runs` times after `warmup` calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


@dataclass
class PlacementFigures:
    place_ms: list[float]
    step_ms: list[float]
    tick_ms: list[float]
    read_us: list[float]


def placement_figures(kit: Kit, count: int) -> PlacementFigures:
    data = MODEL.read_bytes()
    artifact = hashlib.sha256(data).hexdigest()
    spec = m.ServiceSpec(
        name="digits",
        model=MODEL.name,
        artifact=artifact,
        format="tflite",
        size=len(data),
        replicas=3,
        revision="r1",
    )
    ids = node_ids(count)
    registry, beats = build_registry(kit, ids, artifact)
    assert all(r.state == "online" and r.caps for r in registry.nodes.values())
    topics = Topics(kit.prefix)
    now = time.monotonic()

    def read_all() -> None:
        for beat in beats:
            read(topics, registry, beat, now)

    read_us = [ms * 1000 / len(beats) for ms in timed(read_all, 10, warmup=1)]
    place_ms = timed(lambda: place(spec, registry.nodes, 3, {}), PLACE_RUNS)

    def first_step() -> None:
        p = Provisioner(grace=0.0)
        p.on_spec(spec.name, spec)
        sent = [a for a in p.step(registry, now) if isinstance(a, SendCommand)]
        assert len(sent) == 3, sent

    step_ms = timed(first_step, PLACE_RUNS)
    steady = Provisioner(grace=0.0)
    steady.on_spec(spec.name, spec)
    steady.step(registry, now)

    def tick() -> None:  # what the coordinator does every 0.2 s when nothing changes
        registry.overdue(now)
        steady.step(registry, now)

    tick_ms = timed(tick, PLACE_RUNS)
    return PlacementFigures(place_ms, step_ms, tick_ms, read_us)


# ---- the run --------------------------------------------------------------------------------


@dataclass
class Usage:
    """Counters at one moment; the difference of two is a measurement window."""

    at: float  # monotonic seconds (of a window: its length)
    coordinator: float  # CPU seconds
    broker: float
    simulators: float
    counter: float  # this process: mostly the heartbeat counter's network thread
    busy: float  # the whole machine: CPU seconds not idle, of `total`
    total: float
    delivered: int  # live heartbeats the counter received
    published: int  # heartbeats the simulators published

    def __sub__(self, other: Usage) -> Usage:
        pairs = zip(dataclasses.astuple(self), dataclasses.astuple(other), strict=True)
        return Usage(*(a - b for a, b in pairs))

    def core_percent(self, cpu_seconds: float) -> float:
        return 100 * cpu_seconds / self.at


@dataclass
class ClusterFigures:
    idle: float  # coordinator CPU share (of one core) before any node
    idle_seconds: float
    registered: float  # s from the first connect until the registry had every node online
    connacks: float  # ... until the last CONNACK
    announced: float  # ... until the last 'online' was published
    window: Usage
    log: CoordinatorLog
    sims: list[SimStats]


def run_cluster(kit: Kit, nodes: int, seconds: float, workers: int) -> ClusterFigures:
    with tempfile.TemporaryDirectory(prefix="mqinfer-bench-") as tmp:
        cluster = Cluster(Path(tmp))
        counter: BeatCounter | None = None
        sims: Simulators | None = None
        try:
            kit = dataclasses.replace(kit, prefix=cluster.prefix, port=cluster.broker.port)
            coordinator = cluster.procs.all[0]
            log = CoordinatorLog(coordinator.logfile)
            counter = BeatCounter(cluster.broker.port, Topics(cluster.prefix))
            if not counter.coordinator_online.wait(30):
                raise RuntimeError(f"the coordinator did not come online: {coordinator.log()}")
            assert cluster.broker.proc is not None
            coord_ps, broker_ps, this_ps = (
                psutil.Process(pid) for pid in (coordinator.proc.pid, cluster.broker.proc.pid, None)
            )

            idle_from = time.monotonic(), cpu_seconds([coord_ps])
            sims = Simulators(kit, node_ids(nodes), workers)
            sims.wait("ready", 60)
            time.sleep(max(0.0, 2.0 - (time.monotonic() - idle_from[0])))
            idle_seconds = time.monotonic() - idle_from[0]
            idle = (cpu_seconds([coord_ps]) - idle_from[1]) / idle_seconds

            sims.go.set()
            deadline = time.monotonic() + ONLINE_LIMIT
            while len(log.online) < nodes:
                sims.poll(0.05)
                log.poll()
                born: list[SimStats] = sims.reports["born"]
                failed = next((s.first_failure for s in born if s.failures), "")
                if len(born) == workers and failed:
                    raise RuntimeError(f"simulated nodes could not connect: {failed}")
                if coordinator.proc.poll() is not None:
                    raise RuntimeError(f"the coordinator exited: {coordinator.log()[-2000:]}")
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{len(log.online)} of {nodes} nodes online after {ONLINE_LIMIT:.0f} s; "
                        f"see {coordinator.logfile}"
                    )
            born = sims.wait("born", 30)
            first = min(s.first_connect for s in born)

            time.sleep(SETTLE)
            sims_ps = [psutil.Process(proc.pid) for proc in sims.procs]

            def usage() -> Usage:
                busy, total = machine_busy()
                return Usage(
                    time.monotonic(),
                    cpu_seconds([coord_ps]),
                    cpu_seconds([broker_ps]),
                    cpu_seconds(sims_ps),
                    cpu_seconds([this_ps]),
                    busy,
                    total,
                    counter.count if counter else 0,
                    sims.published,
                )

            before = usage()
            time.sleep(seconds)
            window = usage() - before
            log.poll()
            sims.stop.set()
            done: list[SimStats] = sims.wait("done", 30)
        finally:
            if sims is not None:
                sims.close()
            if counter is not None:
                counter.close()
            cluster.stop()
    return ClusterFigures(
        idle=idle,
        idle_seconds=idle_seconds,
        registered=max(log.online.values()) - first,
        connacks=max(s.last_connack for s in born) - first,
        announced=max(s.last_born for s in born) - first,
        window=window,
        log=log,
        sims=done,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.scale",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--nodes", type=int, default=1000, help="simulated nodes (default 1000)")
    p.add_argument(
        "--seconds", type=float, default=20.0, help="CPU measurement window (default 20)"
    )
    p.add_argument("--workers", type=int, default=3, help="simulator processes (default 3)")
    p.add_argument("--no-save", action="store_true", help="do not append to bench/RESULTS.md")
    args = p.parse_args(argv)
    if args.nodes < 1 or args.workers < 1 or args.seconds <= 0:
        p.error("--nodes and --workers: expected at least 1; --seconds: more than 0")
    n, workers = args.nodes, min(args.workers, args.nodes)
    report = Report(f"scale ({n} simulated nodes)")
    broker = mosquitto_version()

    soft, hard = raise_open_files()
    if soft < n + 64:  # the broker: one descriptor per connection, and a few more
        print(
            f"open files limit {soft} (hard {hard}) is too low for {n} connections to one "
            f"broker (needs ~{n + 64}): raise the hard limit (ulimit -Hn, systemd LimitNOFILE) "
            f"or run with --nodes {max(soft - 64, 1)}",
            file=sys.stderr,
        )
        return 1
    kit = Kit(DEFAULT_PREFIX, 0, probe_runtimes(), probe_host(), reference_ms())
    started = time.monotonic()
    run = run_cluster(kit, n, args.seconds, workers)
    cluster_seconds = time.monotonic() - started
    placed = placement_figures(kit, n)

    w = run.window
    report.figure(
        f"registration: {n} simulated nodes (own connection, Will and session each; {workers} "
        f"simulator processes) all online in the coordinator's registry {run.registered:.2f} s "
        f"after the first connect = {n / run.registered:.0f} nodes/s (last CONNACK at "
        f"{run.connacks:.2f} s = {n / run.connacks:.0f} connections/s, last 'online' published "
        f"at {run.announced:.2f} s); {broker}; {machine()}"
    )
    rate = w.delivered / w.at
    idle = (
        f"{100 * run.idle:.1f}% over {run.idle_seconds:.1f} s"
        if run.idle
        else f"below the 10 ms CPU accounting tick in {run.idle_seconds:.1f} s"
    )
    share = w.core_percent(w.coordinator)
    per_beat = 1e6 * w.coordinator / max(w.delivered, 1)
    bare = 1e6 * w.counter / max(w.delivered, 1)
    report.figure(
        f"coordinator CPU with {n} nodes heartbeating at {1 / INTERVAL:g} Hz: {share:.1f}% of "
        f"one core over {w.at:.0f} s = {share / (rate / 1000):.1f}% per 1000 heartbeats/s, "
        f"{per_beat:.0f} us per heartbeat (its 5 Hz ticks over {n} nodes included); idle with "
        f"no nodes {idle}; heartbeats delivered "
        f"{rate:.0f}/s to a subscriber (simulators published {w.published / w.at:.0f}/s); "
        f"{broker}; {machine()}"
    )
    read_us = statistics.median(placed.read_us)
    report.figure(
        f"per heartbeat: coordinator {per_beat:.0f} us of CPU = {per_beat / read_us:.1f}x its "
        f"decode + registry update measured in-process (coordinator.agent.read on a {n}-node "
        f"registry: {spread(placed.read_us)} us) and {per_beat / bare:.1f}x a bare paho "
        f"subscriber's (MQTT 5, loop_start: {bare:.0f} us) on the same heartbeats"
    )
    report.figure(
        f"rest of the machine in that window, % of one core: {broker} "
        f"{w.core_percent(w.broker):.1f}, simulators {w.core_percent(w.simulators):.1f} "
        f"({workers} processes), heartbeat counter {w.core_percent(w.counter):.1f}; machine "
        f"busy {100 * w.busy / w.total:.0f}% of {psutil.cpu_count()} cores"
    )
    tick = statistics.median(placed.tick_ms)
    report.figure(
        f"placement over a {n}-node registry (varied cores, load, speed, cached model): "
        f"place(3 replicas) {spread(placed.place_ms)} ms; a full Provisioner.step deploying a "
        f"3-replica service {spread(placed.step_ms)} ms; a tick with nothing to do (overdue "
        f"scan + step) {spread(placed.tick_ms)} ms = {tick * 5 / 10:.2f}% of one core at 5 "
        f"ticks/s; median (min-max) of {PLACE_RUNS} runs, in-process; {machine()}"
    )
    report.figure(checks(run, soft, cluster_seconds))
    if not args.no_save:
        report.save()
    return 0


def checks(run: ClusterFigures, open_files: int, seconds: float) -> str:
    commands: Counter[str] = Counter()
    for s in run.sims:
        commands.update(s.commands)
    failure = next((s.first_failure for s in run.sims if s.first_failure), "")
    warning = run.log.first_warning
    return (
        f"checks: {run.log.by_heartbeat} nodes registered by a live QoS 0 heartbeat that "
        f"overtook their QoS 1 'online', {len(run.log.lost)} marked lost by the coordinator, "
        f"{sum(s.dropped for s in run.sims)} connections dropped, "
        f"{sum(s.failures for s in run.sims)} simulator failures"
        + (f" (first: {failure})" if failure else "")
        + f", {run.log.warnings} coordinator warnings"
        + (f" (first: {warning})" if warning else "")
        + f", commands answered: {dict(commands) or 'none'}, "
        f"{sum(s.reasserted for s in run.sims)} 'online' re-asserted; open files limit "
        f"{open_files}; cluster part {seconds:.0f} s"
    )


if __name__ == "__main__":
    raise SystemExit(main())
