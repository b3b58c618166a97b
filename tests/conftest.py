"""Fixtures for every test."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import pytest

from mqinfer.node.runtimes import import_runtimes


@pytest.fixture(autouse=True)
def fail_on_swallowed_exception(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fail a test when a callback swallowed an exception (logged with a traceback)."""
    caplog.set_level(logging.INFO, logger="mqinfer")
    yield
    swallowed = [
        r
        for r in caplog.get_records("call")
        if r.name.startswith("mqinfer") and r.exc_info is not None
    ]
    if swallowed:
        pytest.fail(
            f"exception swallowed in a callback: {swallowed[0].getMessage()}\n"
            f"{logging.Formatter().formatException(swallowed[0].exc_info)}"
        )  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def openvino() -> Any:
    """The OpenVINO runtime module. `make test` runs its tests in an environment of their
    own (`make test-openvino`), where it must import; elsewhere they are skipped."""
    modules = import_runtimes(["openvino"])
    if "openvino" not in modules:
        if os.environ.get("MQINFER_REQUIRE_OPENVINO") == "1":
            pytest.fail("MQINFER_REQUIRE_OPENVINO=1 but openvino does not import")
        pytest.skip("openvino does not import here: pip install 'mqinfer[openvino]'")
    return modules["openvino"]
