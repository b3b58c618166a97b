"""The embedded broker (`mqinfer broker`) as a real subprocess, driven by paho-mqtt clients."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from mqinfer.broker.ports import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
WAIT = 10.0  # upper bound for every wait; nothing asserts on timing


def ready_line(port: int) -> str:
    return f"mqinfer broker: listening on mqtt://127.0.0.1:{port} (embedded amqtt, MQTT 3.1.1 only)"


def broker_cmd(port: int) -> list[str]:
    return [sys.executable, "-m", "mqinfer", "broker", "--port", str(port)]


def broker_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MQINFER_BROKER_")}


@dataclass
class BrokerProcess:
    port: int
    proc: subprocess.Popen[str]
    lines: queue.Queue[str] = field(default_factory=queue.Queue)
    err: list[str] = field(default_factory=list)
    pumps: list[threading.Thread] = field(default_factory=list)

    def stderr_after_exit(self) -> str:
        """All of stderr; call once the process has exited."""
        for pump in self.pumps:
            pump.join(timeout=WAIT)
        return "".join(self.err)

    def wait_ready(self) -> str:
        """Return the first stdout line, waiting at most WAIT seconds."""
        try:
            return self.lines.get(timeout=WAIT)
        except queue.Empty:
            self.proc.kill()
            self.proc.wait(timeout=WAIT)
            err = self.stderr_after_exit()
            pytest.fail(f"broker printed nothing within {WAIT}s; stderr:\n{err}")


def _pump(stream: Any, sink: Callable[[str], object]) -> None:
    for line in stream:
        sink(line)


@pytest.fixture
def start_broker() -> Iterator[Callable[[int], BrokerProcess]]:
    """Start `mqinfer broker --port N` subprocesses; all are killed at teardown."""
    started: list[BrokerProcess] = []

    def start(port: int) -> BrokerProcess:
        proc = subprocess.Popen(
            broker_cmd(port),
            cwd=REPO_ROOT,
            env=broker_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        bp = BrokerProcess(port, proc)
        sinks: list[tuple[Any, Callable[[str], object]]] = [
            (proc.stdout, lambda line: bp.lines.put(line.rstrip("\n"))),
            (proc.stderr, bp.err.append),
        ]
        for stream, sink in sinks:
            pump = threading.Thread(target=_pump, args=(stream, sink), daemon=True)
            pump.start()
            bp.pumps.append(pump)
        started.append(bp)
        return bp

    yield start
    for bp in started:
        if bp.proc.poll() is None:
            bp.proc.kill()
        bp.proc.wait(timeout=WAIT)
        bp.stderr_after_exit()


@pytest.fixture
def running_broker(start_broker: Callable[[int], BrokerProcess]) -> BrokerProcess:
    bp = start_broker(free_port())
    assert bp.wait_ready() == ready_line(bp.port)
    return bp


def mqtt_client(client_id: str, protocol: MQTTProtocolVersion) -> mqtt.Client:
    return mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)


def connack(client: mqtt.Client, port: int) -> ReasonCode:
    """Connect and return the CONNACK reason code, driving the network loop by hand
    (so paho does not reconnect on its own)."""
    results: list[ReasonCode] = []
    client.on_connect = lambda _c, _u, _f, rc, _p: results.append(rc)
    client.connect("127.0.0.1", port)
    deadline = time.monotonic() + WAIT
    while not results and time.monotonic() < deadline:
        client.loop(timeout=0.1)
    client.disconnect()
    assert results, f"no CONNACK within {WAIT}s"
    return results[0]


def test_retained_qos1_message_reaches_a_later_subscriber(running_broker: BrokerProcess) -> None:
    topic, payload = "mqinfer/nodes/edge-01/caps", b'{"cpu": 4}'

    pub = mqtt_client("it-publisher", MQTTProtocolVersion.MQTTv311)
    pub.connect("127.0.0.1", running_broker.port)
    pub.loop_start()
    try:
        info = pub.publish(topic, payload, qos=1, retain=True)
        info.wait_for_publish(timeout=WAIT)
        assert info.is_published()
    finally:
        pub.disconnect()
        pub.loop_stop()

    received: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
    sub = mqtt_client("it-subscriber", MQTTProtocolVersion.MQTTv311)
    sub.on_connect = lambda c, _u, _f, _rc, _p: c.subscribe("mqinfer/nodes/+/caps", qos=1)
    sub.on_message = lambda _c, _u, msg: received.put(msg)
    sub.connect("127.0.0.1", running_broker.port)
    sub.loop_start()
    try:
        msg = received.get(timeout=WAIT)
    finally:
        sub.disconnect()
        sub.loop_stop()

    assert msg.topic == topic
    assert msg.payload == payload
    assert msg.retain is True
    assert msg.qos == 1


def test_second_broker_on_same_port_exits_2(running_broker: BrokerProcess) -> None:
    second = subprocess.run(
        broker_cmd(running_broker.port),
        cwd=REPO_ROOT,
        env=broker_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 2
    assert second.stdout == ""
    assert second.stderr.startswith("mqinfer broker: error: ")
    assert f"port {running_broker.port} on 127.0.0.1 is already in use" in second.stderr
    assert f"--broker mqtt://127.0.0.1:{running_broker.port}" in second.stderr
    assert "Traceback" not in second.stderr
    assert running_broker.proc.poll() is None  # the first one is unaffected


def test_mqtt5_connect_is_refused(running_broker: BrokerProcess) -> None:
    # amqtt answers an MQTT 5 CONNECT with a 3.1.1 CONNACK, return code 1
    # (unacceptable protocol version), and closes; paho maps that to the
    # MQTT 5 reason code 0x84 "Unsupported protocol version".
    rc = connack(mqtt_client("it-mqtt5", MQTTProtocolVersion.MQTTv5), running_broker.port)
    assert rc.is_failure
    assert rc.value == 0x84
    assert rc.getName() == "Unsupported protocol version"

    # The broker keeps serving MQTT 3.1.1 clients afterwards.
    ok = connack(mqtt_client("it-after-mqtt5", MQTTProtocolVersion.MQTTv311), running_broker.port)
    assert ok.value == 0
    assert running_broker.proc.poll() is None
    running_broker.proc.terminate()
    assert running_broker.proc.wait(timeout=WAIT) == 0
    err = running_broker.stderr_after_exit()
    assert "Traceback" not in err
    assert "WARNING" not in err  # an expected refusal is not a warning


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_broker_cleanly(running_broker: BrokerProcess, sig: signal.Signals) -> None:
    # A connected client must not keep the broker from stopping.
    client = mqtt_client("it-connected", MQTTProtocolVersion.MQTTv311)
    client.connect("127.0.0.1", running_broker.port)
    client.loop_start()
    try:
        running_broker.proc.send_signal(sig)
        assert running_broker.proc.wait(timeout=WAIT) == 0
    finally:
        client.loop_stop()
    assert "Traceback" not in running_broker.stderr_after_exit()


def _connected(client_id: str, port: int, got: queue.Queue[str]) -> mqtt.Client:
    client = mqtt_client(client_id, MQTTProtocolVersion.MQTTv311)
    client.on_message = lambda _c, _u, msg: got.put(msg.topic)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def _retain(port: int, topics: list[str]) -> None:
    pub = mqtt_client("it-retainer", MQTTProtocolVersion.MQTTv311)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    try:
        for topic in topics:
            pub.publish(topic, b"kept", qos=1, retain=True).wait_for_publish(timeout=WAIT)
    finally:
        pub.disconnect()
        pub.loop_stop()


def test_a_new_client_gets_only_the_retained_messages_it_subscribed_to(
    running_broker: BrokerProcess,
) -> None:
    """amqtt 0.12.1 sends a client that connects every retained message matching any
    filter some other client holds; the embedded broker sends only what it asked for."""
    port = running_broker.port
    _retain(port, ["it/models/a", "it/models/b"])
    holder_got: queue.Queue[str] = queue.Queue()
    holder = _connected("it-holder", port, holder_got)
    newcomer_got: queue.Queue[str] = queue.Queue()
    newcomer = None
    try:
        holder.subscribe("it/models/+", qos=1)
        assert {holder_got.get(timeout=WAIT), holder_got.get(timeout=WAIT)} == {
            "it/models/a",
            "it/models/b",
        }
        newcomer = _connected("it-newcomer", port, newcomer_got)
        newcomer.subscribe("it/own", qos=1)
        time.sleep(0.3)  # let the SUBACK come before the marker
        newcomer.publish("it/own", b"marker", qos=1).wait_for_publish(timeout=WAIT)
        seen = [newcomer_got.get(timeout=WAIT)]
        while seen[-1] != "it/own":
            seen.append(newcomer_got.get(timeout=WAIT))
        assert seen == ["it/own"]
    finally:
        for client in (holder, newcomer):
            if client is not None:
                client.disconnect()
                client.loop_stop()


def test_clients_that_connect_while_others_subscribe_keep_their_connections(
    running_broker: BrokerProcess,
) -> None:
    """amqtt 0.12.1 walks its subscription table with awaits inside; a subscription made
    meanwhile broke the walk and dropped the connecting client's connection."""
    port = running_broker.port
    _retain(port, [f"it/kept/{i}" for i in range(50)])
    drops: list[str] = []
    clients: list[mqtt.Client] = []

    def join(n: int) -> None:
        client = mqtt_client(f"it-joiner-{n}", MQTTProtocolVersion.MQTTv311)
        client.on_disconnect = lambda _c, _u, _f, rc, _p: drops.append(f"{n}: {rc}")
        client.on_message = lambda _c, _u, _msg: None
        client.connect("127.0.0.1", port)
        client.loop_start()
        clients.append(client)
        for i in range(50):  # each one new to the table, while others connect
            client.subscribe(f"it/kept/{i}/+/{n}", qos=1)
            client.subscribe(f"it/kept/{i}", qos=1)

    try:
        for wave in range(4):
            joiners = [threading.Thread(target=join, args=(wave * 10 + n,)) for n in range(10)]
            for t in joiners:
                t.start()
            for t in joiners:
                t.join(WAIT)
        time.sleep(1.0)
        assert drops == []
        assert running_broker.proc.poll() is None
    finally:
        for client in clients:
            client.disconnect()
            client.loop_stop()
    running_broker.proc.terminate()
    running_broker.proc.wait(timeout=WAIT)
    assert "changed size during iteration" not in running_broker.stderr_after_exit()


def test_mosquitto_pub_over_mqtt5_is_told_the_version_is_not_supported(
    running_broker: BrokerProcess,
) -> None:
    """mosquitto_pub -V 5 (and Node-RED set to MQTT 5) waited forever: amqtt answered with
    a 3.1.1 CONNACK they cannot read. Now an MQTT 5 CONNACK with reason 0x84 tells them."""
    from tests.integration.harness import need_client_tool

    pub = need_client_tool("mosquitto_pub")
    out = subprocess.run(
        [pub, "-p", str(running_broker.port), "-V", "5", "-t", "it/x", "-m", "y"],
        capture_output=True,
        text=True,
        timeout=30,  # a bound: it used to hang
    )
    assert out.returncode != 0
    assert "Unsupported Protocol Version" in out.stdout + out.stderr
    ok = subprocess.run(
        [pub, "-p", str(running_broker.port), "-V", "311", "-t", "it/x", "-m", "y"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ok.returncode == 0, ok.stderr
