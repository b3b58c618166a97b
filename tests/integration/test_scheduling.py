"""Heterogeneous nodes: placement by measured speed, and requests dispatched by what the
hub measures, adapting when a node slows down. The slow nodes are made slow with the node's
--artificial-slowdown option (for experiments only), so the speed differences are real
ones in the model runs, not in anything the dispatcher reads from the nodes.

Ids in brackets are the MUSTs of topics.md that a test checks.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from mqinfer.protocol import codec
from mqinfer.protocol import messages as m
from mqinfer.protocol.topics import Topics
from tests.integration.harness import Broker, InProcessCoordinator, Observer, Procs, wait_for
from tests.integration.requests import REPO, Requester, deploy

MOBILENET = REPO / "models" / "mobilenet_v2" / "mobilenet_v2_int8.tflite"
DIGITS = REPO / "models" / "digits" / "digits_int8.tflite"


def served_by(req: Requester, count: int, tag: str) -> Counter[str]:
    """Send `count` MobileNetV2 frames, 8 in flight; how many each node answered."""
    rng = np.random.default_rng(len(tag))
    frames = {
        f"{tag}{i}": rng.integers(0, 256, 224 * 224 * 3, np.uint8).tobytes() for i in range(count)
    }
    results = req.run(frames, window=8, timeout=120)
    failed = [r for r in results.values() if not r["ok"]]
    assert not failed, failed[0]
    return Counter(str(r["node"]) for r in results.values())


def command(broker: Broker, prefix: str, node: str, op: str, **args: Any) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        payload = codec.encode(m.Command(id="x1", op=op, args=args))
        client.publish(Topics(prefix).node_cmd(node), payload, qos=1).wait_for_publish(10)
    finally:
        client.loop_stop()
        client.disconnect()


def test_the_fastest_node_gets_the_replica(
    broker: Broker, prefix: str, procs: Procs, coordinator: InProcessCoordinator, observer: Observer
) -> None:
    """With more compatible nodes than replicas, the fastest wins. The slowdown is
    announced as what it is, never as an accelerator."""
    procs.node(broker, prefix, "n1", "--artificial-slowdown", "4")
    procs.node(broker, prefix, "n2")
    procs.node(broker, prefix, "n3", "--artificial-slowdown", "4")
    wait_for(lambda: all(coordinator.state(n) == "online" for n in ("n1", "n2", "n3")), "online")
    t = Topics(prefix)
    caps = {n: observer.json(t.node_caps(n)) for n in ("n1", "n2", "n3")}
    assert all(c is not None for c in caps.values())
    assert caps["n1"]["artificial_slowdown"] == 4.0 and caps["n2"]["artificial_slowdown"] == 1.0  # type: ignore[index]
    assert all([a["kind"] for a in c["accelerators"]] == ["cpu"] for c in caps.values())  # type: ignore[index]
    deploy(broker, prefix, "--model", str(DIGITS), "--name", "d")
    st = observer.json(t.service_status("d"))
    assert st is not None and [r["node"] for r in st["replicas"]] == ["n2"]


def test_a_fast_node_serves_more_and_a_node_that_slows_down_gets_less(
    broker: Broker, prefix: str, procs: Procs, coordinator: InProcessCoordinator, observer: Observer
) -> None:
    """[T-WORK-4] two replicas, one node 4x slower: each takes as much work as its workers
    and a prefetch can hold, so the fast node answers most and the slow one its share.
    When the fast node slows down to 8x, the hub measures it and sends it less."""
    procs.node(broker, prefix, "fast")
    procs.node(broker, prefix, "slow", "--artificial-slowdown", "4")
    wait_for(lambda: all(coordinator.state(n) == "online" for n in ("fast", "slow")), "online")
    deploy(broker, prefix, "--model", str(MOBILENET), "--name", "mnv2", "--replicas", "2")
    req = Requester(broker, prefix, "mnv2")
    try:
        first = served_by(req, 150, "a")
        assert first["fast"] > 2 * first["slow"], first
        assert first["slow"] > 0, first  # the slow node still takes its share

        command(broker, prefix, "fast", "artificial_slowdown", factor=8)
        served_by(req, 40, "b")  # the hub measures the new speed as they serve
        second = served_by(req, 150, "c")
        assert second["slow"] > second["fast"], second
    finally:
        req.close()


def test_a_redeploy_with_new_constraints_moves_the_replicas(
    broker: Broker, prefix: str, procs: Procs, coordinator: InProcessCoordinator, observer: Observer
) -> None:
    """[T-COORD-6] deploy on every node, then again asking for a label only n1 has: the
    replicas leave the nodes without it (had they stayed, the surplus would go from n1
    first), and the service is ready on n1 alone, serving."""
    procs.node(broker, prefix, "n1", "--label", "zone=lab")
    procs.node(broker, prefix, "n2")
    procs.node(broker, prefix, "n3")
    wait_for(lambda: all(coordinator.state(n) == "online" for n in ("n1", "n2", "n3")), "online")
    t = Topics(prefix)
    deploy(broker, prefix, "--model", str(DIGITS), "--name", "d", "--replicas", "3")
    deploy(
        broker, prefix, "--model", str(DIGITS), "--name", "d", "--replicas", "1",
        "--label", "zone=lab",
    )  # fmt: skip

    def only_n1() -> bool:
        st = observer.json(t.service_status("d"))
        beats = [observer.json(t.node_heartbeat(n)) or {} for n in ("n2", "n3")]
        return (
            st is not None
            and st["state"] == "ready"
            and [r["node"] for r in st["replicas"]] == ["n1"]
            and all("d" not in b.get("services", {}) for b in beats)
        )

    wait_for(only_n1, "the replica on n1 only, the others undeployed")
    sample = sorted((DIGITS.parent / "samples").glob("digit_*.png"))[0]
    requester = Requester(broker, prefix, "d")
    try:
        [result] = requester.run({"after-move": sample.read_bytes()}).values()
    finally:
        requester.close()
    assert result["ok"] and result["node"] == "n1"
    assert result["top"][0]["label"] == sample.name.split("_")[1]
