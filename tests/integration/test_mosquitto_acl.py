"""Roles on a real Mosquitto, with the password file and ACL that `mqinfer accounts` writes:
each account can do what its role needs and nothing more (topics.md §11)."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mqinfer.broker.ports import free_port
from mqinfer.protocol.topics import Topics
from tests.integration.harness import Broker, Procs, need_client_tool, need_mosquitto, wait_for
from tests.integration.requests import DIGITS, digits_test_set, mqinfer
from tests.integration.test_discovery import status_json

NOT_AUTHORIZED = 135  # MQTT 5 PUBACK reason code


class Account:
    """A plain MQTT 5 paho client logged in as one account: what a thief of its password
    could type. Keeps what it receives and the PUBACK reason code of each publish."""

    def __init__(self, broker: Broker, user: str, password: str) -> None:
        self.lock = threading.Lock()
        self.got: list[tuple[str, bytes]] = []
        self.acks: dict[int, int] = {}
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"acct-{user}-{time.monotonic_ns()}",
            protocol=mqtt.MQTTv5,
        )
        self.client.username_pw_set(user, password)
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        connected = threading.Event()
        self.client.on_connect = lambda *a: connected.set()
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        assert connected.wait(10), f"{user}: no CONNACK"

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.got.append((msg.topic, msg.payload))

    def _on_publish(self, _c: Any, _u: Any, mid: int, rc: Any, _p: Any) -> None:
        with self.lock:
            self.acks[mid] = rc.value

    def subscribe(self, topic: str) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *a: done.set()
        self.client.subscribe(topic, qos=1)
        assert done.wait(10), f"no SUBACK for {topic}"

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> int:
        """The broker's PUBACK reason code (0: accepted, 135: not authorized)."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        wait_for(lambda: info.mid in self.acks, f"PUBACK for {topic}", 10)
        return self.acks[info.mid]

    def topics(self) -> set[str]:
        with self.lock:
            return {t for t, _ in self.got}

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _site(tmp_path: Path, prefix: str) -> tuple[Broker, dict[str, str]]:
    """A Mosquitto with the accounts and ACL of `mqinfer accounts` for this prefix."""
    need_mosquitto()
    out = mqinfer(
        "accounts", "--out", str(tmp_path / "site"), "--prefix", prefix,
        "--node", "edge-01,edge-02", "--sensor", "cam-1", "--sensor", "cam-2",
        "--operator", "ops", "--observer", "watch",
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    site = tmp_path / "site"
    assert (site / "secrets" / "cam-1").stat().st_mode & 0o777 == 0o600
    passwords = {p.name: p.read_text().strip() for p in (site / "secrets").iterdir()}
    broker = Broker(
        "mosquitto", free_port(), tmp_path, passwd=site / "mqinfer.passwd", acl=site / "mqinfer.acl"
    )
    broker.start()
    return broker, passwords


def test_each_role_does_what_it_needs_and_nothing_more(
    tmp_path: Path, procs: Procs, prefix: str
) -> None:
    """[T-SEC-1] no account but a node's acts as that node; [T-SEC-2] a node sees only its
    work and writes no result; [T-SEC-3] a sensor reads only its own replies/."""
    rr = need_client_tool("mosquitto_rr")
    b, pw = _site(tmp_path, prefix)
    t = Topics(prefix)
    spies: list[Account] = []
    try:
        procs.start(
            "coordinator", "coordinator", "--broker", b.url_as("coordinator", pw["coordinator"]),
            "--prefix", prefix,
        )  # fmt: skip
        procs.node(b, prefix, "edge-01", url=b.url_as("edge-01", pw["edge-01"]))
        watch = b.url_as("watch", pw["watch"])
        wait_for(
            lambda: [n["state"] for n in status_json(b, prefix, watch)["nodes"]] == ["online"],
            "edge-01 online, seen by the observer",
        )
        # Thieves of each kind of account watch everything they can, from the start.
        cam2, node2, observer = (
            Account(b, "cam-2", pw["cam-2"]),
            Account(b, "edge-02", pw["edge-02"]),
            Account(b, "watch", pw["watch"]),
        )
        spies += [cam2, node2, observer]
        for spy in spies:
            spy.subscribe(f"{prefix}/#")

        # The operator deploys; the node fetches the model and serves it.
        out = mqinfer(
            "deploy", "--model", str(DIGITS / "digits_int8.tflite"), "--name", "digits",
            "--broker", b.url_as("ops", pw["ops"]), "--prefix", prefix,
            "--wait", "--timeout", "90",
        )  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr

        # A sensor gets its answer under its own replies/ with the real mosquitto_rr.
        images, labels = digits_test_set()
        pixels = (images[0] / 255.0).reshape(1, 8, 8, 1)
        body = orjson.dumps({"inputs": pixels.tolist(), "request_id": "mine"}).decode()
        got = subprocess.run(
            [rr, "-p", str(b.port), "-u", "cam-1", "-P", pw["cam-1"], "-t",
             t.service_request("digits"), "-e", f"{prefix}/replies/cam-1/a", "-m", body,
             "-W", "20"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert got.returncode == 0, got.stdout + got.stderr
        result = orjson.loads(got.stdout)
        assert result["ok"] and int(result["top"][0]["label"]) == int(labels[0])

        # Another sensor, a node and an observer saw none of it: no request, no work, no
        # result, no reply; the other node and the observer no model either.
        time.sleep(1.0)  # anything in flight to them would have come by now
        private = ("/request", "/result", "/replies/", "/work", "/answer")
        for spy in spies:
            seen = spy.topics()
            assert not [s for s in seen if any(p in s for p in private)], seen
        assert not [s for s in observer.topics() | cam2.topics() if "/artifacts/" in s]
        assert t.node_heartbeat("edge-01") in observer.topics()  # it does see the cluster

        # What each would write for harm, refused by the broker.
        lost = orjson.dumps({"v": 1, "node": "edge-01", "state": "lost", "session": 1})
        fake = orjson.dumps({"v": 1, "request_id": "mine", "service": "digits", "ok": True})
        refused = {
            "sensor as a node": cam2.publish(t.node_caps("cam-2"), b'{"v":1}', retain=True),
            "sensor's heartbeat": cam2.publish(t.node_heartbeat("cam-2"), b'{"v":1}'),
            "sensor answers a node's work": cam2.publish(t.node_answer("edge-01"), b"MQA1"),
            "sensor writes a spec": cam2.publish(t.service_spec("evil"), b"{}", retain=True),
            "node marks another lost": node2.publish(t.node_state("edge-01"), lost, retain=True),
            "node forges a result": node2.publish(t.service_result("digits", "mine"), fake),
            "node forges a reply": node2.publish(f"{prefix}/replies/cam-1/a", fake),
            "node sends a request": node2.publish(t.service_request("digits"), body.encode()),
            "observer sends a request": observer.publish(t.service_request("digits"), b"x"),
            "observer writes a status": observer.publish(t.service_status("digits"), b"{}"),
        }
        assert refused == dict.fromkeys(refused, NOT_AUTHORIZED)
        # What they may write, accepted: a sensor's request, a node's own heartbeat.
        assert cam2.publish(t.service_request("digits", "ok-1"), body.encode()) == 0
        assert node2.publish(t.node_state("edge-02"), b"", retain=True) == 0

        view = status_json(b, prefix, watch)
        assert [n["id"] for n in view["nodes"]] == ["edge-01"]
        assert view["nodes"][0]["state"] == "online"
        assert [s["name"] for s in view["services"]] == ["digits"]
    finally:
        for spy in spies:
            spy.close()
        b.stop()


def test_passwords_are_mosquittos_own_format(tmp_path: Path, prefix: str) -> None:
    """The hashes `mqinfer accounts` writes log in; a wrong password does not."""
    b, pw = _site(tmp_path, prefix)
    try:
        ok = Account(b, "cam-1", pw["cam-1"])
        ok.close()
        bad = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        bad.username_pw_set("cam-1", pw["cam-1"] + "x")
        codes: list[int] = []
        bad.on_connect = lambda _c, _u, _f, rc, _p: codes.append(rc.value)
        props = Properties(PacketTypes.CONNECT)
        bad.connect("127.0.0.1", b.port, properties=props)
        deadline = time.monotonic() + 10
        while not codes and time.monotonic() < deadline:
            bad.loop(0.1)
        assert codes and codes[0] in (134, 135)  # bad user name or password / not authorized
    finally:
        b.stop()
