"""Discovery over real brokers: nodes announce, die, return; the coordinator keeps up.

Each test runs against a Mosquitto process and against the embedded amqtt broker. Ids in
brackets are the MUSTs of topics.md that a test checks.
"""

from __future__ import annotations

import importlib.metadata
import os
import signal
import subprocess
import sys
from typing import Any

import orjson

from mqinfer.node.capabilities import probe_host
from mqinfer.protocol.topics import Topics
from tests.integration.harness import (
    Broker,
    CuttingProxy,
    InProcessCoordinator,
    Observer,
    Procs,
    start_coordinator,
    wait_for,
)
from tests.integration.requests import mqinfer


def status_json(broker: Broker, prefix: str, url: str | None = None) -> dict[str, Any]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mqinfer",
            "status",
            "--json",
            "--broker",
            url or broker.url,
            "--prefix",
            prefix,
        ],
        capture_output=True,
        timeout=60,
        check=True,
    )
    return orjson.loads(out.stdout)  # type: ignore[no-any-return]


def state_of(obs: Observer, prefix: str, node: str) -> dict[str, Any] | None:
    return obs.json(Topics(prefix).node_state(node))


def observed(obs: Observer, prefix: str, node: str, state: str) -> dict[str, Any]:
    """Wait until the observer's last retained state of `node` is `state`; return it."""
    return wait_for(  # type: ignore[no-any-return]
        lambda: (s := state_of(obs, prefix, node)) and s["state"] == state and s,
        f"the observer to see {node} {state}",
    )


def test_two_nodes_online_with_real_capabilities(
    broker: Broker, prefix: str, procs: Procs, coordinator: InProcessCoordinator
) -> None:
    """[T-NODE-2] [T-CAPS-1] both nodes appear online with what this machine really has."""
    procs.node(broker, prefix, "alpha", "--label", "site=lab")
    procs.node(broker, prefix, "beta")
    for n in ("alpha", "beta"):
        wait_for(lambda n=n: coordinator.state(n) == "online", f"{n} online")
        wait_for(lambda n=n: coordinator.agent.registry.nodes[n].caps, f"{n} caps")

    caps = coordinator.agent.registry.nodes["alpha"].caps
    assert caps is not None
    assert caps.runtimes["litert"].version == importlib.metadata.version("ai-edge-litert")
    assert caps.runtimes["onnxruntime"].version == importlib.metadata.version("onnxruntime")
    assert sorted(caps.formats) == ["onnx", "tflite"]
    assert [a.kind for a in caps.accelerators] == ["cpu"]  # nothing invented on this machine
    assert "edgetpu" in caps.absent
    assert caps.host.cores == probe_host().cores == len(os.sched_getaffinity(0))
    assert caps.labels == {"site": "lab"}

    view = status_json(broker, prefix)
    nodes = {n["id"]: n for n in view["nodes"]}
    assert set(nodes) == {"alpha", "beta"}
    for n in nodes.values():
        assert n["state"] == "online"
        assert n["accelerators"] == ["cpu"]
        assert n["runtimes"]["onnxruntime"] == importlib.metadata.version("onnxruntime")
        assert n["heartbeat_age_s"] is not None
    assert view["coordinator"]["state"] == "online"
    assert view["services"] == []


def test_status_cut_off_while_reading_reads_it_again(
    broker: Broker, prefix: str, procs: Procs, coordinator: InProcessCoordinator
) -> None:
    """`mqinfer status` whose connection is dropped while the retained state comes in
    reads it again on a new connection: it never shows part of the state as the whole."""
    for n in ("alpha", "beta"):
        procs.node(broker, prefix, n)
    for n in ("alpha", "beta"):
        wait_for(lambda n=n: coordinator.state(n) == "online", f"{n} online")
        wait_for(lambda n=n: coordinator.agent.registry.nodes[n].caps, f"{n} caps")
    proxy = CuttingProxy(broker.port)
    proxy.cut_after(1000, from_broker=True)  # two nodes' caps alone are more
    try:
        out = mqinfer("status", "--json", "--broker", proxy.url, "--prefix", prefix, timeout=60)
    finally:
        proxy.close()
    assert out.returncode == 0, out.stderr
    assert proxy.cuts == 1
    assert "; reading again" in out.stderr, out.stderr  # cut before or after the SUBACK
    view = orjson.loads(out.stdout)
    assert {n["id"]: n["state"] for n in view["nodes"]} == {"alpha": "online", "beta": "online"}
    assert all(n["runtimes"] for n in view["nodes"])


def test_kill9_marks_node_lost_other_stays_online(
    broker: Broker, prefix: str, procs: Procs, coordinator: InProcessCoordinator, observer: Observer
) -> None:
    """[T-STATE-1] the Will marks a killed node lost; the other node is untouched."""
    a = procs.node(broker, prefix, "alpha")
    procs.node(broker, prefix, "beta")
    for n in ("alpha", "beta"):
        wait_for(lambda n=n: coordinator.state(n) == "online", f"{n} online")

    a.kill9()
    wait_for(lambda: coordinator.state("alpha") == "lost", "alpha lost")
    assert observed(observer, prefix, "alpha", "lost")["by"] == "will"
    assert coordinator.state("beta") == "online"
    observed(observer, prefix, "beta", "online")


def test_restarted_node_is_online_and_late_will_is_ignored(
    broker: Broker, prefix: str, procs: Procs, coordinator: InProcessCoordinator, observer: Observer
) -> None:
    """[T-STATE-3] a Will from an old session arriving after the new one does not mark it lost."""
    old = procs.node(broker, prefix, "alpha")
    wait_for(lambda: coordinator.state("alpha") == "online", "alpha online")
    old_session = observed(observer, prefix, "alpha", "online")["session"]

    # The old process hangs (its TCP connection stays open), a new one takes the id.
    old.signal(signal.SIGSTOP)
    procs.node(broker, prefix, "alpha")
    registry = coordinator.agent.registry
    wait_for(lambda: (registry.nodes["alpha"].session or 0) > old_session, "the new session")
    new_session = registry.nodes["alpha"].session
    assert coordinator.state("alpha") == "online"

    # Now the old connection dies: the broker publishes its Will, late.
    old.kill9()
    topic = Topics(prefix).node_state("alpha")
    wait_for(
        lambda: any(
            s["state"] == "lost" and s["session"] == old_session for s in observer.seen(topic)
        ),
        "the old session's Will",
    )
    # The node re-asserts its own state over the stale Will; the coordinator never wavered.
    wait_for(
        lambda: (
            (s := state_of(observer, prefix, "alpha"))
            and s["state"] == "online"
            and s["session"] == new_session
        ),
        "retained state back to the new session's online",
    )
    wait_for(
        lambda: any("old session" in why for why in registry.ignored),
        "the coordinator to ignore the late Will",
    )
    assert coordinator.state("alpha") == "online"
    assert registry.nodes["alpha"].session == new_session
    # The new session was never marked lost (the stopped old one may time out first, under load).
    assert not [
        c
        for c in coordinator.agent.changes
        if c.node == "alpha" and c.new == "lost" and c.session == new_session
    ]


def test_node_restart_after_kill_comes_back_online(
    broker: Broker, prefix: str, procs: Procs, coordinator: InProcessCoordinator, observer: Observer
) -> None:
    """[T-NODE-2] a new session announces caps, then 'online', over the old 'lost'."""
    a = procs.node(broker, prefix, "alpha")
    wait_for(lambda: coordinator.state("alpha") == "online", "alpha online")
    first = coordinator.agent.registry.nodes["alpha"].session
    a.kill9()
    wait_for(lambda: coordinator.state("alpha") == "lost", "alpha lost")
    procs.node(broker, prefix, "alpha")
    wait_for(lambda: coordinator.state("alpha") == "online", "alpha online again")
    second = coordinator.agent.registry.nodes["alpha"].session or 0
    assert second > (first or 0)

    t = Topics(prefix)
    wait_for(
        lambda: observer.json(t.node_state("alpha"))["session"] == second,  # type: ignore[index]
        "the observer to see the new session",
    )
    with observer.lock:
        mine = [
            (topic, orjson.loads(p))
            for topic, p, _ in observer.log
            if p and topic in (t.node_caps("alpha"), t.node_state("alpha"))
        ]
    mine = [(topic, msg) for topic, msg in mine if msg["session"] == second]
    assert [topic for topic, _ in mine][:2] == [t.node_caps("alpha"), t.node_state("alpha")]
    assert [msg["state"] for topic, msg in mine if topic == t.node_state("alpha")] == ["online"]


def test_heartbeat_timeout_marks_lost_and_node_recovers(
    broker: Broker, prefix: str, procs: Procs, observer: Observer
) -> None:
    """[T-COORD-1] silence past missed-beats x interval is 'lost', published retained."""
    coordinator = start_coordinator(broker, prefix, missed_beats=3)
    try:
        _timeout_and_recovery(coordinator, broker, prefix, procs, observer)
    finally:
        coordinator.shutdown()


def _timeout_and_recovery(
    coordinator: InProcessCoordinator, broker: Broker, prefix: str, procs: Procs, observer: Observer
) -> None:
    a = procs.node(broker, prefix, "alpha")
    wait_for(lambda: coordinator.state("alpha") == "online", "alpha online")
    a.signal(signal.SIGSTOP)  # connection open, heartbeats stopped
    wait_for(lambda: coordinator.state("alpha") == "lost", "alpha lost by timeout")
    state = observed(observer, prefix, "alpha", "lost")
    assert state["by"] == "coordinator"
    assert "no heartbeat" in state["reason"]
    a.signal(signal.SIGCONT)
    wait_for(lambda: coordinator.state("alpha") == "online", "alpha online after it resumed")
    observed(observer, prefix, "alpha", "online")  # re-asserted by the node


def test_clean_shutdown_publishes_offline(
    broker: Broker, prefix: str, procs: Procs, coordinator: InProcessCoordinator, observer: Observer
) -> None:
    """[T-STATE-2] SIGTERM: retained 'offline' and exit 0; no Will."""
    a = procs.node(broker, prefix, "alpha")
    wait_for(lambda: coordinator.state("alpha") == "online", "alpha online")
    assert a.terminate() == 0
    wait_for(lambda: coordinator.state("alpha") == "offline", "alpha offline")
    assert observed(observer, prefix, "alpha", "offline")["by"] == "node"
    topic = Topics(prefix).node_state("alpha")
    assert not [s for s in observer.seen(topic) if s["state"] == "lost"]


def test_broker_restart_everyone_reconnects(
    broker: Broker, prefix: str, procs: Procs, coordinator: InProcessCoordinator
) -> None:
    """Nodes and the coordinator reconnect and re-announce by themselves."""
    procs.node(broker, prefix, "alpha")
    procs.node(broker, prefix, "beta")
    registry = coordinator.agent.registry
    for n in ("alpha", "beta"):
        wait_for(lambda n=n: coordinator.state(n) == "online", f"{n} online")
    before = {n: registry.nodes[n].session or 0 for n in ("alpha", "beta")}

    broker.restart()

    for n in ("alpha", "beta"):
        wait_for(
            lambda n=n: (
                (registry.nodes[n].session or 0) > before[n] and registry.nodes[n].state == "online"
            ),
            f"{n} back with a new session",
        )
    view = wait_for(
        lambda: (
            (v := status_json(broker, prefix))["coordinator"]
            and v["coordinator"]["state"] == "online"
            and v
        ),
        "coordinator online again",
    )
    assert {n["id"]: n["state"] for n in view["nodes"]} == {"alpha": "online", "beta": "online"}
    assert all(n["accelerators"] == ["cpu"] for n in view["nodes"])


def test_coordinator_restart_rebuilds_registry(broker: Broker, prefix: str, procs: Procs) -> None:
    """[T-COORD-2] a new coordinator rebuilds the registry from retained messages."""
    first = start_coordinator(broker, prefix)
    try:
        a = procs.node(broker, prefix, "alpha")
        procs.node(broker, prefix, "beta")
        for n in ("alpha", "beta"):
            wait_for(lambda n=n: first.state(n) == "online", f"{n} online")
        a.kill9()
        wait_for(lambda: first.state("alpha") == "lost", "alpha lost")
    finally:
        first.shutdown()
    before = {k: (r.state, r.session, r.caps) for k, r in first.agent.registry.nodes.items()}

    procs.node(broker, prefix, "gamma")  # joins while no coordinator runs
    second = start_coordinator(broker, prefix)
    try:
        wait_for(lambda: second.state("gamma") == "online", "gamma seen by the new coordinator")
        wait_for(lambda: all(second.agent.registry.nodes.get(k) for k in before), "old nodes")
        for k, (state, session, caps) in before.items():
            rec = second.agent.registry.nodes[k]
            assert (rec.state, rec.session) == (state, session)
            assert rec.caps == caps
    finally:
        second.shutdown()


def test_malformed_messages_are_logged_and_ignored(
    broker: Broker, prefix: str, procs: Procs, coordinator: InProcessCoordinator, caplog: Any
) -> None:
    """[T-COORD-3] garbage on every topic the coordinator reads changes nothing."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    procs.node(broker, prefix, "alpha")
    wait_for(lambda: coordinator.state("alpha") == "online", "alpha online")
    # A standby's registry sees alpha first: wait until the coordinator holds the hub and
    # has subscribed there, or what is sent while it moves over reaches neither connection.
    wait_for(lambda: "test: active (session" in caplog.text, "the coordinator active")
    t = Topics(prefix)
    topics = [
        t.node_caps("alpha"),
        t.node_state("alpha"),
        t.node_heartbeat("alpha"),
        t.node_reply("alpha"),
        t.service_spec("svc"),
        t.service_status("svc"),
        t.node_state("ghost"),
        f"{prefix}/nodes/bad id!/state",
    ]
    payloads = [
        b"\x00\xff\xfe garbage",
        b"{not json",
        b"[1, 2, 3]",
        orjson.dumps({"node": "alpha", "state": 5, "session": "abc"}),
        orjson.dumps({"v": 99, "node": "alpha"}),
        orjson.dumps({"node": "someone-else", "state": "lost", "session": 1}),
        b'{"pad": "' + b"x" * 1_000_000 + b'"}',
    ]
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    infos = [client.publish(topic, p, qos=1) for topic in topics for p in payloads]
    for info in infos:
        info.wait_for_publish(30)
    client.loop_stop()
    client.disconnect()

    read_by_coordinator = len(topics) - 1  # all but the reply topic, which it does not decode
    wait_for(
        lambda: (
            len([r for r in caplog.records if "ignored message" in r.getMessage()])
            >= len(payloads) * read_by_coordinator
        ),
        "every bad message to be logged",
    )
    text = caplog.text
    for reason in (
        "bad_encoding",
        "bad_message",
        "unsupported_version",
        "mismatch",
        "too_large",
        "invalid node id 'bad id!'",
    ):
        assert reason in text, reason
    assert coordinator.thread.is_alive()
    assert coordinator.state("alpha") == "online"
    assert "ghost" not in coordinator.agent.registry.nodes
    # A spec that cannot be read is answered with a failed status saying why.
    services = coordinator.agent.registry.services
    assert set(services) <= {"svc"}
    wait_for(lambda: services["svc"].status if "svc" in services else None, "its status")
    svc = services["svc"]
    assert svc.spec is None and svc.status is not None and svc.status.state == "failed"
    assert svc.status.reason is not None and svc.status.reason.startswith("too_large")
    # Still working: a new node is registered after all that.
    procs.node(broker, prefix, "beta")
    wait_for(lambda: coordinator.state("beta") == "online", "beta online")


def test_coordinator_asks_a_live_node_without_caps_to_announce(
    broker: Broker, prefix: str, procs: Procs, coordinator: InProcessCoordinator, observer: Observer
) -> None:
    """Caps cleared from the broker: the coordinator sends 'announce' and gets them back."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    procs.node(broker, prefix, "alpha")
    registry = coordinator.agent.registry
    wait_for(lambda: registry.nodes.get("alpha") and registry.nodes["alpha"].caps, "alpha caps")
    t = Topics(prefix)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    client.publish(t.node_caps("alpha"), b"", qos=1, retain=True).wait_for_publish(10)
    client.loop_stop()
    client.disconnect()

    wait_for(
        lambda: any(c.get("op") == "announce" for c in observer.seen(t.node_cmd("alpha"))),
        "the coordinator's announce command",
    )
    wait_for(lambda: registry.nodes["alpha"].caps is not None, "caps announced again")
    reply = wait_for(lambda: observer.seen(t.node_reply("alpha")), "the node's reply")[0]
    assert reply["ok"] is True
    assert observer.json(t.node_caps("alpha"))["node"] == "alpha"  # type: ignore[index]
