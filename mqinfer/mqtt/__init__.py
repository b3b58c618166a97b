"""The MQTT transport every mqinfer component stands on: broker URLs, one connection (paho,
public API only), and the session loop. It knows topics only as strings; the wire contract
is mqinfer.protocol's."""

from mqinfer.mqtt.connection import (
    SUBSCRIBE_RETRIES,
    AuthRefused,
    ConnectError,
    Connection,
    Message,
    MQTTError,
    NotConnected,
    Outgoing,
    Persistence,
    SubscribeRefused,
    Will,
)
from mqinfer.mqtt.url import DEFAULT_BROKER, Brokers, BrokerURL, parse_brokers

__all__ = [
    "DEFAULT_BROKER",
    "SUBSCRIBE_RETRIES",
    "AuthRefused",
    "BrokerURL",
    "Brokers",
    "ConnectError",
    "Connection",
    "MQTTError",
    "Message",
    "NotConnected",
    "Outgoing",
    "Persistence",
    "SubscribeRefused",
    "Will",
    "parse_brokers",
]
