"""Fixtures for every test."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


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
