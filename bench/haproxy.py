"""The usual way to spread HTTP inference over unequal machines: HAProxy 2.6 with
`balance leastconn` in front of FastAPI + uvicorn workers, each worker held to its own share
of a core (bench.cpu), so mqinfer's heterogeneous pool has something to be compared with.

    with HttpPool(DIGITS, shares=[0.5, 0.125]) as pool:
        HttpLoad(pool.port, pool.service).run(payload, 400, 8)  # from bench.http
        pool.served()  # {"w0": 322, "w1": 78}

Each worker is one uvicorn process (1 worker, loopback, a free port) serving one model with
bench.http's Endpoint (the work a node does per request: decode with the manifest's
preprocessing, run, encode, top 5), at POST /infer/{service}, as bench.http's app does.
A worker starts at full speed (imports and warm-up are not what is measured) and is moved
under its quota once it listens. HAProxy runs in the foreground (`haproxy -f cfg -db`)
with one thread, keep-alive on both sides, and a stats socket to count what each worker
served. Needs root for the quotas and Debian's haproxy (bench/setup.sh).
"""

from __future__ import annotations

import contextlib
import csv
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Annotated

from fastapi import Body, FastAPI, HTTPException, Response

from bench.cpu import CpuQuota
from bench.http import Endpoint
from mqinfer.broker.ports import free_port

REPO = Path(__file__).resolve().parents[1]
MODEL_ENV = "MQINFER_BENCH_MODEL"  # the worker's model file
SERVICE_ENV = "MQINFER_BENCH_SERVICE"  # the name it serves the model under


def create_app() -> FastAPI:
    """One worker's app (`uvicorn --factory bench.haproxy:create_app`): the model named by
    $MQINFER_BENCH_MODEL, loaded and warmed up, served as $MQINFER_BENCH_SERVICE."""
    name = os.environ[SERVICE_ENV]
    endpoint = Endpoint(name, Path(os.environ[MODEL_ENV]))
    app = FastAPI()

    @app.post("/infer/{service}")
    def infer(service: str, body: Annotated[bytes, Body(media_type="image/png")]) -> Response:
        if service != name:
            raise HTTPException(404, f"no service {service!r}; there is {name!r}")
        status, payload = endpoint.serve(body)
        return Response(payload, status_code=status, media_type="application/json")

    return app


def _wait_listening(port: int, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} is not listening on {port}: {log.read_text(errors='replace')}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Worker:
    """One uvicorn process serving one model on 127.0.0.1:`port`. A context manager that
    stops it on leaving."""

    def __init__(self, model: Path, service: str, workdir: Path, name: str) -> None:
        self.model = model
        self.service = service
        self.name = name
        self.port = free_port()
        self.log = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Worker:
        env = {**os.environ, MODEL_ENV: str(self.model), SERVICE_ENV: self.service}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "bench.haproxy:create_app", "--factory",
                 "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                 "--no-access-log", "--log-level", "warning", "--timeout-keep-alive", "600"],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
            )  # fmt: skip
        try:
            _wait_listening(self.port, self.proc, f"worker {self.name}", self.log)
        except BaseException:
            _stop(self.proc)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.proc is not None:
            _stop(self.proc)


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None
    )
    if found is None:
        raise RuntimeError("haproxy is not installed: run `sh bench/setup.sh` as root")
    return found


def haproxy_config(port: int, backends: Sequence[tuple[str, int]], stats_socket: Path) -> str:
    """A config for `balance leastconn` over HTTP backends on loopback: HTTP mode (each
    request balanced on its own), keep-alive to clients and servers, long timeouts."""
    servers = "".join(f"    server {name} 127.0.0.1:{p}\n" for name, p in backends)
    return (
        "global\n"
        "    nbthread 1\n"
        "    maxconn 1000\n"
        f"    stats socket {stats_socket} mode 600 level user\n"
        "defaults\n"
        "    mode http\n"
        "    timeout connect 5s\n"
        "    timeout client 600s\n"
        "    timeout server 600s\n"
        "    timeout http-keep-alive 600s\n"
        "frontend infer\n"
        f"    bind 127.0.0.1:{port}\n"
        "    default_backend workers\n"
        "backend workers\n"
        "    balance leastconn\n"
        f"{servers}"
    )


class HAProxy:
    """HAProxy in the foreground on 127.0.0.1:`port` over the given backends (name, port).
    A context manager that stops it on leaving."""

    def __init__(self, backends: Sequence[tuple[str, int]], workdir: Path) -> None:
        self.port = free_port()
        self.backends = list(backends)
        self.stats_socket = workdir / "haproxy.sock"
        self.config = workdir / "haproxy.cfg"
        self.log = workdir / "haproxy.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> HAProxy:
        self.config.write_text(haproxy_config(self.port, self.backends, self.stats_socket))
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [haproxy_binary(), "-f", str(self.config), "-db"],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            _wait_listening(self.port, self.proc, "haproxy", self.log)
        except BaseException:
            _stop(self.proc)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.proc is not None:
            _stop(self.proc)

    def served(self) -> dict[str, int]:
        """Requests each backend server has been sent so far (the stats' `stot`)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(self.stats_socket))
            s.sendall(b"show stat\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        lines = b"".join(chunks).decode().lstrip("# ").splitlines()
        names = {name for name, _ in self.backends}
        return {
            row["svname"]: int(row["stot"] or 0)
            for row in csv.DictReader(line for line in lines if line)
            if row["pxname"] == "workers" and row["svname"] in names
        }


class HttpPool:
    """N workers for one model, worker i held to shares[i] of a core, HAProxy leastconn in
    front on 127.0.0.1:`port`. A context manager: everything stops and every quota is
    removed on leaving, error or not."""

    def __init__(self, model: Path, shares: Sequence[float], service: str = "model") -> None:
        self.model = model
        self.shares = list(shares)
        self.service = service
        self.port = 0
        self.workers: list[Worker] = []
        self.quotas: list[CpuQuota] = []
        self.haproxy: HAProxy | None = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> HttpPool:
        try:
            workdir = Path(
                self._stack.enter_context(tempfile.TemporaryDirectory(prefix="mqinfer-haproxy-"))
            )
            for i, share in enumerate(self.shares):
                quota = self._stack.enter_context(CpuQuota(share))
                worker = self._stack.enter_context(
                    Worker(self.model, self.service, workdir, f"w{i}")
                )
                assert worker.proc is not None
                quota.add(worker.proc.pid)
                self.quotas.append(quota)
                self.workers.append(worker)
            self.haproxy = self._stack.enter_context(
                HAProxy([(w.name, w.port) for w in self.workers], workdir)
            )
            self.port = self.haproxy.port
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stack.close()

    def served(self) -> dict[str, int]:
        """Requests HAProxy has sent to each worker so far."""
        assert self.haproxy is not None
        return self.haproxy.served()
