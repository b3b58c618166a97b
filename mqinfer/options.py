"""Options every command shares: broker URL, topic prefix, MQTT version, logging, signals."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from types import FrameType

from mqinfer.mqtt import DEFAULT_BROKER, BrokerURL, parse_brokers
from mqinfer.protocol.topics import (
    DEFAULT_PREFIX,
    TopicError,
    Topics,
    check_id,
    node_id_from_hostname,
)


def env(name: str, default: str) -> str:
    return os.environ.get(f"MQINFER_{name}", default)


def _id(what: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        try:
            return check_id(text, what)
        except TopicError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def add_id(parser: argparse.ArgumentParser, what: str, env_name: str) -> None:
    """--id, defaulting to the hostname (made valid), with an environment override."""
    parser.add_argument(
        "--id",
        type=_id(f"{what} id"),
        default=env(env_name, node_id_from_hostname(socket.gethostname())),
        help=f"{what} id: 1-64 of A-Z a-z 0-9 _ - . (env MQINFER_{env_name}; default: hostname)",
    )


def add_common(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("broker")
    g.add_argument(
        "--broker",
        action="append",
        help="broker URL mqtt://[user:pass@]HOST:PORT or mqtts://...; repeat it (or separate "
        "URLs with commas) for the members of a clustered broker, tried in turn "
        f"(env MQINFER_BROKER; default {DEFAULT_BROKER})",
    )
    g.add_argument(
        "--prefix",
        default=env("PREFIX", DEFAULT_PREFIX),
        help="topic prefix, one or more levels (env MQINFER_PREFIX; default %(default)s)",
    )
    g.add_argument(
        "--mqtt-version",
        choices=["auto", "5", "3.1.1"],
        default=env("MQTT_VERSION", "auto"),
        help="MQTT protocol version; auto tries 5 then 3.1.1 (env MQINFER_MQTT_VERSION)",
    )
    g.add_argument(
        "--log-level",
        default=env("LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        help="log verbosity on stderr (env MQINFER_LOG_LEVEL; default %(default)s)",
    )


def resolve(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[list[BrokerURL], Topics]:
    """Validate the shared options; exit with a usage error naming what is wrong."""
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        url = parse_brokers(args.broker or env("BROKER", DEFAULT_BROKER))
    except ValueError as e:
        parser.error(str(e))
    try:
        topics = Topics(args.prefix)
    except TopicError as e:
        parser.error(f"--prefix: {e}")
    return url, topics


def stop_on_signals() -> threading.Event:
    """An event set by SIGINT or SIGTERM (for a clean shutdown)."""
    stop = threading.Event()

    def handler(_sig: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop
