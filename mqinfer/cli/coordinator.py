"""`mqinfer coordinator` and `mqinfer status`."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

import orjson

from mqinfer import options
from mqinfer.coordinator import hub, status, web
from mqinfer.coordinator.agent import FORGET_AFTER, CoordinatorAgent
from mqinfer.coordinator.registry import Registry
from mqinfer.mqtt import AuthRefused, Brokers, MQTTError, session
from mqinfer.protocol.topics import Topics

log = logging.getLogger("mqinfer.coordinator")


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "coordinator",
        help="run the coordinator: the registry, provisioning, and the dispatcher on the hub",
        description="Run the coordinator. It rebuilds its registry from the broker's retained "
        "messages, follows node states and heartbeats (a node is lost on its Will or when its "
        "heartbeats stop for longer than --missed-beats of its intervals), places replicas, "
        "and gives each request to exactly one replica. Run a second one, on this machine or "
        "another, and it stands by: it takes over within a second when the active one dies.",
    )
    options.add_id(p, "coordinator", "COORDINATOR_ID")
    p.add_argument(
        "--missed-beats",
        type=float,
        default=options.env("MISSED_BEATS", "3"),
        help="a node is lost after this many heartbeat intervals of silence "
        "(default 3; MQINFER_MISSED_BEATS)",
    )
    p.add_argument(
        "--max-request-mb",
        type=float,
        default=float(options.env("MAX_REQUEST_MB", "16")),
        help="largest inference request the hub takes, in MB; bigger ones get a too_large "
        "error (env MQINFER_MAX_REQUEST_MB; default %(default)s)",
    )
    p.add_argument(
        "--forget-after",
        type=float,
        default=float(options.env("FORGET_AFTER", str(FORGET_AFTER))),
        help="seconds a node stays lost or offline before it is forgotten and its retained "
        "topics cleared (env MQINFER_FORGET_AFTER; default %(default)s)",
    )
    p.add_argument(
        "--http",
        metavar="[HOST:]PORT",
        default=options.env("HTTP", "") or None,
        help="serve the live cluster page (/), its events (/events), /status.json and "
        "Prometheus metrics (/metrics) on this address; a port alone listens on 127.0.0.1 "
        "only, 0.0.0.0:PORT on every interface (env MQINFER_HTTP; default: off)",
    )
    options.add_common(p)
    p.set_defaults(func=run_coordinator, parser=p)

    s = sub.add_parser(
        "status",
        help="show nodes and services (works without a running coordinator)",
        description="Read the retained cluster state from the broker and print it.",
    )
    s.add_argument("--json", action="store_true", help="print JSON: {nodes, services, coordinator}")
    s.add_argument(
        "--settle",
        type=float,
        default=0.5,
        help="seconds without new retained messages before printing (default %(default)s)",
    )
    s.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=2.0,
        metavar="SECONDS",
        help="redraw the table every SECONDS (default 2) from a live subscription, until "
        "Ctrl-C; with --json, one JSON view per line",
    )
    options.add_common(s)
    s.set_defaults(func=run_status, parser=s)


def run_coordinator(args: argparse.Namespace) -> int:
    url, topics = options.resolve(args.parser, args)
    if args.missed_beats < 1:
        args.parser.error("--missed-beats: expected a number >= 1")
    if args.forget_after <= 0:
        args.parser.error("--forget-after: expected a number of seconds > 0")
    if args.max_request_mb <= 0:
        args.parser.error("--max-request-mb: expected a number > 0")
    agent = CoordinatorAgent(
        topics,
        Registry(missed_beats=args.missed_beats),
        args.id,
        forget_after=args.forget_after,
        max_request_bytes=int(args.max_request_mb * 2**20),
    )
    server: web.Server | None = None
    if args.http:
        try:
            host, port = web.parse_address(args.http)
            server = web.serve(agent, host, port)
        except web.AddressError as e:
            args.parser.error(f"--http: {e}")
        except OSError as e:
            args.parser.error(f"--http {args.http}: cannot listen there: {e.strerror or e}")
        else:
            log.info("serving the cluster page on %s (metrics: %smetrics)", server.url, server.url)
    stop = options.stop_on_signals()
    try:
        return hub.run(agent, url, stop, protocol=args.mqtt_version)
    finally:
        if server is not None:
            server.stop()


def run_status(args: argparse.Namespace) -> int:
    url, topics = options.resolve(args.parser, args)
    if args.watch is not None:
        return _watch(args, url, topics)
    try:
        registry = status.collect(url, topics, args.mqtt_version, settle=args.settle)
    except MQTTError as e:
        print(f"mqinfer status: error: {e}", file=sys.stderr)
        return session.EXIT_AUTH if isinstance(e, AuthRefused) else 1
    view = status.as_json(registry)
    if args.json:
        sys.stdout.write(orjson.dumps(view, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(status.as_text(view))
    return 0


def _watch(args: argparse.Namespace, url: Brokers, topics: Topics) -> int:
    if not args.watch > 0:
        args.parser.error("--watch: expected a number of seconds > 0")
    stop = options.stop_on_signals()
    tty = sys.stdout.isatty()

    def show(view: dict[str, Any]) -> None:
        if args.json:
            sys.stdout.write(orjson.dumps(view).decode() + "\n")
        else:
            clear = "\x1b[H\x1b[2J" if tty else ""
            stamp = time.strftime("%H:%M:%S")
            sys.stdout.write(f"{clear}{status.as_text(view)}\n\n{stamp}, every {args.watch:g} s\n")
        sys.stdout.flush()

    try:
        status.watch(url, topics, args.mqtt_version, args.watch, show, stop, settle=args.settle)
    except MQTTError as e:
        print(f"mqinfer status: error: {e}", file=sys.stderr)
        return session.EXIT_AUTH if isinstance(e, AuthRefused) else 1
    return 0
