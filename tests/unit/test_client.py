"""Broker URLs, backoff and session numbers."""

from __future__ import annotations

import pytest

from mqinfer.mqtt import BrokerURL
from mqinfer.mqtt.session import Backoff, SessionCounter


@pytest.mark.parametrize(
    ("text", "url"),
    [
        ("mqtt://127.0.0.1:1883", BrokerURL("127.0.0.1", 1883)),
        ("mqtt://broker", BrokerURL("broker", 1883)),
        ("broker:1884", BrokerURL("broker", 1884)),
        ("mqtt://user:p%40ss@h:1", BrokerURL("h", 1, "user", "p@ss")),
        ("mqtts://h", BrokerURL("h", 8883, tls=True)),
    ],
)
def test_broker_urls(text: str, url: BrokerURL) -> None:
    assert BrokerURL.parse(text) == url


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("http://h", "scheme must be mqtt"),
        ("mqtt://", "no host"),
        ("mqtt://h:99999", "port"),
        ("mqtt://h/x", "unexpected path"),
    ],
)
def test_bad_broker_urls_say_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        BrokerURL.parse(text)


def test_password_is_not_shown() -> None:
    assert str(BrokerURL.parse("mqtt://u:secret@h:1")) == "mqtt://u@h:1"


def test_backoff_is_jittered_and_capped() -> None:
    b = Backoff(initial=0.5, cap=4.0)
    delays = [b.next_delay() for _ in range(10)]
    assert all(0.25 <= d <= 0.5 for d in delays[:1])
    assert all(2.0 <= d <= 4.0 for d in delays[4:])
    assert len(set(delays)) > 5
    b.reset()
    assert b.next_delay() <= 0.5
    b.attempt = 5000  # a broker gone for days
    assert 2.0 <= b.next_delay() <= 4.0


def test_sessions_strictly_increase() -> None:
    c = SessionCounter()
    values = [c.next() for _ in range(1000)]
    assert values == sorted(set(values))
