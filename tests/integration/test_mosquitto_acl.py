"""The shipped ACL layout on a real Mosquitto: a node may only write its own subtree."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from mqinfer.broker.ports import free_port
from mqinfer.protocol.topics import Topics
from tests.integration.harness import (
    REPO,
    Broker,
    Procs,
    need_client_tool,
    need_mosquitto,
    wait_for,
)
from tests.integration.test_discovery import status_json

USERS = ("edge-01", "edge-02", "coordinator", "client")


def _publish_as(broker: Broker, user: str, topic: str, payload: bytes) -> None:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"spoof-{user}", protocol=mqtt.MQTTv311)
    c.username_pw_set(user, "pw")
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    c.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)  # 3.1.1: PUBACK anyway
    c.loop_stop()
    c.disconnect()


def _secured_broker(tmp_path: Path) -> Broker:
    """Mosquitto with a password file for USERS (password 'pw') and the shipped ACL."""
    need_mosquitto()
    passwd_tool = need_client_tool("mosquitto_passwd")
    pw = tmp_path / "passwd"
    for i, user in enumerate(USERS):
        flags = ["-b", "-c"] if i == 0 else ["-b"]
        subprocess.run([passwd_tool, *flags, str(pw), user, "pw"], check=True, timeout=30)
    acl = tmp_path / "mqinfer.acl"
    shutil.copy(REPO / "deploy" / "mosquitto" / "acl.example", acl)
    b = Broker("mosquitto", free_port(), tmp_path, passwd=pw, acl=acl)
    b.start()
    return b


def test_acl_lets_nodes_write_only_their_own_subtree(tmp_path: Path, procs: Procs) -> None:
    b = _secured_broker(tmp_path)
    try:
        t = Topics()  # the ACL is written for the default prefix
        procs.start("coordinator", "coordinator", "--broker", b.url_as("coordinator", "pw"))
        procs.start(
            "edge-01",
            "node",
            "--id",
            "edge-01",
            "--heartbeat",
            "0.5",
            "--broker",
            b.url_as("edge-01", "pw"),
        )
        client_url = b.url_as("client", "pw")
        view = wait_for(
            lambda: (
                (v := status_json(b, "mqinfer", client_url))["nodes"]
                and v["nodes"][0]["state"] == "online"
                and v["coordinator"]
                and v
            ),
            "edge-01 online under the ACL",
        )
        assert view["coordinator"]["state"] == "online"
        caps_before = view["nodes"][0]["host"]

        # edge-02 tries to mark edge-01 lost and to replace its capabilities; a client
        # tries to declare a service. The broker drops all three.
        lost = {"v": 1, "node": "edge-01", "state": "lost", "session": 1, "by": "will"}
        _publish_as(b, "edge-02", t.node_state("edge-01"), orjson.dumps(lost))
        _publish_as(b, "edge-02", t.node_caps("edge-01"), b'{"v":1}')
        _publish_as(
            b,
            "client",
            t.service_spec("evil"),
            orjson.dumps({"v": 1, "name": "evil", "model": "x"}),
        )
        # edge-02 may write its own subtree.
        own = {"v": 1, "node": "edge-02", "state": "offline", "session": 1}
        _publish_as(b, "edge-02", t.node_state("edge-02"), orjson.dumps(own))

        view = wait_for(
            lambda: len((v := status_json(b, "mqinfer", client_url))["nodes"]) == 2 and v,
            "edge-02's own state",
        )
        nodes = {n["id"]: n for n in view["nodes"]}
        assert nodes["edge-01"]["state"] == "online"
        assert nodes["edge-01"]["host"] == caps_before
        assert nodes["edge-02"]["state"] == "offline"
        assert view["services"] == []
    finally:
        b.stop()


def test_acl_allows_deploying_and_serving(tmp_path: Path, procs: Procs) -> None:
    """Under the shipped ACL the coordinator account deploys, a node fetches the artifact
    and answers, and a client gets results on result/ID and on an MQTT 5 response topic
    under mqinfer/replies/."""
    rr = need_client_tool("mosquitto_rr")
    b = _secured_broker(tmp_path)
    try:
        coord = b.url_as("coordinator", "pw")
        procs.start("coordinator", "coordinator", "--broker", coord)
        procs.node(b, "mqinfer", "edge-01", url=b.url_as("edge-01", "pw"))
        models = REPO / "models" / "digits"
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "mqinfer",
                "deploy",
                "--model",
                str(models / "digits_int8.tflite"),
                "--name",
                "digits",
                "--broker",
                coord,
                "--wait",
                "--timeout",
                "60",
            ],
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        sample = sorted((models / "samples").glob("digit_*.png"))[0]
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "mqinfer",
                "infer",
                "digits",
                str(sample),
                "--json",
                "--broker",
                b.url_as("client", "pw"),
                "--timeout",
                "30",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        result = orjson.loads(out.stdout)
        assert result["ok"] and result["top"][0]["label"] == sample.name.split("_")[1]
        body = orjson.dumps({"inputs": [[[0.0]] * 8] * 8}).decode()
        out = subprocess.run(
            [
                rr,
                "-h",
                "127.0.0.1",
                "-p",
                str(b.port),
                "-u",
                "client",
                "-P",
                "pw",
                "-t",
                Topics().service_request("digits"),
                "-e",
                "mqinfer/replies/me",
                "-m",
                body,
                "-W",
                "20",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert orjson.loads(out.stdout)["ok"] is True
    finally:
        b.stop()
