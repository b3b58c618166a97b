"""What crosses between brokers in the two multi-broker setups of clusters.py.

A three-server NATS cluster (JetStream, MQTT gateway) and two Mosquittos joined by an MQTT 5
bridge: retained messages, Wills and QoS 1 messages published at one broker reach
subscribers at another; the cluster keeps carrying messages with one server down; the
bridge stops carrying them when cut and carries them again once healed. Plain paho clients
only, so these tests say what the brokers do, independent of mqinfer's own client.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.clusters import (
    BridgedMosquittos,
    NatsCluster,
    ProbeClient,
    Received,
    Will,
    publish_acked,
)
from tests.integration.harness import wait_for


class Clients:
    """Opens ProbeClients for one test and closes them all after it."""

    def __init__(self) -> None:
        self.opened: list[ProbeClient] = []

    def __call__(self, url: str, will: Will | None = None) -> ProbeClient:
        client = ProbeClient(url, will=will)
        self.opened.append(client)
        return client

    def close(self) -> None:
        for client in self.opened:
            client.close()


def _failed(request: pytest.FixtureRequest) -> bool:
    rep = getattr(request.node, "rep_call", None)
    return bool(rep is not None and rep.failed)


@pytest.fixture
def nats(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NatsCluster]:
    """A started three-server cluster, stopped after the test (logs printed on failure)."""
    cluster = NatsCluster(tmp_path / "nats")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        if _failed(request):
            for i in range(len(cluster.servers)):
                print(f"----- nats-{i}\n{cluster.log(i)[-6000:]}")


@pytest.fixture
def bridged(
    request: pytest.FixtureRequest, tmp_path: Path, prefix: str
) -> Iterator[BridgedMosquittos]:
    """A started hub and site bridging the test's prefix, stopped after the test."""
    pair = BridgedMosquittos(tmp_path / "bridged", prefix)
    try:
        pair.start()
        yield pair
    finally:
        pair.stop()
        if _failed(request):
            for name in ("hub", "site"):
                print(f"----- {name}\n{pair.log(name)[-6000:]}")


@pytest.fixture
def connect() -> Iterator[Clients]:
    """`connect(url, will=None)` opens a ProbeClient that is closed after the test."""
    clients = Clients()
    yield clients
    clients.close()


def retained_at(connect: Clients, url: str, topic: str, payload: bytes) -> Received:
    """The retained message a new subscriber at `url` gets for `topic`.

    A new client subscribes (QoS 0) until the retained message is there: the broker may
    store it a little after forwarding it live, and a cluster's other servers learn of it
    a little later still.
    """

    def one_try() -> Received | None:
        late = connect(url)
        try:
            late.subscribe(topic, qos=0)
            return late.wait_message(topic, payload, timeout=2)
        except (ConnectionError, AssertionError):
            return None
        finally:
            late.close()

    found: Received = wait_for(one_try, f"{payload!r} retained on {topic} at {url}")
    return found


def publish_until_seen(url: str, subscriber: ProbeClient, topic: str) -> None:
    """Publish at `url` until `subscriber` has received a message on `topic`.

    On NATS, a SUBACK says only that the subscriber's own server has the subscription; the
    other servers learn of it over their routes a little later (once 4 s later, behind a
    route stalled on a JetStream request), and a message published at one of them before
    then misses a QoS 0 subscriber for good. Tests use this as a barrier: what is published
    at `url` afterwards must reach the subscriber.
    """

    def attempt() -> bool:
        publish_acked(url, topic, b"x")
        try:
            subscriber.wait_message(topic, timeout=1)
        except AssertionError:
            return False
        return True

    wait_for(attempt, f"{topic} from {url} at {subscriber.url}")


# --- NATS ---------------------------------------------------------------------------------


def test_nats_retained_and_will_cross_servers(
    nats: NatsCluster, connect: Clients, prefix: str
) -> None:
    status, will = f"{prefix}/status", f"{prefix}/will"
    watcher = connect(nats.urls[0])
    watcher.subscribe(f"{prefix}/#", qos=0)
    publish_until_seen(nats.urls[1], watcher, f"{prefix}/ready")

    publisher = connect(nats.urls[0])
    publisher.publish(status, b"online", qos=1, retain=True)
    got = retained_at(connect, nats.urls[2], status, b"online")
    assert got.retain

    dying = connect(nats.urls[1], will=Will(will, b"lost", qos=1, retain=True))
    dying.drop()
    live = watcher.wait_message(will, b"lost")
    assert not live.retain  # MQTT 3.1.1: live copies are not flagged retained
    assert retained_at(connect, nats.urls[2], will, b"lost").retain


def test_nats_qos1_messages_flow_between_servers(
    nats: NatsCluster, connect: Clients, prefix: str
) -> None:
    subscribers = [connect(url) for url in nats.urls]
    for sub in subscribers:
        assert sub.subscribe(f"{prefix}/#", qos=1, retry=True) == 1
        for url in nats.urls:
            publish_until_seen(url, sub, f"{prefix}/ready")
    publishers = [connect(url) for url in nats.urls]
    for i, pub in enumerate(publishers):
        pub.publish(f"{prefix}/from/{i}", f"m{i}".encode(), qos=1)
    for sub in subscribers:
        for i in range(len(publishers)):
            assert sub.wait_message(f"{prefix}/from/{i}", f"m{i}".encode()).qos == 1


def test_nats_carries_messages_with_one_server_down_and_back(
    nats: NatsCluster, connect: Clients, prefix: str
) -> None:
    # Subscribers are in place before the loss: while a server is down, a new QoS 1
    # subscription can be refused for a minute (its JetStream consumer cannot be made).
    # Those made before keep receiving (their consumers have three replicas).
    at0, at2 = connect(nats.urls[0]), connect(nats.urls[2])
    at0.subscribe(f"{prefix}/#", qos=1, retry=True)
    at2.subscribe(f"{prefix}/#", qos=1, retry=True)
    publish_until_seen(nats.urls[2], at0, f"{prefix}/ready")
    publish_until_seen(nats.urls[0], at2, f"{prefix}/ready")

    nats.kill(1)
    publish_acked(nats.urls[0], f"{prefix}/down/0", b"a")
    publish_acked(nats.urls[2], f"{prefix}/down/2", b"b")
    at2.wait_message(f"{prefix}/down/0", b"a")
    at0.wait_message(f"{prefix}/down/2", b"b")

    nats.start_server(1)
    publish_acked(nats.urls[1], f"{prefix}/back/1", b"c")
    at0.wait_message(f"{prefix}/back/1", b"c")
    at2.wait_message(f"{prefix}/back/1", b"c")
    at1 = connect(nats.urls[1])
    at1.subscribe(f"{prefix}/#", qos=0)
    publish_until_seen(nats.urls[0], at1, f"{prefix}/back/0")


# --- Bridged Mosquittos -------------------------------------------------------------------


@pytest.mark.mosquitto
@pytest.mark.parametrize("direction", ["site-to-hub", "hub-to-site"])
def test_bridge_carries_retained_messages_and_wills(
    bridged: BridgedMosquittos, connect: Clients, prefix: str, direction: str
) -> None:
    source, target = (
        (bridged.site_url, bridged.hub_url)
        if direction == "site-to-hub"
        else (bridged.hub_url, bridged.site_url)
    )
    status, will = f"{prefix}/status", f"{prefix}/will"
    watcher = connect(target)
    watcher.subscribe(f"{prefix}/#", qos=1)

    connect(source).publish(status, b"online", qos=1, retain=True)
    assert watcher.wait_message(status, b"online").qos == 1
    assert retained_at(connect, target, status, b"online").retain

    dying = connect(source, will=Will(will, b"lost", qos=1, retain=True))
    dying.drop()
    watcher.wait_message(will, b"lost")
    assert retained_at(connect, target, will, b"lost").retain


@pytest.mark.mosquitto
def test_bridge_cut_stops_the_flow_and_heal_restores_it(
    bridged: BridgedMosquittos, connect: Clients, prefix: str
) -> None:
    hub, site = connect(bridged.hub_url), connect(bridged.site_url)
    hub.subscribe(f"{prefix}/#", qos=1)
    site.subscribe(f"{prefix}/#", qos=1)
    hub.subscribe(bridged.state_topic, qos=0)
    hub.wait_message(bridged.state_topic, b"1")

    bridged.cut()
    hub.wait_message(bridged.state_topic, b"0")  # the bridge's Will, at the hub
    site.publish(f"{prefix}/queued-at-site", b"s", qos=1)
    hub.publish(f"{prefix}/retained-at-hub", b"h", qos=1, retain=True)
    # The bridge has tried again and been refused: nothing can have crossed.
    refused = bridged.link.refused
    wait_for(lambda: bridged.link.refused > refused, "the bridge to retry while cut")
    assert not hub.messages(f"{prefix}/queued-at-site")
    assert not site.messages(f"{prefix}/retained-at-hub")

    bridged.heal()
    # The site queued its QoS 1 message for the bridge; the hub sends its retained
    # messages again when the bridge subscribes. (A non-retained QoS 1 message published
    # at the hub during the cut is lost: the MQTT 5 bridge's session ends on disconnect.)
    hub.wait_message(f"{prefix}/queued-at-site", b"s")
    site.wait_message(f"{prefix}/retained-at-hub", b"h")
    hub.publish(f"{prefix}/after", b"a", qos=1)
    site.wait_message(f"{prefix}/after", b"a")
    site.publish(f"{prefix}/after-site", b"b", qos=1)
    hub.wait_message(f"{prefix}/after-site", b"b")
