"""The shipped Node-RED flow and subflow (deploy/node-red/) in a real Node-RED 4.1.

Node-RED is installed from npm into ~/.cache/mqinfer-test/node-red (once; reused after)
and started with its own settings file and flow file in the test's folder. The test loads
the shipped files through Node-RED's admin API (POST /flows), with the broker node
pointed at the test's Mosquitto and the topics moved under the test's prefix, and adds
MQTT nodes of its own: one to give the subflow requests (`{prefix}/nodered/send/...`),
one to report what comes out (`{prefix}/nodered/got`). A digits replica answers, over
MQTT 3.1.1 and over MQTT 5 (response topic and correlation data).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from PIL import Image

from mqinfer.broker.ports import free_port
from tests.integration.harness import (
    LIMIT,
    REQUIRE_MOSQUITTO,
    Broker,
    Procs,
    start_coordinator,
    wait_for,
)
from tests.integration.requests import DIGITS, REPO, deploy

FLOWS = REPO / "deploy" / "node-red"
SAMPLES = DIGITS / "samples"
NODE_RED_VERSION = "4.1"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mqinfer-test"
REPORT = "7e57000000000010"
TIMEOUT_S = 8  # the subflow's timeout in this test's instances


def need_node_red() -> Path:
    """Node-RED 4.1's red.js, installed with npm into the cache folder when not there yet."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        missing = "node" if node is None else "npm"
        if REQUIRE_MOSQUITTO:
            pytest.fail(f"MQINFER_REQUIRE_MOSQUITTO=1 but {missing} is not installed")
        pytest.skip(f"{missing} is not installed (Debian: apt-get install nodejs npm)")
    home = CACHE / "node-red"
    home.mkdir(parents=True, exist_ok=True)
    red = home / "node_modules" / "node-red" / "red.js"
    package = home / "node_modules" / "node-red" / "package.json"
    with open(home / ".lock", "w") as lock:  # one installer at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        installed = json.loads(package.read_text())["version"] if package.exists() else ""
        if not installed.startswith(NODE_RED_VERSION + "."):
            out = subprocess.run(
                [
                    npm,
                    "install",
                    "--prefix",
                    str(home),
                    f"node-red@{NODE_RED_VERSION}",
                    "--no-audit",
                    "--no-fund",
                    "--loglevel=error",
                ],
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert out.returncode == 0, f"npm install node-red failed:\n{out.stdout}{out.stderr}"
    assert red.exists(), f"npm installed no {red}"
    return red


@dataclass
class NodeRed:
    port: int
    proc: subprocess.Popen[bytes]
    logfile: Path

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url(path), data=data, method=method)
        req.add_header("Content-Type", "application/json")
        req.add_header("Node-RED-Deployment-Type", "full")
        try:
            with urllib.request.urlopen(req, timeout=LIMIT) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def log(self) -> str:
        return self.logfile.read_text(errors="replace")


SETTINGS = """module.exports = {{
    uiHost: "127.0.0.1",
    uiPort: {port},
    userDir: {user_dir},
    flowFile: "flows.json",
    credentialSecret: false,
    httpAdminRoot: "/",
    disableEditor: true,
    telemetry: {{ enabled: false }},
    diagnostics: {{ enabled: false }},
    logging: {{ console: {{ level: "info", metrics: false, audit: false }} }},
}};
"""


@pytest.fixture
def node_red(tmp_path: Path) -> Iterator[NodeRed]:
    red = need_node_red()
    user_dir = tmp_path / "node-red"
    user_dir.mkdir()
    port = free_port()
    settings = user_dir / "settings.js"
    settings.write_text(SETTINGS.format(port=port, user_dir=json.dumps(str(user_dir))))
    logfile = tmp_path / "node-red.log"
    with open(logfile, "wb") as log:
        proc = subprocess.Popen(
            [shutil.which("node") or "node", str(red), "--settings", str(settings)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=user_dir,
        )
    nr = NodeRed(port, proc, logfile)

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"Node-RED exited ({proc.returncode}):\n{nr.log()}")
        try:
            return nr.call("GET", "/flows")[0] == 200
        except OSError:
            return False

    try:
        wait_for(up, "Node-RED's admin API", timeout=60)
        yield nr
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    print(f"----- Node-RED\n{nr.log()}")


# ---- the flows --------------------------------------------------------------------------


def shipped(name: str) -> list[dict[str, Any]]:
    nodes: list[dict[str, Any]] = json.loads((FLOWS / name).read_text())
    return nodes


def by_name(nodes: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (found,) = [n for n in nodes if n.get("name") == name]
    return found


def flows_for(broker: Broker, prefix: str, version: str) -> tuple[list[dict[str, Any]], str]:
    """The shipped example flow and subflow with the broker and prefix of this test, and a
    test tab: requests in from MQTT, through subflow instances, reported out on MQTT.
    Returns the flows and the id of the example's inject node."""
    example, subflow = shipped("example-flow.json"), shipped("mqinfer-request-subflow.json")
    brokers = [n for n in example + subflow if n["type"] == "mqtt-broker"]
    assert len({n["id"] for n in brokers}) == 1, "both files must share one broker node"
    assert brokers[0] == brokers[1], "the broker node must be the same in both files"
    conf = brokers[0]
    conf.update(broker="127.0.0.1", port=str(broker.port))
    conf["protocolVersion"] = "5" if version == "5" else "4"
    flows = [n for n in example if n["type"] != "mqtt-broker"]
    flows += [n for n in subflow if n["type"] != "mqtt-broker"] + [conf]

    # The example, moved under the test's prefix, reading the sample of a 7.
    read = by_name(example, "read the PNG")
    assert read["format"] == "", "the example must read the PNG as a single Buffer"
    read["filename"] = str(SAMPLES / "digit_7_0.png")
    request_id = by_name(example, "request id")
    assert request_id["rules"][0]["to"].startswith('"mqinfer/services/digits/request/"')
    request_id["rules"][0]["to"] = request_id["rules"][0]["to"].replace(
        '"mqinfer/', f'"{prefix}/', 1
    )
    results = by_name(example, "results")
    assert results["topic"] == "mqinfer/services/digits/result/+"
    assert results["datatype"] == "auto-detect"
    results["topic"] = f"{prefix}/services/digits/result/+"
    top = by_name(example, "top class")
    assert top["complete"] == "payload.top[0]" and top["wires"] == []

    (sf,) = [n for n in flows if n["type"] == "subflow"]
    assert sf["name"] == "mqinfer request"
    tab = "7e57000000000000"
    broker_id = conf["id"]

    def node(nid: str, **fields: Any) -> dict[str, Any]:
        return {"id": nid, "z": tab, "x": 100, "y": 100, **fields}

    def mqtt_in(nid: str, topic: str, datatype: str, to: str) -> dict[str, Any]:
        return node(
            nid,
            type="mqtt in",
            name="",
            topic=f"{prefix}/nodered/{topic}",
            qos="1",
            datatype=datatype,
            broker=broker_id,
            nl=False,
            rap=True,
            rh=0,
            inputs=0,
            wires=[[to]],
        )

    def mqtt_out(nid: str, topic: str) -> dict[str, Any]:
        return node(
            nid,
            type="mqtt out",
            name="",
            topic=f"{prefix}/nodered/{topic}",
            qos="1",
            retain="false",
            broker=broker_id,
            wires=[],
        )

    def mark(nid: str, to: str) -> dict[str, Any]:
        rule = {"t": "set", "p": "mark", "pt": "msg", "to": "kept", "tot": "str"}
        return node(nid, type="change", name="", rules=[rule], wires=[[to]])

    def instance(nid: str, service: str) -> dict[str, Any]:
        env = [
            {"name": "SERVICE", "type": "str", "value": service},
            {"name": "PREFIX", "type": "str", "value": prefix},
            {"name": "TIMEOUT", "type": "num", "value": str(TIMEOUT_S)},
            {"name": "MQTT5", "type": "bool", "value": "true" if version == "5" else "false"},
        ]
        return node(nid, type=f"subflow:{sf['id']}", name="", env=env, wires=[[REPORT]])

    report = (
        "msg.payload = {result: msg.payload, requestId: msg.requestId, topic: msg.topic,"
        " mark: msg.mark}; return msg;"
    )
    flows += [
        {"id": tab, "type": "tab", "label": "test", "disabled": False, "info": ""},
        # The example's results, as its debug node gets them, reported to the test.
        mqtt_out("7e57000000000001", "example"),
        # Readiness: a ping comes back as a pong once Node-RED is connected and subscribed.
        mqtt_in("7e57000000000002", "ping", "utf8", "7e57000000000003"),
        mqtt_out("7e57000000000003", "pong"),
        # Requests: a PNG as a Buffer, a JSON request as an object, to a service that is
        # deployed and to one that is not.
        mqtt_in("7e57000000000004", "send/png", "buffer", "7e57000000000008"),
        mqtt_in("7e57000000000005", "send/json", "json", "7e57000000000008"),
        mqtt_in("7e57000000000006", "send/nosuch", "buffer", "7e57000000000009"),
        # The first trap: a `file in` node left at its default, a UTF-8 string.
        mqtt_in("7e57000000000007", "send/text", "utf8", "7e5700000000000c"),
        node(
            "7e5700000000000c",
            type="file in",
            name="",
            filename=str(SAMPLES / "digit_0_24.png"),
            filenameType="str",
            format="utf8",
            chunk=False,
            sendError=False,
            encoding="none",
            allProps=False,
            wires=[["7e57000000000008"]],
        ),
        mark("7e57000000000008", "7e5700000000000a"),
        mark("7e57000000000009", "7e5700000000000b"),
        instance("7e5700000000000a", "digits"),
        instance("7e5700000000000b", "nosuch"),
        node(
            REPORT,
            type="function",
            name="report",
            func=report,
            outputs=1,
            timeout=0,
            noerr=0,
            initialize="",
            finalize="",
            libs=[],
            wires=[["7e57000000000011"]],
        ),
        mqtt_out("7e57000000000011", "got"),
    ]
    results["wires"][0].append("7e57000000000001")
    inject = by_name(example, "classify a digit")
    return flows, inject["id"]


# ---- the test's own MQTT client ---------------------------------------------------------


class Watcher:
    """A paho client (MQTT 5, to see response topics and correlation data) that records
    every message under the prefix."""

    def __init__(self, broker: Broker, prefix: str) -> None:
        self.prefix = prefix
        self.lock = threading.Lock()
        self.log: list[tuple[str, bytes, bytes | None, str | None]] = []
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"watcher-{uuid.uuid4().hex[:10]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        self.client.subscribe(f"{prefix}/#", qos=1)
        assert subscribed.wait(LIMIT), "watcher: no SUBACK"

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        props = msg.properties
        correlation = getattr(props, "CorrelationData", None) if props else None
        response = getattr(props, "ResponseTopic", None) if props else None
        with self.lock:
            self.log.append((msg.topic, bytes(msg.payload), correlation, response))

    def messages(self, topic: str) -> list[tuple[str, bytes, bytes | None, str | None]]:
        with self.lock:
            return [m for m in self.log if m[0] == f"{self.prefix}/{topic}"]

    def got(self) -> list[dict[str, Any]]:
        return [orjson.loads(m[1]) for m in self.messages("nodered/got")]

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(f"{self.prefix}/{topic}", payload, qos=1).wait_for_publish(LIMIT)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def thresholded(sample: str) -> list[Any]:
    """The sample's 8 x 8 pixels as JSON integers 0 and 1 (what JavaScript writes for
    1.0 and 0.0), [8][8][1]."""
    pixels = np.asarray(Image.open(SAMPLES / sample).convert("L"), dtype=np.uint8)
    return [[[int(v > 127)] for v in row] for row in pixels]


@pytest.mark.parametrize("version", ["3.1.1", "5"])
def test_node_red_flow_and_subflow(
    mosquitto: Broker, prefix: str, procs: Procs, node_red: NodeRed, version: str
) -> None:
    """The example flow classifies the sample 7 (a PNG read as one Buffer); the subflow
    answers a PNG Buffer and a JSON object of integers with the right digits, keeps the
    message's other properties, sends over MQTT 5 with a response topic and correlation
    data when set to, passes on the hub's error for a service that is not deployed, and
    says that no result came within its timeout when no coordinator runs."""
    coordinator = start_coordinator(mosquitto, prefix)
    procs.node(mosquitto, prefix, "n1")
    deploy(mosquitto, prefix, str(DIGITS / "service.yaml"), "--replicas", "1")
    watcher = Watcher(mosquitto, prefix)
    try:
        flows, inject = flows_for(mosquitto, prefix, version)
        status, body = node_red.call("POST", "/flows", flows)
        assert status in (200, 204), f"POST /flows: {status} {body!r}"

        pinged = [0.0]

        def ponged() -> bool:
            if watcher.messages("nodered/pong"):
                return True
            if time.monotonic() - pinged[0] > 0.5:
                pinged[0] = time.monotonic()
                watcher.publish("nodered/ping", b"ping")
            return False

        wait_for(ponged, "Node-RED to connect to Mosquitto and subscribe")

        # The example flow, as a user clicks its inject button.
        status, body = node_red.call("POST", f"/inject/{inject}")
        assert status == 200, f"POST /inject: {status} {body!r}"
        (example,) = wait_for(lambda: watcher.messages("nodered/example"), "the example's result")
        result = orjson.loads(example[1])
        assert result["ok"] is True, result
        assert result["top"][0]["label"] == "7", result["top"]

        # The subflow: a PNG as a Buffer.
        watcher.publish("nodered/send/png", (SAMPLES / "digit_3_2.png").read_bytes())
        (png,) = wait_for(lambda: watcher.got(), "the subflow's result for a PNG")
        assert png["result"]["ok"] is True, png
        assert png["result"]["top"][0]["label"] == "3"
        assert png["requestId"].startswith("nr-")
        assert png["result"]["request_id"] == png["requestId"]
        assert png["mark"] == "kept" and png["topic"] == f"{prefix}/nodered/send/png"

        # A JSON object whose numbers are integers 0 and 1: values, not quantized ones.
        body_json = orjson.dumps({"inputs": thresholded("digit_5_14.png")})
        watcher.publish("nodered/send/json", body_json)
        js = wait_for(lambda: watcher.got()[1:], "the subflow's result for JSON")[0]
        assert js["result"]["ok"] is True, js
        assert js["result"]["top"][0]["label"] == "5", js["result"]["top"]

        # How the requests went: MQTT 5 with a response topic and correlation data under
        # replies/nodered/, or MQTT 3.1.1 with the id in the topic.
        sent = (png["requestId"], js["requestId"])
        if version == "5":
            requests = watcher.messages("services/digits/request")
            assert sorted(m[2] or b"" for m in requests) == sorted(r.encode() for r in sent)
            assert {m[3] for m in requests} == {f"{prefix}/replies/nodered/digits"}
            replies = watcher.messages("replies/nodered/digits")
            assert sorted(m[2] or b"" for m in replies) == sorted(r.encode() for r in sent)
        else:
            for rid in sent:
                assert len(watcher.messages(f"services/digits/request/{rid}")) == 1
                assert len(watcher.messages(f"services/digits/result/{rid}")) == 1

        # The PNG read as a UTF-8 string: mqinfer says what happened and what to send.
        watcher.publish("nodered/send/text", b"go")
        text = wait_for(lambda: watcher.got()[2:], "the result for a PNG read as text")[0]
        assert text["result"]["ok"] is False, text
        assert text["result"]["error"]["code"] == "bad_payload"
        assert "starting 0xefbfbd50" in text["result"]["error"]["message"]
        assert "look like binary data read as text" in text["result"]["error"]["message"]
        assert "as a single Buffer" in text["result"]["error"]["message"]

        # A service that is not deployed: the hub says so at once, naming those that are.
        watcher.publish("nodered/send/nosuch", (SAMPLES / "digit_3_2.png").read_bytes())
        nosuch = wait_for(lambda: watcher.got()[3:], "the result for a missing service")[0]
        assert nosuch["result"]["ok"] is False
        assert nosuch["result"]["error"]["code"] == "unavailable"
        assert "no service named nosuch" in nosuch["result"]["error"]["message"]

        # No coordinator: nothing answers, and the subflow says so after its timeout.
        coordinator.shutdown()
        watcher.publish("nodered/send/png", (SAMPLES / "digit_8_7.png").read_bytes())
        late = wait_for(lambda: watcher.got()[4:], "the subflow's timeout", LIMIT + TIMEOUT_S)[0]
        assert late["result"]["ok"] is False, late
        assert late["result"]["error"]["code"] == "no_result"
        said = f"no result from mqinfer service 'digits' within {TIMEOUT_S} s"
        assert late["result"]["error"]["message"].startswith(said), late
        assert f"(request {late['requestId']})" in late["result"]["error"]["message"]
        assert late["mark"] == "kept"
        # Every request came out once: the answered ones' timers did not fire (theirs ran
        # out before this one's did).
        ids = [g["requestId"] for g in watcher.got()]
        assert len(ids) == 5 and len(set(ids)) == 5, ids
        assert "[error]" not in node_red.log()
    finally:
        watcher.close()
        coordinator.stop.set()
