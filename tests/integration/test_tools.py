"""What users see with the real client tools and the mqinfer commands."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

from mqinfer.broker.ports import free_port
from mqinfer.protocol.topics import Topics
from tests.integration.harness import (
    Broker,
    Observer,
    Procs,
    need_client_tool,
    need_mosquitto,
    wait_for,
)
from tests.integration.test_discovery import status_json


def test_mosquitto_sub_shows_announcements_as_readable_json(
    broker: Broker, prefix: str, procs: Procs, observer: Observer
) -> None:
    """[T-PAY-1] anyone can read the node tree with mosquitto_sub -v."""
    procs.node(broker, prefix, "alpha")
    t = Topics(prefix)
    wait_for(lambda: observer.json(t.node_heartbeat("alpha")), "alpha's first heartbeat")
    out = subprocess.run(
        [
            need_client_tool("mosquitto_sub"),
            "-h",
            "127.0.0.1",
            "-p",
            str(broker.port),
            "-t",
            f"{prefix}/nodes/#",
            "-v",
            "-C",
            "3",
            "-W",
            "20",
            "--retained-only",
        ],
        capture_output=True,
        timeout=60,
        text=True,
        check=True,
    )
    seen = {}
    for line in out.stdout.splitlines():
        topic, _, payload = line.partition(" ")
        seen[topic] = orjson.loads(payload)
    assert set(seen) == {t.node_caps("alpha"), t.node_state("alpha"), t.node_heartbeat("alpha")}
    assert seen[t.node_state("alpha")]["state"] == "online"
    assert seen[t.node_caps("alpha")]["node"] == "alpha"
    assert seen[t.node_caps("alpha")]["accelerators"][0]["kind"] == "cpu"


def test_status_works_without_a_coordinator(broker: Broker, prefix: str, procs: Procs) -> None:
    """[T-STATUS-1] status reads the retained state itself."""
    procs.node(broker, prefix, "alpha")
    view = wait_for(
        lambda: (
            (v := status_json(broker, prefix))["nodes"] and v["nodes"][0]["state"] == "online" and v
        ),
        "alpha in status",
    )
    assert view["coordinator"] is None
    assert view["nodes"][0]["id"] == "alpha"
    text = subprocess.run(
        [sys.executable, "-m", "mqinfer", "status", "--broker", broker.url, "--prefix", prefix],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "alpha" in text and "online" in text and "coordinator: none seen" in text


def test_service_spec_and_status_show_in_status(broker: Broker, prefix: str) -> None:
    """Retained service specs/status published by hand appear in `mqinfer status --json`;
    [T-STATUS-2] a status is shown only when the coordinator's retained state names its
    session."""
    t = Topics(prefix)
    pub = need_client_tool("mosquitto_pub")
    spec = {
        "v": 1,
        "name": "digits",
        "model": "models/digits.tflite",
        "artifact": "ab" * 32,
        "format": "tflite",
        "replicas": 2,
    }
    status = {
        "v": 1,
        "name": "digits",
        "state": "ready",
        "replicas": [{"node": "alpha", "state": "ready"}],
        "session": 7,
        "seq": 3,
    }
    other = {**status, "state": "failed", "session": 8, "seq": 99}
    coordinator = {"v": 1, "id": "hub", "state": "online", "session": 7}
    for topic, payload in (
        (t.service_spec("digits"), spec),
        (t.service_status("digits"), other),
        (t.coordinator_state(), coordinator),
    ):
        subprocess.run(
            [
                pub,
                "-h",
                "127.0.0.1",
                "-p",
                str(broker.port),
                "-t",
                topic,
                "-r",
                "-q",
                "1",
                "-m",
                orjson.dumps(payload).decode(),
            ],
            check=True,
            timeout=30,
        )
    view = status_json(broker, prefix)
    (service,) = view["services"]
    assert service["state"] == "unknown"  # the status of session 8 is not the coordinator's
    subprocess.run(
        [
            pub,
            "-p",
            str(broker.port),
            "-t",
            t.service_status("digits"),
            "-r",
            "-q",
            "1",
            "-m",
            orjson.dumps(status).decode(),
        ],
        check=True,
        timeout=30,
    )
    view = status_json(broker, prefix)
    (service,) = view["services"]
    assert service["name"] == "digits" and service["state"] == "ready"
    assert service["reason"] is None
    assert service["replicas"] == [{"node": "alpha", "state": "ready"}]
    assert {k: service["spec"][k] for k in spec} == spec  # plus the defaults of the others
    assert service["spec"]["deadline_ms"] == 10_000


def test_commands_get_exactly_one_reply(
    broker: Broker, prefix: str, procs: Procs, observer: Observer
) -> None:
    """[T-CMD-1] [T-CMD-2] known ops answer ok; unknown or malformed ones get an error code."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    procs.node(broker, prefix, "alpha")
    t = Topics(prefix)
    # Commands sent the moment 'online' is seen are not missed: the node subscribed first.
    wait_for(
        lambda: (observer.json(t.node_state("alpha")) or {}).get("state") == "online",
        "alpha online",
    )
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    cmds = {
        "p1": orjson.dumps({"v": 1, "id": "p1", "op": "ping"}),
        "u1": orjson.dumps({"v": 1, "id": "u1", "op": "fly"}),
        "b1": orjson.dumps({"v": 1, "id": "b1", "op": 42}),
    }
    for payload in [*cmds.values(), b"\xff not json"]:
        client.publish(t.node_cmd("alpha"), payload, qos=1).wait_for_publish(10)
    client.loop_stop()
    client.disconnect()
    replies = wait_for(
        lambda: len(r := observer.seen(t.node_reply("alpha"))) >= 4 and r, "four replies"
    )
    by_id = {r.get("id"): r for r in replies}
    assert len(replies) == 4
    assert by_id["p1"]["ok"] is True and "pong" in by_id["p1"]["result"]
    assert by_id["u1"]["error"]["code"] == "unknown_command"
    assert "ping" in by_id["u1"]["error"]["message"]
    assert by_id["b1"]["error"]["code"] == "bad_message"
    assert by_id[None]["error"]["code"] == "bad_encoding"


def test_refused_credentials_exit_nonzero(tmp_path: Path, procs: Procs) -> None:
    """A wrong password is fatal: exit status 3 and a message that says why."""
    need_mosquitto()
    pw = tmp_path / "passwd"
    subprocess.run(
        [need_client_tool("mosquitto_passwd"), "-b", "-c", str(pw), "edge", "right"],
        check=True,
        timeout=30,
    )
    b = Broker("mosquitto", free_port(), tmp_path, passwd=pw)
    b.start()
    try:
        prefix = f"t{uuid.uuid4().hex[:8]}"
        bad = procs.start(
            "bad",
            "node",
            "--broker",
            b.url_as("edge", "wrong"),
            "--prefix",
            prefix,
            "--id",
            "alpha",
        )
        assert bad.proc.wait(60) == 3
        assert "Bad user name or password" in bad.log() or "Not authorized" in bad.log()
        good = procs.start(
            "good",
            "node",
            "--broker",
            b.url_as("edge", "right"),
            "--prefix",
            prefix,
            "--id",
            "alpha",
            "--heartbeat",
            "0.5",
        )
        view = wait_for(
            lambda: (v := status_json(b, prefix, b.url_as("edge", "right")))["nodes"] and v,
            "good node seen",
        )
        assert view["nodes"][0]["state"] == "online"
        assert good.terminate() == 0
    finally:
        b.stop()


def test_coordinator_cli_runs_and_stops_cleanly(
    broker: Broker, prefix: str, procs: Procs, observer: Observer
) -> None:
    """`mqinfer coordinator` announces itself retained and says 'offline' on SIGTERM."""
    c = procs.start(
        "coordinator", "coordinator", "--broker", broker.url, "--prefix", prefix, "--id", "main"
    )
    t = Topics(prefix)
    wait_for(
        lambda: (observer.json(t.coordinator_state()) or {}).get("state") == "online",
        "coordinator online",
    )
    assert c.terminate() == 0
    wait_for(
        lambda: (observer.json(t.coordinator_state()) or {}).get("state") == "offline",
        "coordinator offline",
    )


def test_coordinator_will_marks_it_lost(
    broker: Broker, prefix: str, procs: Procs, observer: Observer
) -> None:
    c = procs.start("coordinator", "coordinator", "--broker", broker.url, "--prefix", prefix)
    t = Topics(prefix)
    wait_for(
        lambda: (observer.json(t.coordinator_state()) or {}).get("state") == "online",
        "coordinator online",
    )
    c.kill9()
    wait_for(
        lambda: (observer.json(t.coordinator_state()) or {}).get("state") == "lost",
        "coordinator lost by its Will",
    )


def test_mosquitto_config_keeps_retained_messages_across_restart(mosquitto: Broker) -> None:
    """The shipped config has persistence on: retained state survives a broker restart."""
    pub, sub = need_client_tool("mosquitto_pub"), need_client_tool("mosquitto_sub")
    topic = f"t{uuid.uuid4().hex[:8]}/mqinfer/nodes/alpha/state"
    payload = '{"v":1,"node":"alpha","state":"online","session":7}'
    subprocess.run(
        [pub, "-p", str(mosquitto.port), "-t", topic, "-r", "-q", "1", "-m", payload],
        check=True,
        timeout=30,
    )
    mosquitto.restart()
    out = subprocess.run(
        [sub, "-p", str(mosquitto.port), "-t", topic, "-C", "1", "-W", "10", "--retained-only"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert out.stdout.strip() == payload


def test_client_sockets_have_tcp_nodelay(broker: Broker) -> None:
    """Without TCP_NODELAY a QoS 1 round trip waits for delayed ACKs (~88 ms, not ~0.6 ms)."""
    import socket

    from mqinfer.mqtt import Connection

    conn = Connection(broker.broker_url, f"nodelay-{uuid.uuid4().hex[:8]}", lambda _m: None)
    conn.open()
    try:
        sock = conn._client.socket()  # type: ignore[union-attr]
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert conn.version == ("3.1.1" if broker.kind == "amqtt" else "5")
    finally:
        conn.close()


def test_demo_shows_a_live_cluster() -> None:
    """`mqinfer demo` (what `make demo` runs) brings up a cluster, shows it and stops cleanly."""
    out = subprocess.run(
        [sys.executable, "-m", "mqinfer", "demo", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    rows = {
        line.split()[0]: line.split()[1]
        for line in out.stdout.splitlines()
        if line.startswith("demo-node-")
    }
    assert rows == {"demo-node-1": "online", "demo-node-2": "online"}
    assert "coordinator: demo online" in out.stdout
    assert "stopped the nodes and the coordinator cleanly" in out.stdout
    assert "Traceback" not in out.stderr


def test_mqtts_url_connects_with_tls(tmp_path: Path, procs: Procs) -> None:
    """mqtts:// verifies the broker against the system's CAs (here a test CA via SSL_CERT_FILE)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    need_mosquitto()

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=60)

    names = ("ca.pem", "server.key", "server.csr", "server.pem")
    ca, key, csr, cert = (tmp_path / n for n in names)
    ca_key = tmp_path / "ca.key"
    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=test CA",
        "-keyout",
        str(ca_key),
        "-out",
        str(ca),
    )
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        str(key),
        "-out",
        str(csr),
    )
    ext = tmp_path / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    run(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca),
        "-CAkey",
        str(ca_key),
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        str(ext),
        "-out",
        str(cert),
    )

    # TLS on the derived config's listener.
    b = Broker("mosquitto", free_port(), tmp_path, extra_conf=f"certfile {cert}\nkeyfile {key}\n")
    b.start()
    try:
        url = f"mqtts://127.0.0.1:{b.port}"
        env = {**os.environ, "SSL_CERT_FILE": str(ca)}
        node = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mqinfer",
                "node",
                "--id",
                "alpha",
                "--broker",
                url,
                "--heartbeat",
                "0.5",
            ],
            env=env,
            stderr=subprocess.PIPE,
        )
        try:

            def status() -> dict[str, Any] | None:
                out = subprocess.run(
                    [sys.executable, "-m", "mqinfer", "status", "--json", "--broker", url],
                    capture_output=True,
                    timeout=60,
                    env=env,
                )
                return orjson.loads(out.stdout) if out.returncode == 0 else None

            # Wait for 'online' itself: on a loaded machine the retained state was once
            # seen saying 'lost' for a moment before the node's 'online' came.
            wait_for(
                lambda: (v := status()) and v["nodes"] and v["nodes"][0]["state"] == "online" and v,
                "alpha online over TLS",
            )
            # Without the CA the broker's certificate is refused, with a clear error.
            out = subprocess.run(
                [sys.executable, "-m", "mqinfer", "status", "--broker", url],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert out.returncode == 1
            assert "CERTIFICATE_VERIFY_FAILED" in out.stderr
        finally:
            node.terminate()
            node.wait(15)
    finally:
        b.stop()
