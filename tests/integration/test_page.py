"""`mqinfer coordinator --http`: /metrics after real requests, and the live cluster page in a
real headless Chromium (driven through its DevTools protocol on a pipe) showing a node that
was killed as lost, without a reload. Real Mosquitto, real coordinator and node processes."""

from __future__ import annotations

import fcntl
import os
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import pytest

from mqinfer.broker.ports import free_port
from tests.integration.harness import LIMIT, REQUIRE_MOSQUITTO, Broker, Procs, wait_for
from tests.integration.requests import DIGITS, Requester, deploy, digits_test_set, png
from tests.unit.test_metrics import check_histograms, parse, value

pytestmark = pytest.mark.mosquitto


def need_chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    if REQUIRE_MOSQUITTO:
        pytest.fail("MQINFER_REQUIRE_MOSQUITTO=1 but chromium is not installed")
    pytest.skip("chromium is not installed (Debian: apt-get install chromium)")


class Chromium:
    """Headless Chromium driven over --remote-debugging-pipe: JSON messages, each ended by
    a NUL byte, written to its fd 3 and read from its fd 4."""

    def __init__(self, binary: str, profile: Path) -> None:
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        # Above 4, so that moving them to 3 and 4 in the child cannot overwrite each other.
        child_r = fcntl.fcntl(to_r, fcntl.F_DUPFD_CLOEXEC, 10)
        child_w = fcntl.fcntl(from_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_r)
        os.close(from_w)

        def fds() -> None:
            os.dup2(child_r, 3)
            os.dup2(child_w, 4)

        self.log = profile.with_suffix(".log")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    "--headless",
                    "--no-sandbox",  # as root in a container
                    "--disable-gpu",
                    "--no-first-run",
                    "--remote-debugging-pipe",
                    f"--user-data-dir={profile}",
                    "about:blank",
                ],
                preexec_fn=fds,  # only dup2 before exec
                pass_fds=(3, 4),
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        os.close(child_r)
        os.close(child_w)
        self.w, self.r = to_w, from_r
        self.buf = b""
        self.n = 0
        self.session = ""

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        self.n += 1
        msg: dict[str, Any] = {"id": self.n, "method": method, "params": params or {}}
        if self.session:
            msg["sessionId"] = self.session
        os.write(self.w, orjson.dumps(msg) + b"\0")
        deadline = time.monotonic() + LIMIT
        while True:
            while b"\0" in self.buf:
                raw, _, self.buf = self.buf.partition(b"\0")
                reply = orjson.loads(raw)
                if reply.get("id") == self.n:
                    assert "error" not in reply, f"{method}: {reply['error']}"
                    result: dict[str, Any] = reply["result"]
                    return result
            left = deadline - time.monotonic()
            assert left > 0, f"chromium did not answer {method}: {self.log.read_text()[-2000:]}"
            ready, _, _ = select.select([self.r], [], [], left)
            if ready:
                chunk = os.read(self.r, 1 << 16)
                assert chunk, f"chromium closed its pipe: {self.log.read_text()[-2000:]}"
                self.buf += chunk

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", {"url": url})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]

    def js(self, expression: str) -> Any:
        out = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        assert "exceptionDetails" not in out, out
        return out["result"].get("value")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.w)
        os.close(self.r)


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def snapshot(base: str) -> dict[str, Any]:
    status, body = get(base + "status.json")
    assert status == 200, body
    out: dict[str, Any] = orjson.loads(body)
    return out


def node_states(view: dict[str, Any]) -> dict[str, str]:
    return {n["id"]: n["state"] for n in view["nodes"]}


def coordinator(procs: Procs, broker: Broker, prefix: str, port: int) -> str:
    procs.start(
        "coordinator",
        "coordinator",
        "--broker",
        broker.url,
        "--prefix",
        prefix,
        "--http",
        str(port),  # a port alone: 127.0.0.1
        "--missed-beats",
        "4",
    )
    base = f"http://127.0.0.1:{port}/"

    def up() -> bool:
        try:
            return bool(snapshot(base)["active"])
        except OSError:
            return False

    wait_for(up, "the coordinator's page, active")
    return base


class Events:
    """What /events sends, read on a thread as the page reads it."""

    def __init__(self, url: str) -> None:
        self.views: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.response = urllib.request.urlopen(url, timeout=LIMIT)
        assert self.response.headers["Content-Type"] == "text/event-stream"
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for line in self.response:
                if line.startswith(b"data: "):
                    with self.lock:
                        self.views.append(orjson.loads(line[6:]))
        except (OSError, ValueError):
            pass

    def seen(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.views)

    def close(self) -> None:
        self.response.close()


def test_metrics_count_real_requests_and_the_page_shows_a_killed_node_lost(
    mosquitto: Broker, procs: Procs, prefix: str, tmp_path: Path
) -> None:
    chromium = need_chromium()
    base = coordinator(procs, mosquitto, prefix, free_port())
    procs.node(mosquitto, prefix, "n1")
    n2 = procs.node(mosquitto, prefix, "n2")
    wait_for(lambda: node_states(snapshot(base)) == {"n1": "online", "n2": "online"}, "both online")
    deploy(mosquitto, prefix, str(DIGITS / "service.yaml"))

    def ready() -> bool:
        [svc] = snapshot(base)["services"] or [None]
        return bool(svc) and sum(r["state"] == "ready" for r in svc["replicas"]) == 2

    wait_for(ready, "digits ready on 2 nodes in /status.json")

    images, _ = digits_test_set()
    sent = 40
    req = Requester(mosquitto, prefix, "digits")
    try:
        results = req.run({f"p{i}": png(images[i]) for i in range(sent)})
    finally:
        req.close()
    assert all(r["ok"] for r in results.values())

    status, body = get(base + "metrics")
    assert status == 200
    series, types = parse(body.decode())
    check_histograms(series, types)
    assert value(series, "mqinfer_service_requests_total", service="digits") == sent
    assert value(series, "mqinfer_service_latency_seconds_count", service="digits") == sent
    assert value(series, "mqinfer_dispatch_accepted_total") == sent
    assert value(series, "mqinfer_dispatch_answered_total") == sent
    assert not [k for k in series if k[0] == "mqinfer_service_errors_total"]
    assert value(series, "mqinfer_service_replicas", service="digits", state="ready") == 2
    assert value(series, "mqinfer_service_state", service="digits", state="ready") == 1
    for n in ("n1", "n2"):
        assert value(series, "mqinfer_node_state", node=n, state="online") == 1
        assert value(series, "mqinfer_node_heartbeat_age_seconds", node=n) < LIMIT
        assert value(series, "mqinfer_node_memory_available_bytes", node=n) > 0
    assert value(series, "mqinfer_coordinator_active") == 1

    browser = Chromium(chromium, tmp_path / "chromium")
    events = Events(base + "events")
    try:
        browser.open(base)
        rows = "[...document.querySelectorAll('#nodes tr[data-node]')]"
        states = f"Object.fromEntries({rows}.map(r => [r.dataset.node, r.dataset.state]))"
        wait_for(
            lambda: browser.js(states) == {"n1": "online", "n2": "online"},
            "the page to show both nodes online",
        )
        cells = browser.js(f"{rows}.map(r => [...r.cells].map(c => c.textContent))")
        assert [c[0] for c in cells] == ["n1", "n2"]
        assert all(c[2] == "cpu" and "litert" in c[3] for c in cells), cells
        service = "document.querySelector('#services tr[data-service=digits]')"
        assert wait_for(lambda: browser.js(f"{service}?.dataset.state") == "ready", "digits")
        answered = "document.querySelector('[data-figure=answered] b').textContent"
        assert browser.js(answered) == str(sent)
        svg = "document.querySelectorAll('#chart-rate polyline, #chart-latency polyline').length"
        assert browser.js(svg) == 2
        assert browser.js("document.getElementById('live').textContent") == "live"

        n2.kill9()  # its connection closes: the broker publishes its Will
        wait_for(
            lambda: browser.js(states) == {"n1": "online", "n2": "lost"},
            "the page, never reloaded, to show n2 lost",
        )
        badge = f"{rows}.find(r => r.dataset.node === 'n2').cells[1].textContent"
        assert browser.js(badge).startswith("lost")
        # The test's own event stream is another client: its next snapshot may come a
        # second after the page's.
        wait_for(
            lambda: [v for v in events.seen() if node_states(v).get("n2") == "lost"],
            "the event stream to say n2 was lost",
        )
        assert node_states(events.seen()[0]) == {"n1": "online", "n2": "online"}
    finally:
        events.close()
        browser.close()

    status, body = get(base + "metrics")
    series, _ = parse(body.decode())
    assert value(series, "mqinfer_node_state", node="n2", state="lost") == 1
    assert value(series, "mqinfer_nodes", state="lost") == 1
    assert value(series, "mqinfer_service_requests_total", service="digits") == sent


def test_the_http_server_is_bounded(mosquitto: Broker, procs: Procs, prefix: str) -> None:
    """At most 16 event streams (the 17th is answered 503), a bounded request head, only
    GET, only loopback names on a loopback address; the coordinator stops cleanly with
    streams open."""
    port = free_port()
    base = coordinator(procs, mosquitto, prefix, port)
    streams = [Events(base + "events") for _ in range(16)]
    try:
        status, body = get(base + "events")
        assert status == 503 and b"too many event streams (at most 16)" in body
        assert get(base + "metrics")[0] == 200  # other requests still served

        def raw(data: bytes) -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(data)
                out = b""
                while chunk := s.recv(4096):
                    out += chunk
                return out

        assert raw(b"GET /" + b"a" * 3000 + b" HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 414")
        many = b"GET / HTTP/1.0\r\n" + b"X-A: b\r\n" * 40 + b"\r\n"
        assert raw(many).startswith(b"HTTP/1.0 431")
        assert raw(b"POST /metrics HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 405")
        evil = raw(b"GET /status.json HTTP/1.1\r\nHost: evil.example:80\r\n\r\n")
        assert evil.startswith(b"HTTP/1.0 421")
        assert raw(b"GET /../etc/passwd HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 404")
        [coord] = [p for p in procs.all if p.name == "coordinator"]
        coord.signal(signal.SIGTERM)
        assert coord.proc.wait(LIMIT) == 0, coord.log()
    finally:
        for s in streams:
            s.close()


def test_status_watch_redraws_until_interrupted(
    mosquitto: Broker, procs: Procs, prefix: str
) -> None:
    """`mqinfer status --watch` keeps one subscription and shows each change: a node that
    comes while it watches, then goes offline."""
    watch = procs.start(
        "watch",
        "status",
        "--broker",
        mosquitto.url,
        "--prefix",
        prefix,
        "--watch",
        "0.2",
        "--json",
    )

    def views() -> list[dict[str, Any]]:
        lines = [line for line in watch.log().splitlines() if line.startswith("{")]
        return [orjson.loads(line) for line in lines]

    wait_for(lambda: len(views()) >= 2, "two views")
    assert views()[0]["nodes"] == []
    node = procs.node(mosquitto, prefix, "n1")
    wait_for(lambda: node_states(views()[-1]) == {"n1": "online"}, "n1 online in the watch")
    node.terminate()
    wait_for(lambda: node_states(views()[-1]) == {"n1": "offline"}, "n1 offline in the watch")
    watch.signal(signal.SIGINT)
    assert watch.proc.wait(LIMIT) == 0, watch.log()
    text = procs.start(
        "watch-text", "status", "--broker", mosquitto.url, "--prefix", prefix, "--watch", "0.2"
    )
    wait_for(lambda: text.log().count("every 0.2 s") >= 2, "the table drawn twice")
    text.signal(signal.SIGTERM)
    assert text.proc.wait(LIMIT) == 0
    assert "n1" in text.log() and "offline" in text.log()
