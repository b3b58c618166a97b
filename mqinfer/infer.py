"""`mqinfer infer SERVICE FILE...`: send files as requests and print the results.

Each file goes to `services/{service}/request/{id}` and its result comes back on
`services/{service}/result/{id}`, which works on MQTT 3.1.1 and 5 alike. The payload is the
file's bytes as they are: the node tells PNG, JPEG, .npy, JSON and raw tensors apart.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

from mqinfer import options
from mqinfer.link import Link, check
from mqinfer.mqtt import Brokers, Connection, Message, MQTTError
from mqinfer.protocol.topics import Kind, Topics

EXIT_ERRORS = 1  # some request got an error result
EXIT_TIMEOUT = 4  # some request got no result in time
# Seconds without any answer after which a service with no retained spec is taken as not
# deployed, when no coordinator answers (with one, its `unavailable` comes at once).
NO_SPEC_GRACE = 2.0


class NoSuchService(Exception):
    """The service is not deployed: the message names the services that are."""


def request(
    url: Brokers,
    topics: Topics,
    service: str,
    payloads: list[bytes],
    timeout: float = 30.0,
    protocol: str = "auto",
) -> list[dict[str, Any] | None]:
    """Send each payload as a request; the results in order (None: none in time).

    Raises NoSuchService as soon as it is clear that the service is not deployed: no
    retained spec names it, and the coordinator answered `unavailable` (it names the
    services it has), or nothing answered within NO_SPEC_GRACE seconds."""
    base = uuid.uuid4().hex[:12]
    ids = [f"{base}-{i}" for i in range(len(payloads))]
    results: dict[str, dict[str, Any]] = {}
    specs: set[str] = set()  # the services with a retained spec: the deployed ones
    done = threading.Event()
    lock = threading.Lock()

    def on_message(message: Message) -> None:
        try:
            ref = topics.parse(message.topic)
        except ValueError:
            return
        if ref.kind is Kind.SERVICE_SPEC and ref.service is not None:
            with lock:
                if message.payload:
                    specs.add(ref.service)
                else:  # an empty retained spec: the service was undeployed
                    specs.discard(ref.service)
            return
        try:
            body = orjson.loads(message.payload)
        except orjson.JSONDecodeError:
            return
        if ref.request_id in ids and isinstance(body, dict):
            with lock:
                results.setdefault(ref.request_id, body)
                if len(results) == len(ids):
                    done.set()

    def not_deployed(waited: float) -> str | None:
        with lock:
            if service in specs:
                return None
            for result in results.values():
                error = result.get("error") or {}
                if error.get("code") == "unavailable":
                    return str(error.get("message"))
            if results or waited < NO_SPEC_GRACE:
                return None
            known = ", ".join(sorted(specs)) or "none"
        return (
            f"no service named {service} is deployed (services: {known}), and no coordinator "
            f"answered within {NO_SPEC_GRACE:g} s"
        )

    link = Link(url, protocol, on_message, "infer")
    try:
        # The specs first: retained, they arrive before any answer to the requests below.
        link.follow(
            [
                (topics.all_services(Kind.SERVICE_SPEC), 1),
                (topics.service_result(service) + "/+", 1),
            ]
        )
        start = time.monotonic()
        sent_on: list[Connection | None] = [None]  # the connection the requests went on

        def serve(conn: Connection) -> None:
            # On a new connection, whatever has no result yet is sent again under its id:
            # one served already is answered again, not served twice ([T-REQ-4]).
            if conn is not sent_on[0]:
                sent_on[0] = conn
                with lock:
                    todo = [
                        (rid, p) for rid, p in zip(ids, payloads, strict=True) if rid not in results
                    ]
                for rid, payload in todo:
                    conn.publish(topics.service_request(service, rid), payload, qos=1)
            while True:
                check(conn)
                finished = done.wait(0.05)
                waited = time.monotonic() - start
                why = not_deployed(waited)
                if why is not None:
                    raise NoSuchService(why)
                if finished or waited >= timeout:
                    return

        if ids:
            link.run(serve)
        with lock:
            return [results.get(rid) for rid in ids]
    finally:
        link.close()


def describe(result: dict[str, Any]) -> str:
    """One line a person can read."""
    if not result.get("ok"):
        err = result.get("error") or {}
        return f"error {err.get('code')}: {err.get('message')}"
    where = f"[{result.get('node')}, {result.get('timing', {}).get('total_ms', 0):.1f} ms]"
    top = result.get("top")
    if top:
        best = top[0]
        return f"{best['label']} ({best['score']:.3f}) {where}"
    shapes = ", ".join(f"{o['name']} {o['dtype']}{o['shape']}" for o in result.get("outputs", []))
    return f"{shapes} {where}"


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "infer",
        help="send files to a service and print the results",
        description="Send each FILE (PNG, JPEG, .npy, JSON or raw tensor bytes) to the "
        "service and print one line per result, or the result JSON with --json. "
        "Exit 1 if a result is an error or the service is not deployed (said at once, "
        "naming the services that are), 4 if a result did not come in time.",
    )
    p.add_argument("service", help="service name")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    p.add_argument("--json", action="store_true", help="print each result as JSON, one a line")
    p.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds to wait for all results (default %(default)s)",
    )
    options.add_common(p)
    p.set_defaults(func=run, parser=p)


def run(args: argparse.Namespace) -> int:
    url, topics = options.resolve(args.parser, args)
    try:
        topics.service_request(args.service)
    except ValueError as e:
        args.parser.error(str(e))
    payloads = []
    for path in args.files:
        try:
            payloads.append(path.read_bytes())
        except OSError as e:
            args.parser.error(f"{path}: {e.strerror}")
    start = time.monotonic()
    try:
        results = request(url, topics, args.service, payloads, args.timeout, args.mqtt_version)
    except MQTTError as e:
        print(f"mqinfer infer: {e}", file=sys.stderr)
        return 1
    except NoSuchService as e:
        print(f"mqinfer infer: error: {e}", file=sys.stderr)
        return EXIT_ERRORS
    status = 0
    for path, result in zip(args.files, results, strict=True):
        if result is None:
            status = EXIT_TIMEOUT
            line = f"no result within {args.timeout:.0f} s (is the service deployed?)"
            print(
                f"{path}: {line}"
                if not args.json
                else orjson.dumps(
                    {"file": str(path), "ok": False, "error": {"code": "timeout", "message": line}}
                ).decode()
            )
            continue
        if not result.get("ok") and status == 0:
            status = EXIT_ERRORS
        if args.json:
            print(orjson.dumps({"file": str(path), **result}).decode())
        else:
            print(f"{path}: {describe(result)}")
    print(f"{len(results)} results in {time.monotonic() - start:.2f} s", file=sys.stderr)
    return status
