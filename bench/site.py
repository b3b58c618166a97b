"""An emulated edge site: what serving through the hub costs where nodes sit behind slow
links. Needs root (network namespaces, tc): `sh bench/setup.sh` first.

    python -m bench.site [--count 120] [--reps 3] [--no-save]

On the host, the hub: a Mosquitto started here (the project's config, as the integration
tests derive it, listening on every address on a free port) and `mqinfer coordinator`; the
requester is on the host too. Three nodes (`mqinfer node`), each in its own network
namespace behind a veth link held by tbf to 20 Mbit/s each way (bench.edge). MobileNetV2
int8 takes raw uint8 frames (224 x 224 x 3 = 150,528 bytes); it is deployed as three
services on those nodes, with `--replicas` 1, 2 and 3, measured in interleaved rounds:

(a) Bytes on the node links per request: both directions of every node link, summed (the
    host side's counters, each frame's Ethernet/IP/TCP headers counted as on a wire), over
    a run of (b), divided by its requests; against the request's bytes plus the result's.
    Goal: <= 1.2x at every replica count: a frame crosses one node's link once, and its
    result once, however many replicas there are.
(b) Throughput with 8 requests in flight at each replica count (no goal: context; each
    link carries about 16 frames a second, so it should grow with the replicas).
(c) Latency, one request at a time, every link delaying 1 ms each way: a fourth namespace
    (its own 20 Mbit/s link) holds an mqinfer node and the hand-written paho node
    (bench.handwritten), both reaching the broker through one DelayProxy (1 ms each way);
    the requester reaches the broker through another. The coordinator is next to the
    broker, with no delay. mqinfer's p50 against the hand-written node's. Goal: <= 1.1x.
    For MobileNetV2 frames (the site's model) and, as context, digits PNGs (small
    requests, where the hub's own hop weighs most).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from types import TracebackType

import numpy as np

from bench.common import (
    REPO,
    Cluster,
    Load,
    Report,
    Run,
    handwritten_command,
    interleaved,
    machine,
    node_command,
    ratios,
    spread,
    verdict,
    wait_ready,
)
from bench.delayproxy import DelayProxy
from bench.edge import LinkBytes, Site
from mqinfer.protocol.topics import Topics

MOBILENET = REPO / "models" / "mobilenet_v2" / "mobilenet_v2_int8.tflite"
DIGITS = REPO / "models" / "digits" / "digits_int8.tflite"
DIGIT_PNG = REPO / "models" / "digits" / "samples" / "digit_7_0.png"
RATE_MBIT = 20.0
DELAY_S = 0.001
EDGE = ("n1", "n2", "n3")  # the nodes of (a) and (b)
REPLICAS = (1, 2, 3)
LATENCY_NODE = "lat"  # the namespace and mqinfer node of (c)
WINDOW = 8
BYTES_GOAL = 1.2
LATENCY_GOAL = 1.1


# ---- delay proxies, in a process of their own --------------------------------------------


Route = tuple[tuple[str, int], tuple[str, int]]  # (listen, target)


def _serve_proxies(routes: list[Route], delay: float, conn: Connection) -> None:
    """A proxy process: one DelayProxy per route; sends their addresses, then waits for the
    word to stop and sends how long each held what it forwarded, on average (s)."""
    with contextlib.ExitStack() as stack:
        proxies = [stack.enter_context(DelayProxy(a, b, delay)) for a, b in routes]
        conn.send([(p.host, p.port) for p in proxies])
        with contextlib.suppress(EOFError):
            conn.recv()
        conn.send([p.mean_hold() for p in proxies])


class Proxies:
    """DelayProxy instances in a child process, so that their forwarding never takes the
    GIL from the requester's MQTT client here. A context manager; `addresses` are where
    each listens, `holds` (after leaving) how long each held data on average."""

    def __init__(self, routes: list[Route], delay: float) -> None:
        self.routes = routes
        self.delay = delay
        self.addresses: list[tuple[str, int]] = []
        self.holds: list[float] = []
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_serve_proxies, args=(routes, delay, child), name="delay-proxies", daemon=True
        )

    def __enter__(self) -> Proxies:
        self._proc.start()
        if not self._conn.poll(60):
            self._stop()
            raise RuntimeError("the delay proxies did not start")
        self.addresses = self._conn.recv()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop()

    def _stop(self) -> None:
        with contextlib.suppress(OSError, EOFError):
            self._conn.send(None)
            if self._conn.poll(10):
                self.holds = self._conn.recv()
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()


# ---- the site ---------------------------------------------------------------------------


def start_node(
    site: Site, cluster: Cluster, node: str, broker: tuple[str, int], *labels: str
) -> None:
    """`mqinfer node` in the namespace of `node`, reaching the broker at `broker`."""
    host, port = broker
    url, cache = f"mqtt://{host}:{port}", cluster.workdir / f"cache-{node}"
    with (cluster.workdir / f"{node}.log").open("ab") as out:
        site.popen(
            node,
            node_command(url, cluster.prefix, node, cache, *labels),
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )


@dataclass
class Measured:
    """One run at one replica count: the requester's view and the node links' bytes."""

    run: Run
    links: LinkBytes  # summed over the node links

    def per_request(self) -> float:
        return (self.links.to_node + self.links.from_node) / len(self.run.latencies)

    def result_bytes(self) -> float:
        return statistics.mean(self.run.sizes)


def throughput_and_bytes(
    site: Site, cluster: Cluster, frame: bytes, count: int, reps: int
) -> dict[int, list[Measured]]:
    """(a) and (b): every replica count in each round, the links' counters around each run."""
    loads = {n: Load(cluster.broker, cluster.prefix, f"r{n}") for n in REPLICAS}
    try:
        for load in loads.values():  # warm-up: the hub measures each replica
            load.run(frame, 3 * WINDOW, WINDOW)

        def measure(n: int) -> Measured:
            before = [site.counters(node) for node in EDGE]
            run = loads[n].run(frame, count, WINDOW)
            after = [site.counters(node) for node in EDGE]
            moved = [a - b for a, b in zip(after, before, strict=True)]
            total = LinkBytes(sum(m.to_node for m in moved), sum(m.from_node for m in moved))
            return Measured(run, total)

        return interleaved({n: functools.partial(measure, n) for n in REPLICAS}, reps)
    finally:
        for load in loads.values():
            load.close()


def latency(
    cluster: Cluster, requester: tuple[str, int], payloads: dict[str, bytes], reps: int, count: int
) -> dict[str, dict[str, list[Run]]]:
    """(c): per model, mqinfer and the hand-written node one request at a time, in rounds."""
    hand = Topics(cluster.aside("handwritten"))
    out: dict[str, dict[str, list[Run]]] = {}
    for name, payload in payloads.items():
        n = count if name == "digits" else max(count // 3, 10)
        sides = {
            "mqinfer": Load(cluster.broker, cluster.prefix, f"lat-{name}", requester),
            "handwritten": Load(cluster.broker, hand.prefix, name, requester),
        }
        try:
            for load in sides.values():
                load.run(payload, 10, 1)  # warm-up
            out[name] = interleaved(
                {side: functools.partial(load.run, payload, n, 1) for side, load in sides.items()},
                reps,
            )
        finally:
            for load in sides.values():
                load.close()
    return out


# ---- the run ----------------------------------------------------------------------------


def shares(runs: list[Run]) -> str:
    """Which nodes answered, as shares of all results."""
    nodes = [b["node"] for run in runs for b in run.bodies]
    return ", ".join(f"{n} {nodes.count(n) / len(nodes):.0%}" for n in sorted(set(nodes)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.site",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--count", type=int, default=120, help="requests per throughput run")
    p.add_argument(
        "--latency-count",
        type=int,
        default=150,
        help="requests per latency run (digits; MobileNetV2 a third of it)",
    )
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-save", action="store_true", help="do not append to bench/RESULTS.md")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.site needs root (network namespaces, tc)", file=sys.stderr)
        return 1
    began = time.monotonic()
    frame = np.random.default_rng(7).integers(0, 256, 224 * 224 * 3, np.uint8).tobytes()
    payloads = {"mnv2": frame, "digits": DIGIT_PNG.read_bytes()}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mqinfer-bench-")))
        cluster = Cluster(tmp, listen_all=True)
        stack.callback(cluster.stop)
        site = stack.enter_context(Site(wire_counts=True))
        port = cluster.broker.port
        for node in (*EDGE, LATENCY_NODE):
            site.add(node, RATE_MBIT)
        lat = site.links[LATENCY_NODE]
        proxies = stack.enter_context(
            Proxies(
                [((lat.host_ip, 0), ("127.0.0.1", port)), (("127.0.0.1", 0), ("127.0.0.1", port))],
                DELAY_S,
            )
        )
        via, requester = proxies.addresses
        for node in EDGE:
            start_node(site, cluster, node, (site.links[node].host_ip, port), "--label", "at=edge")
        start_node(site, cluster, LATENCY_NODE, via, "--label", "at=lat")
        hand = Topics(cluster.aside("handwritten"))
        for name, model in (("mnv2", MOBILENET), ("digits", DIGITS)):
            log = tmp / f"handwritten-{name}.log"
            with log.open("ab") as err:
                proc = site.popen(
                    LATENCY_NODE,
                    handwritten_command(*via, model, hand, name),
                    stdout=subprocess.PIPE,
                    stderr=err,
                    cwd=REPO,
                )
            wait_ready(proc, f"the hand-written node ({name})", log)
        cluster.wait_online(len(EDGE) + 1)
        for n in REPLICAS:
            cluster.deploy(
                "--model", str(MOBILENET), "--name", f"r{n}", "--replicas", str(n),
                "--label", "at=edge",
            )  # fmt: skip
        cluster.deploy("--model", str(MOBILENET), "--name", "lat-mnv2", "--label", "at=lat")
        cluster.deploy("--model", str(DIGITS), "--name", "lat-digits", "--label", "at=lat")
        measured = throughput_and_bytes(site, cluster, frame, args.count, args.reps)
        latencies = latency(cluster, requester, payloads, args.reps, args.latency_count)
    report = Report("emulated edge site")
    where = (
        f"{len(EDGE)} nodes in network namespaces, {RATE_MBIT:g} Mbit/s tbf links, hub "
        f"(Mosquitto + coordinator) on the host; {machine()}"
    )
    tput1 = [m.run.throughput for m in measured[1]]
    for n in REPLICAS:
        runs = measured[n]
        moved = [m.per_request() for m in runs]
        base = [len(frame) + m.result_bytes() for m in runs]
        share = ratios(moved, base)
        to_node = statistics.median(m.links.to_node / len(m.run.latencies) for m in runs)
        from_node = statistics.median(m.links.from_node / len(m.run.latencies) for m in runs)
        report.figure(
            f"node links, {n} replica(s): bytes per request / (request + result) = "
            f"{spread(share)} (goal <= {BYTES_GOAL}: "
            f"{verdict(statistics.median(share), BYTES_GOAL, at_most=True)}); "
            f"{statistics.median(moved) / 1000:.1f} KB per request over the {len(EDGE)} links "
            f"(to the nodes {to_node / 1000:.1f} KB, from them {from_node / 1000:.1f} KB); "
            f"request {len(frame)} B, result {statistics.median(base) - len(frame):.0f} B; "
            f"Ethernet/IP/TCP headers counted per frame, heartbeats included; "
            f"{args.reps} x {args.count} requests, {WINDOW} in flight; {where}"
        )
    for n in REPLICAS:
        tput = [m.run.throughput for m in measured[n]]
        report.figure(
            f"site throughput, {n} replica(s), {WINDOW} in flight: {spread(tput)} req/s = "
            f"{spread(ratios(tput, tput1))} x 1 replica's; answered by "
            f"{shares([m.run for m in measured[n]])}; MobileNetV2 int8 raw frames; "
            f"{args.reps} x {args.count} requests; {where}"
        )
    held = ", ".join(f"{h * 1000:.2f}" for h in proxies.holds)
    for name, sides in latencies.items():
        mq = [r.p50_ms() for r in sides["mqinfer"]]
        hw = [r.p50_ms() for r in sides["handwritten"]]
        ratio = ratios(mq, hw)
        what = "MobileNetV2 int8 raw frame" if name == "mnv2" else "digits PNG"
        report.figure(
            f"site latency, {what} ({len(payloads[name])} B), 1 in flight, every link "
            f"{DELAY_S * 1000:g} ms each way: mqinfer / hand-written node p50 = {spread(ratio)} "
            f"(goal <= {LATENCY_GOAL}: "
            f"{verdict(statistics.median(ratio), LATENCY_GOAL, at_most=True)}); mqinfer "
            f"{spread(mq)} ms, hand-written {spread(hw)} ms (p99 "
            f"{spread([r.p(0.99) * 1000 for r in sides['mqinfer']])} vs "
            f"{spread([r.p(0.99) * 1000 for r in sides['handwritten']])} ms); same namespace, "
            f"link, proxy and broker; {args.reps} x {len(sides['mqinfer'][0].latencies)} "
            f"requests; {where}"
        )
    report.figure(
        f"site setup: the delay proxies (node side, requester side) held data {held} ms on "
        f"average (the node side's includes waiting for its {RATE_MBIT:g} Mbit/s link); QoS 1 "
        f"requests from the host; run took {time.monotonic() - began:.0f} s"
    )
    if not args.no_save:
        report.save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
