"""Client ids that another account cannot work out ([T-HUB-1], topics.md §11): Mosquitto
lets any account connect with any client id and closes the connection that held it."""

from __future__ import annotations

from pathlib import Path

from mqinfer.coordinator.agent import hub_client_id
from mqinfer.mqtt import BrokerURL
from mqinfer.mqtt.url import TLSFiles
from mqinfer.node.agent import NodeAgent
from mqinfer.protocol.topics import Topics

T = Topics("site/mqinfer")


def test_the_hub_id_depends_on_its_credentials_and_is_the_same_for_its_standbys(
    tmp_path: Path,
) -> None:
    plain = BrokerURL("hub", 1883)
    alice = BrokerURL("hub", 1883, username="coordinator", password="s3cret")
    other = BrokerURL("hub", 1883, username="coordinator", password="guess")
    ids = {hub_client_id(T, u) for u in (plain, alice, other)}
    assert len(ids) == 3 and all(i.startswith("mqinfer-hub-") for i in ids)
    assert hub_client_id(T, alice) == hub_client_id(T, [alice, BrokerURL("b", 1)])
    assert hub_client_id(Topics("other"), alice) != hub_client_id(T, alice)
    key = tmp_path / "hub.key"
    key.write_text("one")
    first = hub_client_id(T, BrokerURL("hub", 8883, tls=True, tls_files=TLSFiles(key=str(key))))
    key.write_text("two")
    second = hub_client_id(T, BrokerURL("hub", 8883, tls=True, tls_files=TLSFiles(key=str(key))))
    assert first != second


def test_a_node_id_is_not_what_its_heartbeats_tell(tmp_path: Path) -> None:
    agent = NodeAgent.__new__(NodeAgent)
    agent.node_id = "edge-1"
    session = 0x196D8F2A6B1
    one, two = agent.client_id(session), agent.client_id(session)
    assert one.startswith(f"mqinfer-node-edge-1-{session:x}-") and one != two
