"""`mqinfer node`: run the edge agent on this machine."""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

from mqinfer import options
from mqinfer.keys import KeyFileError, load_public_key
from mqinfer.mqtt import session
from mqinfer.node.agent import NodeAgent
from mqinfer.node.capabilities import probe_host, probe_of
from mqinfer.node.fetch import META_WAIT
from mqinfer.node.runtimes import RUNTIMES, backends_of, registry, unknown_runtimes
from mqinfer.protocol import signing

log = logging.getLogger("mqinfer.node")


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "node",
        help="run an edge node: announce capabilities, heartbeat, take commands",
        description="Run an edge node. It probes this machine (CPU, memory, runtimes, "
        "Edge TPU, GPUs), publishes a retained capability announcement and 'online' state, "
        "heartbeats, and reconnects by itself. SIGINT/SIGTERM publish 'offline' and exit.",
    )
    options.add_id(p, "node", "NODE_ID")
    p.add_argument(
        "--heartbeat",
        type=float,
        default=options.env("HEARTBEAT", "5"),
        help="seconds between heartbeats (env MQINFER_HEARTBEAT; default %(default)s)",
    )
    p.add_argument(
        "--label",
        type=_label,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a label placement constraints can match; repeatable",
    )
    p.add_argument(
        "--cache-dir",
        default=options.env("CACHE_DIR", ""),
        help="where model artifacts are cached by sha256 (env MQINFER_CACHE_DIR; "
        "default ~/.cache/mqinfer/NODE_ID)",
    )
    p.add_argument(
        "--max-request-mb",
        type=float,
        default=float(options.env("MAX_REQUEST_MB", "16")),
        help="largest inference request accepted, in MB; bigger ones get a too_large "
        "error (env MQINFER_MAX_REQUEST_MB; default %(default)s)",
    )
    p.add_argument(
        "--max-model-mb",
        type=float,
        default=float(options.env("MAX_MODEL_MB", "0")) or None,
        help="largest model file this node takes in, in MB; never more than half its "
        "available memory (env MQINFER_MAX_MODEL_MB; default: that half)",
    )
    p.add_argument(
        "--artifact-wait",
        type=float,
        default=float(options.env("ARTIFACT_WAIT", str(META_WAIT))),
        help="seconds to wait for a model's retained meta on the broker before a deploy "
        "fails with artifact_missing (env MQINFER_ARTIFACT_WAIT; default %(default)s)",
    )
    p.add_argument(
        "--max-workers",
        type=int,
        default=int(options.env("MAX_WORKERS", "0")) or None,
        help="run at most this many worker threads (interpreters) per replica, whatever "
        "the service asks (env MQINFER_MAX_WORKERS; default: as the service asks)",
    )
    p.add_argument(
        "--artificial-slowdown",
        type=float,
        default=1.0,
        metavar="FACTOR",
        help="FOR EXPERIMENTS ONLY: make every model run FACTOR times slower (it sleeps "
        "after each run), to try heterogeneous pools on one machine; announced as "
        "artificial_slowdown, never as hardware (default 1: off)",
    )
    p.add_argument(
        "--runtime",
        action="append",
        default=None,
        metavar="NAME",
        help=f"use only this runtime ({', '.join(RUNTIMES)}); repeatable. Where several "
        "runtimes can run a model, the node measures each at deploy and serves with the "
        "fastest; it announces only the runtimes it uses, and stops with an error if one "
        "named does not import here (env MQINFER_RUNTIMES, comma-separated; default: "
        "every runtime that imports)",
    )
    p.add_argument(
        "--trust-key",
        type=Path,
        action="append",
        default=None,
        metavar="FILE",
        help="run only deploys whose spec is signed by this Ed25519 public key (NAME.pub of "
        "`mqinfer keys generate`); repeatable; others are refused with `untrusted` before "
        "anything is fetched (env MQINFER_TRUST_KEYS: paths separated by ':' or ','; "
        "default: no keys, every spec runs)",
    )
    options.add_common(p)
    p.set_defaults(func=run, parser=p)


def trusted_keys(parser: argparse.ArgumentParser, paths: list[Path] | None) -> signing.TrustedKeys:
    """The keys of --trust-key, or else of MQINFER_TRUST_KEYS; a file that is not an Ed25519
    public key stops the node with a message saying so."""
    if paths is None:
        listed = options.env("TRUST_KEYS", "")
        paths = [Path(p) for p in re.split(r"[:,]", listed) if p.strip()]
    keys = []
    for path in paths:
        try:
            keys.append(load_public_key(path))
        except KeyFileError as e:
            parser.error(f"--trust-key: {e}")
    return signing.trusted(keys)


def runtimes_wanted(parser: argparse.ArgumentParser, names: list[str] | None) -> list[str] | None:
    """The runtimes of --runtime, or else of MQINFER_RUNTIMES; None: every one. A name
    that is not a runtime stops the node with a message listing the known ones."""
    source = "--runtime"
    if names is None:
        names = [options.env("RUNTIMES", "")]
        source = "MQINFER_RUNTIMES"
    wanted = [n.strip() for text in names for n in text.split(",") if n.strip()]
    if not wanted:
        if source == "--runtime":
            parser.error("--runtime: expected a runtime name")
        return None
    unknown = unknown_runtimes(wanted)
    if unknown:
        parser.error(
            f"{source}: unknown runtime {', '.join(repr(n) for n in unknown)}; "
            f"expected {', '.join(RUNTIMES)}"
        )
    return list(dict.fromkeys(wanted))


def run(args: argparse.Namespace) -> int:
    url, topics = options.resolve(args.parser, args)
    node_id = args.id
    if args.heartbeat <= 0:
        args.parser.error("--heartbeat: expected a number of seconds > 0")
    wanted = runtimes_wanted(args.parser, args.runtime)
    host = probe_host()
    survey = registry.survey_here(wanted)  # every runtime probed once, here
    probe = probe_of(survey)
    missing = [name for name in wanted or () if name not in probe.runtimes]
    if missing:
        args.parser.error(
            "; ".join(
                f"runtime {name} is not usable here: {probe.absent[name]}" for name in missing
            )
        )
    log.info(
        "node %s: %s, %d cores; runtimes %s; accelerators %s",
        node_id,
        host.arch,
        host.cores,
        ", ".join(f"{k} {r.version}" for k, r in probe.runtimes.items()) or "none",
        ", ".join(a.kind for a in probe.accelerators),
    )
    if args.max_request_mb <= 0:
        args.parser.error("--max-request-mb: expected a number > 0")
    if args.max_model_mb is not None and args.max_model_mb <= 0:
        args.parser.error("--max-model-mb: expected a number > 0")
    if args.artifact_wait <= 0:
        args.parser.error("--artifact-wait: expected a number of seconds > 0")
    if args.max_workers is not None and args.max_workers < 1:
        args.parser.error("--max-workers: expected 1 or more")
    if not 1 <= args.artificial_slowdown <= 100:
        args.parser.error("--artificial-slowdown: expected a factor from 1 to 100")
    if args.artificial_slowdown > 1:
        log.warning(
            "node %s: artificial slowdown x%g (for experiments only)",
            node_id,
            args.artificial_slowdown,
        )
    trusted = trusted_keys(args.parser, args.trust_key)
    if trusted:
        log.info("node %s: runs only specs signed by trusted keys %s", node_id, ", ".join(trusted))
    else:
        log.info("node %s: no trusted keys (--trust-key): runs any spec, signed or not", node_id)
    backends = backends_of(survey.backends())
    agent = NodeAgent(
        node_id,
        topics,
        probe,
        host,
        args.heartbeat,
        dict(args.label),
        backends=backends,
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        max_request_bytes=int(args.max_request_mb * 1024 * 1024),
        max_workers=args.max_workers,
        artificial_slowdown=args.artificial_slowdown,
        max_model_bytes=int(args.max_model_mb * 2**20) if args.max_model_mb else None,
        artifact_wait=args.artifact_wait,
    )
    agent.provisioning.trust(trusted)
    stop = options.stop_on_signals()
    try:
        return session.run(agent, url, stop, protocol=args.mqtt_version)
    finally:
        agent.close()
