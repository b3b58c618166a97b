"""An emulated edge site for benchmarks: one network namespace per node, joined to the host
by a veth pair, each link optionally held to a rate in both directions by tc's token bucket
filter (tbf), with byte counters per link and partitions on demand.

    with Mosquitto() as broker, Site() as site:
        link = site.add("n1", rate_mbit=20)
        proc = site.popen("n1", ["mosquitto_sub", "-h", link.host_ip, "-p", str(broker.port),
                                 "-t", "frames"])
        ...
        site.counters("n1")  # LinkBytes(to_node=..., from_node=...)
        site.cut("n1"); site.restore("n1")

Needs root and iproute2 (bench/setup.sh). A node reaches the host at its link's `host_ip`
(a service there listens on 0.0.0.0 or on that address); nodes do not reach each other,
as the host does not forward. Each link is a /30 from a 10.X.Y.0/24 that no host interface
uses. Names are `mqe<pid>n<k>` (namespaces) and `mqe<pid>h<k>` (host-side interfaces), so
that a later run recognises what a crashed one left behind (its pid is gone) and removes it;
`python -m bench.edge --clean` does only that.

tbf has no delay of its own worth the name (only the queue it builds); add delay with
bench.delayproxy. The kernel here has tbf, htb and pfifo, but no netem.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from mqinfer.broker.ports import free_port

PREFIX = "mqe"
_SERIAL = itertools.count()  # one number per link made by this process, for unique names
DEFAULT_BURST = 32 * 1024  # bytes: tbf's bucket; at least rate/HZ and one full frame
DEFAULT_LATENCY_MS = 100.0  # tbf's queue, as the longest a packet may wait in it
NODE_IF = "eth0"  # the node's side of its veth pair, inside its namespace


class EdgeError(RuntimeError):
    """An ip or tc command failed; the message carries the command and what it printed."""


def _run(*args: str, check: bool = True) -> str:
    """Run an iproute2 command; its stdout, or EdgeError with its stderr."""
    out = subprocess.run(list(args), capture_output=True, text=True)
    if check and out.returncode != 0:
        raise EdgeError(f"{' '.join(args)}: exit {out.returncode}: {out.stderr.strip()}")
    return out.stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_inside(netns: str) -> None:
    """SIGKILL every process still running inside a namespace (started there by a run of
    this module), then wait briefly for them to go."""
    pids = [int(p) for p in _run("ip", "netns", "pids", netns, check=False).split()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if _alive(p)]
        time.sleep(0.02)


def clean_leftovers(prefix: str = PREFIX) -> list[str]:
    """Remove the namespaces and host interfaces named `<prefix><pid>...` whose owning
    process is gone (what a crashed run left), with any process still inside them. The
    names removed."""
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)[hn](\d+)$")
    removed: list[str] = []
    for line in _run("ip", "netns", "list").splitlines():
        name = line.split()[0] if line.strip() else ""
        m = pattern.match(name)
        if m and not _alive(int(m.group(1))):
            _kill_inside(name)
            _run("ip", "netns", "del", name, check=False)
            removed.append(name)
    for link in json.loads(_run("ip", "-j", "link", "show") or "[]"):
        name = link.get("ifname", "")
        m = pattern.match(name)
        if m and not _alive(int(m.group(1))):
            _run("ip", "link", "del", name, check=False)
            removed.append(name)
    return removed


def _used_subnets() -> set[tuple[int, int]]:
    """(X, Y) of every 10.X.Y.* address on the host's interfaces."""
    used = set()
    for link in json.loads(_run("ip", "-j", "-4", "addr", "show") or "[]"):
        for info in link.get("addr_info", []):
            parts = info.get("local", "").split(".")
            if len(parts) == 4 and parts[0] == "10":
                used.add((int(parts[1]), int(parts[2])))
    return used


def _pick_subnet() -> tuple[int, int]:
    """A 10.X.Y.0/24 no host interface uses, starting from a place this process's id picks
    so that concurrent runs rarely race for the same one."""
    used = _used_subnets()
    seed = int.from_bytes(hashlib.sha256(f"{os.getpid()}".encode()).digest()[:4], "big")
    for i in range(254 * 256):
        n = (seed + i) % (254 * 256)
        candidate = (n // 256 + 1, n % 256)
        if candidate not in used:
            return candidate
    raise EdgeError("every 10.X.Y.0/24 is in use on this host")


@dataclass(frozen=True)
class EdgeLink:
    """One node's link to the host: its namespace, the two ends of its veth pair and their
    addresses. Processes in the namespace reach the host at `host_ip`."""

    node: str
    netns: str
    host_if: str
    node_if: str
    host_ip: str
    node_ip: str
    prefix_len: int
    rate_mbit: float | None


@dataclass(frozen=True)
class LinkBytes:
    """Bytes that crossed one link, as the host side's interface counts them (Ethernet,
    IP and TCP headers included, once per GSO super-packet unless the site has
    `wire_counts`): `to_node` is what the node received."""

    to_node: int
    from_node: int

    def __sub__(self, other: LinkBytes) -> LinkBytes:
        return LinkBytes(self.to_node - other.to_node, self.from_node - other.from_node)


class Site:
    """Nodes in their own network namespaces, each linked to the host by a veth pair.

    A context manager: on leaving (error or not) it ends the processes it started in the
    namespaces, and removes the qdiscs, interfaces and namespaces it made. On entering it
    first removes what crashed earlier runs left behind."""

    def __init__(
        self,
        burst_bytes: int = DEFAULT_BURST,
        latency_ms: float = DEFAULT_LATENCY_MS,
        wire_counts: bool = False,
    ) -> None:
        """`burst_bytes` and `latency_ms` are tbf's bucket and queue. With `wire_counts`,
        the veth ends send no GSO super-packets (gso_max_segs 1), so the byte counters
        carry every frame's headers as a wire would (+4-10 % on bulk TCP); otherwise one
        set of headers is counted per up-to-64 KB super-packet (+0.1-1 %)."""
        self.burst_bytes = burst_bytes
        self.latency_ms = latency_ms
        self.wire_counts = wire_counts
        self.links: dict[str, EdgeLink] = {}
        self.procs: list[subprocess.Popen[bytes]] = []
        self._made_netns: list[str] = []
        self._made_ifs: list[str] = []
        self._subnet: tuple[int, int] | None = None

    def __enter__(self) -> Site:
        if os.geteuid() != 0:
            raise EdgeError("an emulated edge site needs root (network namespaces, tc)")
        clean_leftovers()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def add(self, node: str, rate_mbit: float | None = None) -> EdgeLink:
        """Make a namespace for `node` and its veth link to the host, up and addressed,
        with a default route via the host; limited to `rate_mbit` each way if given."""
        if node in self.links:
            raise ValueError(f"node {node!r} is already on this site")
        if len(self.links) >= 64:
            raise ValueError("a site holds at most 64 links (one /30 each in a /24)")
        if self._subnet is None:
            self._subnet = _pick_subnet()
        x, y = self._subnet
        serial = next(_SERIAL)
        netns = f"{PREFIX}{os.getpid()}n{serial}"
        host_if = f"{PREFIX}{os.getpid()}h{serial}"
        if len(host_if) > 15:
            raise EdgeError(f"interface name {host_if!r} is longer than 15 characters")
        base = 4 * len(self.links)
        host_ip, node_ip = f"10.{x}.{y}.{base + 1}", f"10.{x}.{y}.{base + 2}"
        _run("ip", "netns", "add", netns)
        self._made_netns.append(netns)
        _run("ip", "link", "add", host_if, "type", "veth", "peer", "name", NODE_IF, "netns", netns)
        self._made_ifs.append(host_if)
        if self.wire_counts:
            _run("ip", "link", "set", host_if, "gso_max_segs", "1")
            _run("ip", "-n", netns, "link", "set", NODE_IF, "gso_max_segs", "1")
        _run("ip", "addr", "add", f"{host_ip}/30", "dev", host_if)
        _run("ip", "link", "set", host_if, "up")
        _run("ip", "-n", netns, "link", "set", "lo", "up")
        _run("ip", "-n", netns, "addr", "add", f"{node_ip}/30", "dev", NODE_IF)
        _run("ip", "-n", netns, "link", "set", NODE_IF, "up")
        _run("ip", "-n", netns, "route", "add", "default", "via", host_ip)
        link = EdgeLink(node, netns, host_if, NODE_IF, host_ip, node_ip, 30, None)
        self.links[node] = link
        if rate_mbit is not None:
            self.set_rate(node, rate_mbit)
        return self.links[node]

    def set_rate(self, node: str, rate_mbit: float | None) -> EdgeLink:
        """Hold the node's link to `rate_mbit` in both directions (a tbf qdisc on the host
        side and one inside the namespace), or lift the limit with None."""
        link = self.links[node]
        sides: tuple[tuple[tuple[str, ...], str], ...] = (
            (("-n", link.netns), link.node_if),
            ((), link.host_if),
        )
        for where, dev in sides:
            if rate_mbit is None:
                if link.rate_mbit is not None:
                    _run("tc", *where, "qdisc", "del", "dev", dev, "root")
                continue
            _run(
                "tc", *where, "qdisc", "replace", "dev", dev, "root", "tbf",
                "rate", f"{rate_mbit * 1000:.0f}kbit", "burst", str(self.burst_bytes),
                "latency", f"{self.latency_ms * 1000:.0f}us",
            )  # fmt: skip
        self.links[node] = EdgeLink(
            link.node, link.netns, link.host_if, link.node_if, link.host_ip, link.node_ip,
            link.prefix_len, rate_mbit,
        )  # fmt: skip
        return self.links[node]

    def popen(
        self,
        node: str,
        args: Sequence[str],
        env: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> subprocess.Popen[bytes]:
        """Start `args` inside the node's namespace (`ip netns exec`, which execs it: the
        Popen's pid is the command's). `env` defaults to this process's environment. The
        site ends the process on leaving if it is still running."""
        link = self.links[node]
        proc: subprocess.Popen[bytes] = subprocess.Popen(
            ["ip", "netns", "exec", link.netns, *args],
            env=dict(os.environ if env is None else env),
            **kwargs,
        )
        self.procs.append(proc)
        return proc

    def counters(self, node: str) -> LinkBytes:
        """Bytes so far in each direction of the node's link (host side's counters)."""
        stats = Path("/sys/class/net") / self.links[node].host_if / "statistics"
        return LinkBytes(
            int((stats / "tx_bytes").read_text()), int((stats / "rx_bytes").read_text())
        )

    def cut(self, node: str) -> None:
        """Partition the node: its link goes down on the host side. Its connections stay
        open and their packets are lost until restore()."""
        _run("ip", "link", "set", self.links[node].host_if, "down")

    def restore(self, node: str) -> None:
        """End a partition: the link comes back up (the route to the node with it)."""
        _run("ip", "link", "set", self.links[node].host_if, "up")

    def close(self) -> None:
        """End the processes started here, then remove interfaces (their qdiscs go with
        them) and namespaces. Safe to call more than once."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 5
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
        for netns in self._made_netns:
            _kill_inside(netns)
        for host_if in self._made_ifs:
            _run("ip", "link", "del", host_if, check=False)
        for netns in self._made_netns:
            _run("ip", "netns", "del", netns, check=False)
        self._made_ifs.clear()
        self._made_netns.clear()
        self.links.clear()


class Mosquitto:
    """A Mosquitto broker on the host that every node of a site can reach: listening on all
    addresses on a free port, with TCP_NODELAY on its sockets and no persistence. A context
    manager; its log is kept in a temporary directory and shown if it fails to start."""

    def __init__(self, binary: str = "/usr/sbin/mosquitto", extra_conf: str = "") -> None:
        self.binary = binary
        self.extra_conf = extra_conf
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> Mosquitto:
        self._dir = tempfile.TemporaryDirectory(prefix="mqinfer-edge-")
        try:
            self._start(Path(self._dir.name))
        except BaseException:
            self.close()
            raise
        return self

    def _start(self, workdir: Path) -> None:
        self.port = free_port("0.0.0.0")
        conf = workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 0.0.0.0\nallow_anonymous true\nset_tcp_nodelay true\n"
            f"persistence false\nlog_type error\nlog_type warning\n{self.extra_conf}"
        )
        log = workdir / "mosquitto.log"
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [self.binary, "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            time.sleep(0.05)
        raise EdgeError(f"mosquitto did not start: {log.read_text(errors='replace')}")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop the broker and remove its directory."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.edge", description=__doc__)
    p.add_argument(
        "--clean", action="store_true", help="remove what crashed runs left behind, and exit"
    )
    args = p.parse_args(argv)
    if args.clean:
        for name in clean_leftovers():
            print(f"removed {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
