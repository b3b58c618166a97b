"""The package as a user gets it: a wheel built from this tree, installed into a fresh
virtual environment (no system site-packages, nothing from the repository on the path)
with its dependencies from the package index, and run from a directory outside the
repository.

The base install (no runtime) runs the command line, the broker, the coordinator and a
node that announces no runtime; `mqinfer demo` says which extra it needs. With
`mqinfer[litert]` added, `mqinfer demo` classifies the packaged sample digits.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from mqinfer.broker.ports import free_port
from tests.integration.harness import wait_for

REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO / "models" / "digits"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
# What the build leaves out of the copy of the tree: the environment, caches, old builds.
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "node_modules"
)
# Building (setuptools from the index), installing (numpy, ai-edge-litert, ...) and two
# clusters: a limit well above what it takes, not a goal.
pytestmark = pytest.mark.timeout(900)


def declared_data() -> set[str]:
    """The files pyproject.toml's package-data names, as paths in the wheel."""
    found: set[str] = set()
    for package, patterns in PYPROJECT["tool"]["setuptools"]["package-data"].items():
        folder = REPO / package.replace(".", "/")
        for pattern in patterns:
            found |= {p.relative_to(REPO).as_posix() for p in folder.glob(pattern) if p.is_file()}
    return found


def _env() -> dict[str, str]:
    """This environment without anything that would put the repository or its virtual
    environment on the installed interpreter's path."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
    }
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _ok(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 0, f"{out.args}\n{out.stdout}\n{out.stderr}"
    return out.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of this tree (setuptools builds in the source directory;
    a copy keeps stale build output and concurrent builds out of it)."""
    top = tmp_path_factory.mktemp("wheel")
    src = top / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=NOT_SOURCE)
    dist = top / "dist"
    _ok(_run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(dist), str(src)], top))
    (found,) = dist.glob("mqinfer-*.whl")
    return found


def test_wheel_holds_only_the_mqinfer_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        top = {n.split("/")[0] for n in names}
        assert top == {"mqinfer", f"mqinfer-{VERSION}.dist-info"}
        assert z.read(f"mqinfer-{VERSION}.dist-info/top_level.txt").decode().split() == ["mqinfer"]
        # the demo's model, as plain files equal to models/digits
        data = sorted(n for n in names if n.startswith("mqinfer/demo_models/"))
        shipped = ["digits_int8.json", "digits_int8.tflite", "service.yaml"]
        samples = sorted(p.name for p in (DIGITS / "samples").iterdir())
        assert data == sorted(
            [f"mqinfer/demo_models/digits/{n}" for n in shipped]
            + [f"mqinfer/demo_models/digits/samples/{n}" for n in samples]
        )
        for name in data:
            relative = name.removeprefix("mqinfer/demo_models/digits/")
            assert z.read(name) == (DIGITS / relative).read_bytes(), name
        # nothing else but Python modules and the declared package data: no other models,
        # no tests, no build scripts
        others = {n for n in names if n.startswith("mqinfer/") and not n.endswith(".py")}
        assert others == declared_data()
        assert not [n for n in names if "/tests/" in n or n.startswith("models/")]
        metadata = z.read(f"mqinfer-{VERSION}.dist-info/METADATA").decode()
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    base = [r for r in requires if "extra ==" not in r]
    assert not [r for r in base if "onnx" in r or "litert" in r], base
    assert any("ai-edge-litert" in r and 'extra == "litert"' in r for r in requires)
    assert any("onnxruntime" in r and 'extra == "onnx"' in r for r in requires)


@contextmanager
def _started(cmd: list[str], cwd: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_installed_wheel_runs_anywhere(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    _ok(_run([sys.executable, "-m", "venv", str(venv)], tmp_path))
    python, mqinfer = venv / "bin" / "python", venv / "bin" / "mqinfer"
    _ok(_run([str(python), "-m", "pip", "install", "--quiet", str(wheel)], tmp_path, 600))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert not elsewhere.resolve().is_relative_to(REPO.resolve())

    # ---- the base install: no runtime --------------------------------------------------
    where = _ok(_run([str(python), "-c", "import mqinfer; print(mqinfer.__file__)"], elsewhere))
    assert Path(where.strip()).is_relative_to(venv), where
    assert _ok(_run([str(mqinfer), "--version"], elsewhere)).strip() == f"mqinfer {VERSION}"
    for module in ("ai_edge_litert", "tflite_runtime", "onnxruntime", "onnx"):
        out = _run([str(python), "-c", f"import {module}"], elsewhere)
        assert out.returncode == 1 and "ModuleNotFoundError" in out.stderr, module
    assert "COMMAND" in _ok(_run([str(mqinfer), "--help"], elsewhere))

    out = _run([str(mqinfer), "demo", "--port", str(free_port())], elsewhere)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "no TFLite runtime imports here" in out.stderr
    assert "pip install 'mqinfer[litert]'" in out.stderr
    assert "Traceback" not in out.stderr

    # The broker, the coordinator and a node, all from the base install; the node
    # announces no runtime and the coordinator sees it online.
    port = free_port()
    url = f"mqtt://127.0.0.1:{port}"
    common = ["--broker", url, "--mqtt-version", "3.1.1"]
    logs = tmp_path / "logs"
    logs.mkdir()
    with (
        _started(
            [str(mqinfer), "broker", "--host", "127.0.0.1", "--port", str(port)],
            elsewhere,
            logs / "broker.log",
        ),
        _started(
            [str(mqinfer), "coordinator", "--id", "c1", *common], elsewhere, logs / "coord.log"
        ) as coordinator,
        _started(
            [
                str(mqinfer),
                "node",
                "--id",
                "bare-1",
                "--heartbeat",
                "1",
                "--cache-dir",
                str(tmp_path / "cache"),
                *common,
            ],
            elsewhere,
            logs / "node.log",
        ) as node,
    ):

        def seen() -> dict[str, object] | None:
            status = _run([str(mqinfer), "status", "--json", *common], elsewhere, 60)
            if status.returncode != 0:
                return None  # the broker may still be starting
            view: dict[str, object] = json.loads(status.stdout)
            nodes = view["nodes"]
            coord = view["coordinator"]
            assert isinstance(nodes, list)
            ready = (
                isinstance(coord, dict)
                and coord["state"] == "online"
                and [n["state"] for n in nodes if n["id"] == "bare-1"] == ["online"]
            )
            return view if ready else None

        try:
            view = wait_for(seen, "the coordinator and the node online", timeout=90)
        except AssertionError:
            for log in sorted(logs.iterdir()):
                print(f"----- {log.name}\n{log.read_text(errors='replace')}")
            raise
        (bare,) = [n for n in view["nodes"] if n["id"] == "bare-1"]
        assert bare["runtimes"] == {}
        assert bare["formats"] == []
        assert coordinator.poll() is None and node.poll() is None
    for log in logs.iterdir():
        assert "Traceback" not in log.read_text(errors="replace"), log.name

    # ---- with the litert extra: the demo --------------------------------------------------
    _ok(_run([str(python), "-m", "pip", "install", "--quiet", f"{wheel}[litert]"], tmp_path, 600))
    began = time.monotonic()
    out = _run([str(mqinfer), "demo", "--port", str(free_port())], elsewhere, 300)
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr}"
    assert "demo: 5 of 5 classified correctly" in out.stdout, out.stdout
    for sample in sorted(p.name for p in (DIGITS / "samples").iterdir()):
        label = sample.split("_")[1]
        (line,) = [x for x in out.stdout.splitlines() if x.strip().startswith(f"{sample}:")]
        assert line.strip().startswith(f"{sample}: {label} ("), line
    rows = {
        line.split()[0]: line.split()
        for line in out.stdout.splitlines()
        if line.startswith("demo-node-")
    }
    assert sorted(rows) == ["demo-node-1", "demo-node-2"]
    for row in rows.values():
        assert row[1] == "online"
        assert "litert" in row and "onnxruntime" not in row  # only what is installed
    assert "stopped the nodes and the coordinator cleanly" in out.stdout
    assert "Traceback" not in out.stderr
    assert not list(elsewhere.iterdir()), "the demo left files in the working directory"
    print(f"demo from the installed wheel: {time.monotonic() - began:.1f} s")
