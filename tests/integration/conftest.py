"""Fixtures: a real broker per test (Mosquitto and the embedded one), mqinfer processes,
an independent observer and an in-process coordinator. The machinery is in harness.py."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import (
    Broker,
    InProcessCoordinator,
    Observer,
    Procs,
    start_broker,
    start_coordinator,
)


@pytest.fixture(params=["mosquitto", "amqtt"])
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Broker]:
    """Each test runs against Mosquitto and against the embedded broker."""
    b = start_broker(request.param, tmp_path)
    yield b
    b.stop()


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Broker]:
    b = start_broker("mosquitto", tmp_path)
    yield b
    b.stop()


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}/mqinfer"


@pytest.fixture
def procs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Procs]:
    ps = Procs(tmp_path)
    yield ps
    for p in ps.all:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for p in ps.all:
            print(f"----- {p.name} {p.args}\n{p.log()}")
    # A process that logged a traceback (a handler's exception, a crash) fails the test.
    crashed = [p for p in ps.all if "Traceback" in p.log()]
    if crashed:
        pytest.fail(f"{crashed[0].name} logged a traceback:\n{crashed[0].log()}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    rep = yield
    if rep.when == "call":
        item.rep_call = rep  # type: ignore[attr-defined]
    return rep


@pytest.fixture
def observer(broker: Broker, prefix: str) -> Iterator[Observer]:
    obs = Observer(broker, prefix)
    yield obs
    obs.close()


@pytest.fixture
def coordinator(broker: Broker, prefix: str) -> Iterator[InProcessCoordinator]:
    c = start_coordinator(broker, prefix)
    yield c
    c.shutdown()
