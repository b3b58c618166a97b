"""``mqinfer broker``: run the embedded MQTT broker in the foreground."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys

from mqinfer.broker.embedded import PortInUse, serve

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 1883
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

DESCRIPTION = """\
Run an embedded MQTT broker (amqtt) for demos and single hosts.

It accepts anonymous clients only and offers no authentication: amqtt hands
retained messages to subscribers without checking its topic ACLs, has no shared
subscriptions and speaks MQTT 3.1.1 only (MQTT 5 clients are refused). Nothing
is persisted; retained messages are lost on restart. For production run
Mosquitto with the configuration in deploy/mosquitto/.
"""


def _port(value: str) -> int:
    """argparse type for a TCP port number."""
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is outside 1-65535")
    return port


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``broker`` subcommand."""
    parser = subparsers.add_parser(
        "broker",
        help="run an embedded MQTT 3.1.1 broker for demos (anonymous, not for production)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--host",
        default=os.environ.get("MQINFER_BROKER_HOST") or DEFAULT_HOST,
        help="address to listen on; 0.0.0.0 for all interfaces "
        "(default: %(default)s, env MQINFER_BROKER_HOST)",
    )
    parser.add_argument(
        "--port",
        type=_port,
        default=os.environ.get("MQINFER_BROKER_PORT") or str(DEFAULT_PORT),
        help="TCP port to listen on (default: %(default)s, env MQINFER_BROKER_PORT)",
    )
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=LOG_LEVELS,
        help="log level for broker messages on stderr (default: %(default)s)",
    )
    parser.set_defaults(func=run)


async def _serve_until_signalled(host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await serve(host, port, stop)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)


def run(args: argparse.Namespace) -> int:
    """Run the broker until SIGINT/SIGTERM; 0 on clean stop, 2 if it cannot listen."""
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        asyncio.run(_serve_until_signalled(args.host, args.port))
    except PortInUse as exc:
        print(f"mqinfer broker: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(
            f"mqinfer broker: error: cannot listen on {args.host}:{args.port}: {exc}",
            file=sys.stderr,
        )
        return 2
    return 0
