"""`mqinfer coordinator --http`: the cluster page, its event stream and Prometheus metrics.

One small HTTP server (the standard library's, on its own threads) in the coordinator's
process serves what the coordinator itself knows:

- `/`            the live cluster page (coordinator/page.html, one self-contained file);
- `/events`      server-sent events: a JSON snapshot of the cluster every second;
- `/status.json` the same snapshot once;
- `/metrics`     the Prometheus text exposition format (version 0.0.4).

A snapshot is taken under the agent's lock by copying references only (the records hold
immutable messages), so the MQTT network thread waits microseconds; it is built at most
once per `FRESH` seconds however many clients ask. Everything is bounded: concurrent
connections, event streams, the size of a request's head, the time a client may take.
Nothing is served from files but the page itself.
"""

from __future__ import annotations

import copy
import hashlib
import io
import ipaddress
import logging
import math
import re
import socket
import threading
import time
from base64 import b64encode
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

import orjson

from mqinfer.coordinator.agent import CoordinatorAgent
from mqinfer.coordinator.dispatch import LATENCY_BUCKETS, Counters, ServiceCounters
from mqinfer.coordinator.registry import Registry, ServiceRecord
from mqinfer.coordinator.status import as_json
from mqinfer.protocol.statuses import Statuses

log = logging.getLogger("mqinfer.coordinator.web")

MAX_CLIENTS = 32  # connections served at once; more are answered 503 and closed
MAX_STREAMS = 16  # of which event streams
MAX_LINE = 2048  # bytes of a request line
MAX_HEAD = 8192  # bytes of a request line and headers together
MAX_HEADERS = 32
CLIENT_TIMEOUT = 10.0  # seconds a client may take to send its request, or to take a write
EVENT_INTERVAL = 1.0  # seconds between snapshots on an event stream
FRESH = 0.25  # a snapshot younger than this is served again
PAGE = "page.html"

NODE_STATES = ("online", "offline", "lost", "unknown")
SERVICE_STATES = ("deploying", "ready", "degraded", "failed", "removed", "unknown")
REPLICA_STATES = ("deploying", "ready", "failed", "removing")


class AddressError(ValueError):
    pass


def parse_address(text: str) -> tuple[str, int]:
    """'PORT', 'HOST:PORT' or '[IPv6]:PORT' -> (host, port); a port alone (or an empty
    host) listens on 127.0.0.1 only."""
    text = text.strip()
    host, port = "", text
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)", text)
    if m:
        host, port = m.group(1), m.group(2)
    elif ":" in text:
        host, _, port = text.rpartition(":")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise AddressError(
            f"invalid address {text!r}: expected PORT, HOST:PORT or [IPv6]:PORT with a port "
            "0-65535 (e.g. 9100, 0.0.0.0:9100)"
        )
    if ":" in host and not m:
        raise AddressError(f"invalid address {text!r}: write an IPv6 address in brackets")
    return host or "127.0.0.1", int(port)


# ---- snapshots -------------------------------------------------------------------------


def merged(a: Counters, b: Counters) -> Counters:
    """The sum of two dispatchers' counters (a new copy)."""
    out = Counters(
        accepted=a.accepted + b.accepted,
        answered=a.answered + b.answered,
        fenced=a.fenced + b.fenced,
        redispatched=a.redispatched + b.redispatched,
        repeats=a.repeats + b.repeats,
    )
    for src in (a, b):
        for code, n in src.errors.items():
            out.errors[code] = out.errors.get(code, 0) + n
        for name, s in src.services.items():
            t = out.services.setdefault(name, ServiceCounters())
            t.answered += s.answered
            t.latency_sum += s.latency_sum
            t.buckets = [x + y for x, y in zip(t.buckets, s.buckets, strict=True)]
            for code, n in s.errors.items():
                t.errors[code] = t.errors.get(code, 0) + n
    return out


@dataclass
class Sampler:
    """Snapshots of what the agent knows; its counters stay monotonic for the life of the
    process, across the new dispatcher each takeover brings."""

    agent: CoordinatorAgent
    _base: Counters = field(default_factory=Counters)  # dispatchers replaced before
    _seen: Counters | None = None  # the current dispatcher's (a live reference)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _cached: tuple[float, dict[str, Any], bytes] | None = None

    def _totals(self, counters: Counters) -> Counters:
        if self._seen is not None and counters is not self._seen:
            self._base = merged(self._base, self._seen)  # it no longer changes
        self._seen = counters
        return merged(self._base, counters)

    def take(self) -> dict[str, Any]:
        """A fresh snapshot (see the module's docstring)."""
        agent = self.agent
        with agent.lock:
            mono = time.monotonic()
            reg = agent.registry
            nodes = {k: copy.copy(v) for k, v in reg.nodes.items()}
            services = {
                k: ServiceRecord(
                    k, v.spec, Statuses(dict(v.statuses.by_session), v.statuses.current)
                )
                for k, v in reg.services.items()
            }
            shadow = Registry(reg.missed_beats, nodes, services, reg.coordinator)
            d = agent.dispatcher
            totals = self._totals(d.counters)
            queued = {slot: len(s.queue) for slot, s in d.slots.items()}
            inflight = sum(1 for j in d.jobs.values() if not j.expired)
            held, held_bytes = len(d.requests), d.held
            active = agent.active
        view = as_json(shadow)
        for n in view["nodes"]:
            seen = nodes[n["id"]].last_seen
            # Silence as this coordinator measured it (no clocks of other machines involved).
            n["silent_s"] = None if seen is None else round(max(0.0, mono - seen), 3)
            n["limit_s"] = round(reg.missed_beats * nodes[n["id"]].interval, 3)
        for s in view["services"]:
            s["queued"] = sum(
                q
                for slot, q in queued.items()
                if slot == s["name"] or slot.startswith(s["name"] + ":")
            )
        view.update(
            v=1,
            ts=time.time(),
            id=agent.id,
            active=active,
            dispatch={
                "accepted": totals.accepted,
                "answered": totals.answered,
                "fenced": totals.fenced,
                "redispatched": totals.redispatched,
                "repeats": totals.repeats,
                "errors": dict(sorted(totals.errors.items())),
                "inflight": inflight,
                "held": held,
                "held_bytes": held_bytes,
            },
            requests={
                name: {
                    "answered": c.answered,
                    "errors": dict(sorted(c.errors.items())),
                    "latency_sum": round(c.latency_sum, 6),
                    "buckets": list(c.buckets),
                }
                for name, c in sorted(totals.services.items())
            },
            latency_buckets=list(LATENCY_BUCKETS),
        )
        return view

    def snapshot(self) -> tuple[dict[str, Any], bytes]:
        """The snapshot and its JSON, taken again only when the last is older than FRESH."""
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] > FRESH:
                view = self.take()
                self._cached = (now, view, orjson.dumps(view))
            return self._cached[1], self._cached[2]


# ---- the Prometheus text format ------------------------------------------------------------


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class _Text:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, labels: dict[str, str], value: float) -> None:
        inner = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
        self.lines.append(
            f"{name}{{{inner}}} {_number(value)}" if inner else f"{name} {_number(value)}"
        )


def metrics_text(view: dict[str, Any]) -> str:
    """A snapshot (Sampler.take) in the Prometheus text exposition format 0.0.4."""
    t = _Text()
    t.family(
        "mqinfer_coordinator_active",
        "gauge",
        "1 while this coordinator is the active one (holds the hub), 0 while it stands by",
    )
    t.sample("mqinfer_coordinator_active", {}, bool(view["active"]))
    d = view["dispatch"]
    for key, help_text in (
        ("accepted", "Requests the dispatcher took in"),
        ("answered", "Requests answered (results and errors)"),
        ("fenced", "Answers dropped because their lease was no longer current"),
        ("redispatched", "Work given to another replica after a lease expired or was released"),
        ("repeats", "Requests that repeated one being served or answered lately (not served)"),
    ):
        t.family(f"mqinfer_dispatch_{key}_total", "counter", help_text)
        t.sample(f"mqinfer_dispatch_{key}_total", {}, d[key])
    for key, help_text in (
        ("inflight", "Work given to replicas and not yet answered (current leases)"),
        ("held", "Requests at the hub: waiting for a replica or being worked on"),
        ("held_bytes", "Bytes of requests and tensors held at the hub"),
    ):
        t.family(f"mqinfer_dispatch_{key}", "gauge", help_text)
        t.sample(f"mqinfer_dispatch_{key}", {}, d[key])

    requests: dict[str, Any] = view["requests"]
    t.family("mqinfer_service_requests_total", "counter", "Requests answered, by service")
    for name, c in requests.items():
        t.sample("mqinfer_service_requests_total", {"service": name}, c["answered"])
    t.family("mqinfer_service_errors_total", "counter", "Requests answered with an error, by code")
    for name, c in requests.items():
        for code, n in c["errors"].items():
            t.sample("mqinfer_service_errors_total", {"service": name, "code": code}, n)
    t.family(
        "mqinfer_service_latency_seconds",
        "histogram",
        "Time from a request reaching the hub to its result from a replica",
    )
    for name, c in requests.items():
        total = 0
        for bound, n in zip([*view["latency_buckets"], math.inf], c["buckets"], strict=True):
            total += n
            le = "+Inf" if math.isinf(bound) else _number(float(bound))
            t.sample("mqinfer_service_latency_seconds_bucket", {"service": name, "le": le}, total)
        t.sample("mqinfer_service_latency_seconds_sum", {"service": name}, c["latency_sum"])
        t.sample("mqinfer_service_latency_seconds_count", {"service": name}, total)

    services = view["services"]
    t.family("mqinfer_service_queued", "gauge", "Requests waiting at the hub for a replica")
    for s in services:
        t.sample("mqinfer_service_queued", {"service": s["name"]}, s["queued"])
    t.family("mqinfer_service_state", "gauge", "1 for the service's state, 0 for the others")
    for s in services:
        for state in SERVICE_STATES:
            t.sample(
                "mqinfer_service_state", {"service": s["name"], "state": state}, s["state"] == state
            )
    t.family("mqinfer_service_replicas", "gauge", "Replicas of the service by state")
    for s in services:
        for state in REPLICA_STATES:
            n = sum(r["state"] == state for r in s["replicas"])
            t.sample("mqinfer_service_replicas", {"service": s["name"], "state": state}, n)

    nodes = view["nodes"]
    t.family("mqinfer_nodes", "gauge", "Nodes the coordinator knows, by state")
    for state in NODE_STATES:
        t.sample("mqinfer_nodes", {"state": state}, sum(n["state"] == state for n in nodes))
    t.family("mqinfer_node_state", "gauge", "1 for the node's state, 0 for the others")
    for n in nodes:
        for state in NODE_STATES:
            t.sample("mqinfer_node_state", {"node": n["id"], "state": state}, n["state"] == state)
    per_node: list[tuple[str, str, Any]] = [
        (
            "mqinfer_node_load1",
            "1-minute load average the node reported",
            lambda n: n["load"][0] if n["load"] else None,
        ),
        (
            "mqinfer_node_memory_available_bytes",
            "Memory available on the node, as it reported",
            lambda n: (
                None if n["memory_available_mb"] is None else n["memory_available_mb"] * 2**20
            ),
        ),
        (
            "mqinfer_node_inflight",
            "Requests queued or worked on at the node, as it reported",
            lambda n: n["inflight"],
        ),
        (
            "mqinfer_node_heartbeat_age_seconds",
            "Seconds since the coordinator last heard a heartbeat of the node",
            lambda n: n["silent_s"] if n["silent_s"] is not None else n["heartbeat_age_s"],
        ),
    ]
    for name, help_text, get in per_node:
        t.family(name, "gauge", help_text)
        for n in nodes:
            value = get(n)
            if value is not None:
                t.sample(name, {"node": n["id"]}, value)
    return "\n".join(t.lines) + "\n"


# ---- HTTP ----------------------------------------------------------------------------------


def load_page() -> tuple[bytes, str]:
    """The page and a Content-Security-Policy that lets only its own inline script run."""
    page = resources.files("mqinfer.coordinator").joinpath(PAGE).read_bytes()
    m = re.search(rb"<script>(.*?)</script>", page, re.S)
    digest = b64encode(hashlib.sha256(m.group(1) if m else b"").digest()).decode()
    csp = (
        f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; "
        "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    return page, csp


class _TooLarge(Exception):
    def __init__(self, code: int, why: str) -> None:
        super().__init__(why)
        self.code, self.why = code, why


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class _Handler(BaseHTTPRequestHandler):
    server: Server
    server_version = "mqinfer"
    sys_version = ""
    timeout = CLIENT_TIMEOUT

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _read_head(self) -> bytes:
        line = self.rfile.readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            raise _TooLarge(414, f"request line longer than {MAX_LINE} bytes")
        head = [line]
        size, count = len(line), 0
        while line not in (b"\r\n", b"\n", b""):
            line = self.rfile.readline(MAX_HEAD - size + 1)
            size += len(line)
            count += 1
            if size > MAX_HEAD or count > MAX_HEADERS:
                raise _TooLarge(
                    431, f"request head over {MAX_HEAD} bytes or {MAX_HEADERS} header lines"
                )
            head.append(line)
        return b"".join(head)

    def handle_one_request(self) -> None:
        try:
            head = self._read_head()
        except _TooLarge as e:
            self.command, self.requestline, self.request_version = "", "", "HTTP/1.0"
            self.send_error(e.code, e.why)
            return
        except (TimeoutError, OSError):
            self.close_connection = True
            return
        if not head:
            self.close_connection = True
            return
        first, _, rest = head.partition(b"\n")
        self.raw_requestline = first + b"\n"
        self.rfile = io.BytesIO(rest)  # the headers, read by parse_request; there is no body
        if not self.parse_request():
            return
        if self.command != "GET":
            self.send_error(405, f"{self.command} is not served here; only GET")
            return
        self.do_GET()

    def _allowed_host(self) -> bool:
        """On a loopback address, only loopback names (a page of another site that
        rebinds its name to 127.0.0.1 cannot read the cluster's state)."""
        if not _loopback(self.server.host):
            return True
        value = (self.headers.get("Host") or "").strip()
        if not value:
            return True  # an HTTP/1.0 client without one; browsers always send it
        host = value[1:].partition("]")[0] if value.startswith("[") else value.partition(":")[0]
        return _loopback(host)

    def do_GET(self) -> None:
        if not self._allowed_host():
            self.send_error(421, "this server answers only to a loopback Host")
            return
        path = self.path.partition("?")[0]
        if path == "/":
            page, csp = self.server.page
            self._send(200, "text/html; charset=utf-8", page, {"Content-Security-Policy": csp})
        elif path == "/metrics":
            view, _ = self.server.sampler.snapshot()
            body = metrics_text(view).encode()
            self._send(200, "text/plain; version=0.0.4; charset=utf-8", body)
        elif path == "/status.json":
            self._send(200, "application/json", self.server.sampler.snapshot()[1])
        elif path == "/events":
            self._events()
        else:
            self.send_error(404, "not found: this server has /, /events, /status.json, /metrics")

    def _send(self, code: int, kind: str, body: bytes, extra: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _events(self) -> None:
        server = self.server
        if not server.streams.acquire(blocking=False):
            self.send_error(
                503, f"too many event streams (at most {server.max_streams}); retry later"
            )
            return
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            self.wfile.write(b"retry: 2000\n\n")
            while not server.closing.is_set():
                _, data = server.sampler.snapshot()
                self.wfile.write(b"data: " + data + b"\n\n")
                self.wfile.flush()
                server.closing.wait(server.interval)
        except OSError:
            pass  # the client went away (or stopped reading for CLIENT_TIMEOUT)
        finally:
            server.streams.release()


_BUSY = (
    b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n"
    b"too many clients; retry later\n"
)


class Server(ThreadingHTTPServer):
    """The HTTP server: at most `max_clients` connections at once, each on its own thread."""

    daemon_threads = True

    def __init__(
        self,
        host: str,
        port: int,
        sampler: Sampler,
        max_clients: int = MAX_CLIENTS,
        max_streams: int = MAX_STREAMS,
        interval: float = EVENT_INTERVAL,
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.host = host
        self.sampler = sampler
        self.page = load_page()
        self.max_streams = max_streams
        self.interval = interval
        self.slots = threading.BoundedSemaphore(max_clients)
        self.streams = threading.BoundedSemaphore(max_streams)
        self.closing = threading.Event()
        self._thread: threading.Thread | None = None
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        port = self.server_address[1]
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{shown}:{port}/"

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            try:
                request.settimeout(1.0)
                request.sendall(_BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away mid-answer: nothing to do but say so when debugging."""
        log.debug("http: client %s: error", client_address, exc_info=True)

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.5}, name="http", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self.closing.set()
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(5)


def serve(agent: CoordinatorAgent, host: str, port: int, **kwargs: Any) -> Server:
    """Listen on host:port (raises OSError when it cannot) and serve on a thread."""
    server = Server(host, port, Sampler(agent), **kwargs)
    server.start()
    return server
