"""[T-FUZZ-1] Hostile input against a real cluster: thousands of seeded malformed or hostile
messages on every topic a component reads; then no process died, none logged a traceback,
threads and memory stayed bounded, and the service still answers correctly.

MQINFER_FUZZ_COUNT (default 2000) and MQINFER_FUZZ_SEED (default 1) choose the run;
`make fuzz` sends 10,000.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.integration.fuzz import Fuzzer
from tests.integration.harness import Broker, Proc, Procs, wait_for
from tests.integration.requests import DIGITS, Requester, deploy, digits_test_set, direct, png
from tests.integration.test_hostile import rss_mb, threads

COUNT = int(os.environ.get("MQINFER_FUZZ_COUNT", "2000"))
SEED = int(os.environ.get("MQINFER_FUZZ_SEED", "1"))
MAX_THREADS = 64  # per process, whatever it was sent
MAX_GROWTH_MB = 400  # resident memory a process may gain over the run


def _figures(procs: list[Proc]) -> dict[str, tuple[int, float]]:
    return {p.name: (threads(p.proc.pid), rss_mb(p.proc.pid)) for p in procs}


def _alive(procs: list[Proc]) -> None:
    dead = {p.name: p.proc.returncode for p in procs if p.proc.poll() is not None}
    assert not dead, {name: (code, procs_log(procs, name)) for name, code in dead.items()}


def procs_log(procs: list[Proc], name: str) -> str:
    return next(p.log()[-3000:] for p in procs if p.name == name)


class Sender:
    """A plain paho client: publishes what it is given, waits for the QoS 1 ones."""

    def __init__(self, broker: Broker) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        self.client.max_queued_messages_set(0)
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        self.pending: list[mqtt.MQTTMessageInfo] = []
        self.refused = 0  # topics paho itself will not send (NUL, too long)

    def send(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        if "\0" in topic or topic.count("/") >= 200:
            # MQTT forbids NUL, and Mosquitto more than 200 levels: the broker drops the
            # sender's connection (paho would send it again on every reconnect). It harms
            # only the sender.
            self.refused += 1
            return
        try:
            info = self.client.publish(topic, payload, qos=qos, retain=retain)
        except ValueError:
            self.refused += 1
            return
        if qos:
            self.pending.append(info)

    def settle(self) -> None:
        """Wait (30 s at most in all) until the broker has taken every QoS 1 message."""
        deadline = time.monotonic() + 30
        for info in self.pending:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
        assert all(info.is_published() for info in self.pending), "the broker took not all"
        self.pending.clear()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.mark.timeout(1800)
def test_hostile_messages_on_every_topic_harm_nothing(
    mosquitto: Broker, prefix: str, procs: Procs, tmp_path: Path
) -> None:
    coordinator = procs.start(
        "coordinator", "coordinator", "--broker", mosquitto.url, "--prefix", prefix,
        "--id", "hub",
    )  # fmt: skip
    nodes = [procs.node(mosquitto, prefix, n) for n in ("n1", "n2")]
    everyone = [coordinator, *nodes]
    deploy(
        mosquitto, prefix, "--model", str(DIGITS / "digits_int8.tflite"), "--name", "digits",
        "--replicas", "2",
    )  # fmt: skip
    images, _ = digits_test_set()
    expected = direct("digits_int8.tflite", images[:40]).argmax(axis=1)

    def served(tag: str) -> None:
        requester = Requester(mosquitto, prefix, "digits")
        try:
            got = requester.run({f"{tag}{i}": png(images[i]) for i in range(40)}, window=8)
        finally:
            requester.close()
        tops = [int(got[f"{tag}{i}"]["top"][0]["label"]) for i in range(40)]
        assert all(got[f"{tag}{i}"]["ok"] for i in range(40))
        assert np.array_equal(tops, expected)

    served("before")
    before = _figures(everyone)
    fuzzer = Fuzzer(SEED, prefix, ["n1", "n2"], ["digits"])
    sender = Sender(mosquitto)
    kinds: Counter[str] = Counter()
    peak = dict(before)
    try:
        for i, (kind, topic, payload, qos, retain) in enumerate(fuzzer.messages(COUNT), 1):
            kinds[kind] += 1
            sender.send(topic, payload, qos, retain)
            if i % 200 == 0:
                sender.settle()
                _alive(everyone)
                now = _figures(everyone)
                peak = {n: (max(peak[n][0], t), max(peak[n][1], r)) for n, (t, r) in now.items()}
        sender.settle()
    finally:
        sender.close()
    print(f"fuzz seed {SEED}: {COUNT} messages {dict(kinds)}; {sender.refused} refused by paho")

    # What the components still have to chew through settles; then they must serve.
    time.sleep(3)
    _alive(everyone)
    attempts: list[str] = []

    def served_again() -> bool:
        attempts.append(f"after{len(attempts)}-")
        try:
            served(attempts[-1])
            return True
        except AssertionError as e:
            print(f"not yet: {str(e)[:300]}")
            return False

    wait_for(served_again, "digits served correctly after the fuzz", 120)
    after = _figures(everyone)
    print("threads, RSS MB before / peak / after:")
    for name in before:
        print(f"  {name}: {before[name]} / {peak[name]} / {after[name]}")
    for name, (t, rss) in peak.items():
        assert t <= MAX_THREADS, f"{name}: {t} threads"
        assert rss - before[name][1] <= MAX_GROWTH_MB, f"{name}: {before[name][1]} -> {rss} MB"
    _alive(everyone)
    for p in everyone:
        assert "Traceback" not in p.log(), procs_log(everyone, p.name)
    assert threading.active_count() < 50
