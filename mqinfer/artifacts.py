"""`mqinfer artifacts list|rm|gc`: the model files kept on the broker.

Every model deployed stays on the broker as retained messages (topics.md §4.5): its meta
and its chunks, until someone clears them. These commands read the retained metas and
service specs, say which artifact each service uses (a pipeline uses each segment's), and
clear the ones asked for, or every one no spec uses, with empty retained messages: the
meta first, so no node starts a fetch of an artifact half gone, then each chunk.
"""

from __future__ import annotations

import argparse
import re
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import orjson

from mqinfer import options
from mqinfer.link import Link, check
from mqinfer.mqtt import (
    SUBSCRIBE_RETRIES,
    AuthRefused,
    Brokers,
    Connection,
    Message,
    MQTTError,
    session,
)
from mqinfer.protocol import codec
from mqinfer.protocol import messages as m
from mqinfer.protocol.errors import ProtocolError
from mqinfer.protocol.topics import TABLE, Kind, TopicError, Topics

EXIT_NOT_FOUND = 1  # rm: an artifact named is not on the broker
EXIT_REFUSED = 2  # rm: a spec still uses an artifact named (and no --force); usage errors
MIN_AGE = 600.0  # gc: seconds an unused artifact is kept after its upload (a deploy under way)
SETTLE = 0.5  # seconds without a new retained message before the picture is taken as whole
READ_LIMIT = 10.0  # seconds the retained metas and specs may take to arrive, at most
SCAN_LIMIT = 300.0  # the same, when every chunk is read too
SHORT = 12  # hex digits of a sha256 shown in listings
MIN_PREFIX = 8  # hex digits `rm` needs to name an artifact by a prefix of its sha256
_SHA256 = re.compile(rb"\b[0-9a-f]{64}\b")
_HEX = re.compile(r"[0-9a-f]{8,64}")


def wildcard(topics: Topics, kind: Kind) -> str:
    """The filter for every topic of `kind` (each {field} a `+`)."""
    pattern = next(spec.pattern for spec in TABLE if spec.kind == kind)
    levels = ["+" if level.startswith("{") else level for level in pattern.split("/")]
    return "/".join([topics.prefix, *levels])


@dataclass
class Artifact:
    """One artifact as the broker holds it."""

    sha256: str
    meta: m.ArtifactMeta | None = None
    problem: str | None = None  # why the retained meta could not be read
    chunks_seen: set[int] = field(default_factory=set)  # when the chunks were read

    @property
    def state(self) -> str:
        if self.meta is not None:
            return "complete"
        return "bad_meta" if self.problem is not None else "incomplete"

    def chunk_indices(self) -> set[int]:
        """Every chunk to clear: those the meta names and any seen besides."""
        named = set(range(self.meta.chunks)) if self.meta is not None else set()
        return named | self.chunks_seen


@dataclass
class Inventory:
    """What the retained messages say: artifacts, and which services use which."""

    artifacts: dict[str, Artifact] = field(default_factory=dict)
    users: dict[str, set[str]] = field(default_factory=dict)  # sha256 -> service names
    unreadable_specs: dict[str, str] = field(default_factory=dict)  # service -> why

    def artifact(self, sha256: str) -> Artifact:
        return self.artifacts.setdefault(sha256, Artifact(sha256))

    def used_by(self, sha256: str) -> list[str]:
        return sorted(self.users.get(sha256, ()))

    def take(self, topics: Topics, message: Message) -> None:
        """One retained message (an empty one clears what its topic held)."""
        try:
            ref = topics.parse(message.topic)
        except TopicError:
            return
        if ref.kind == Kind.SERVICE_SPEC and ref.service is not None:
            self._take_spec(ref.service, message.payload)
        elif ref.kind == Kind.ARTIFACT_META and ref.artifact is not None:
            if not message.payload:  # cleared: its chunks may still be there
                if ref.artifact in self.artifacts:
                    self.artifacts[ref.artifact].meta = None
                return
            art = self.artifact(ref.artifact)
            try:
                meta = codec.decode_for(ref, message.payload)
            except ProtocolError as e:
                art.meta, art.problem = None, str(e)
                return
            if isinstance(meta, m.ArtifactMeta):
                art.meta, art.problem = meta, None
        elif ref.kind == Kind.ARTIFACT_CHUNK and ref.artifact and ref.chunk and message.payload:
            self.artifact(ref.artifact).chunks_seen.add(int(ref.chunk))

    def _take_spec(self, service: str, payload: bytes) -> None:
        for names in self.users.values():
            names.discard(service)
        self.unreadable_specs.pop(service, None)
        if not payload:
            return
        try:
            spec = codec.decode_as(m.ServiceSpec, payload)
            # A pipeline's nodes fetch its segments; `artifact` only names the whole model.
            used = {spec.for_stage(k).artifact for k in range(spec.stages)} or {spec.artifact}
        except ProtocolError as e:
            # Whatever it names may be in use: every sha256 in it counts.
            self.unreadable_specs[service] = str(e)
            used = {h.decode() for h in _SHA256.findall(payload)}
        for sha in used:
            self.users.setdefault(sha, set()).add(service)


def read_inventory(
    url: Brokers,
    topics: Topics,
    protocol: str = "auto",
    scan_chunks: Iterable[str] | bool = False,
    settle: float = SETTLE,
) -> Inventory:
    """The retained metas and specs; with `scan_chunks` True every chunk too (to find
    uploads cut off before their meta), or the chunks of the artifacts it names."""
    inventory = [Inventory()]  # a new one for each connection: the state is read again
    lock = threading.Lock()
    last = [time.monotonic()]

    def on_message(message: Message) -> None:
        if not message.retain:
            return  # a live publish: not part of the picture being taken
        with lock:
            last[0] = time.monotonic()
            inventory[0].take(topics, message)

    filters = [
        (wildcard(topics, Kind.ARTIFACT_META), 1),
        (wildcard(topics, Kind.SERVICE_SPEC), 1),
    ]
    if scan_chunks is True:
        filters.append((wildcard(topics, Kind.ARTIFACT_CHUNK), 1))
    elif scan_chunks:
        filters += [(topics.artifact_chunks(sha), 1) for sha in scan_chunks]

    def read(conn: Connection) -> Inventory:
        with lock:
            inventory[0] = Inventory()
        conn.subscribe(filters, retries=SUBSCRIBE_RETRIES)
        start = last[0] = time.monotonic()
        limit = SCAN_LIMIT if len(filters) > 2 else READ_LIMIT
        while time.monotonic() - last[0] < settle and time.monotonic() - start < limit:
            check(conn)
            time.sleep(0.05)
        check(conn)
        with lock:
            return inventory[0]

    link = Link(url, protocol, on_message, "artifacts")
    try:
        return link.run(read)
    finally:
        link.close()


class NotCleared(MQTTError):
    """The broker acknowledged the empty messages and kept the artifacts (an ACL that
    refuses the writes acknowledges them all the same)."""


def clear(url: Brokers, topics: Topics, artifacts: list[Artifact], protocol: str = "auto") -> None:
    """Empty retained messages on each artifact's meta, then on each of its chunks; then
    read them back, and raise NotCleared naming any the broker still has."""
    link = Link(url, protocol, lambda _m: None, "artifacts")

    def empty(conn: Connection, art: Artifact) -> None:
        conn.publish_wait(topics.artifact_meta(art.sha256), b"", retain=True)
        for i in sorted(art.chunk_indices()):
            conn.publish_wait(topics.artifact_chunk(art.sha256, i), b"", retain=True)

    try:
        for art in artifacts:
            link.run(lambda conn, art=art: empty(conn, art))  # type: ignore[misc]
    finally:
        link.close()
    shas = [art.sha256 for art in artifacts]
    left = read_inventory(url, topics, protocol, shas).artifacts
    kept = [left[sha] for sha in shas if sha in left]
    if kept:
        raise NotCleared(
            f"the broker still has {', '.join(describe(a) for a in kept)}: may the account "
            f"write {topics.prefix}/artifacts/# (the operator role of `mqinfer accounts`)?"
        )


# ---- showing ------------------------------------------------------------------------------


def size_text(size: int) -> str:
    if size >= 1_000_000:
        return f"{size / 1e6:.1f} MB"
    if size >= 1_000:
        return f"{size / 1e3:.1f} kB"
    return f"{size} B"


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def age_text(ts: float | None, now: float) -> str:
    if ts is None:
        return "-"
    age = max(0.0, now - ts)
    for unit, seconds in (("d", 86400), ("h", 3600), ("min", 60)):
        if age >= seconds:
            return f"{age / seconds:.0f} {unit} ago"
    return f"{age:.0f} s ago"


def describe(art: Artifact) -> str:
    """`7b632f0ca83e (digits_int8.tflite, 1 chunk, 49.9 kB)`, or what is wrong with it."""
    if art.meta is not None:
        what = f"{art.meta.name}, {plural(art.meta.chunks, 'chunk')}, {size_text(art.meta.size)}"
    elif art.problem is not None:
        what = f"unreadable meta, {plural(len(art.chunks_seen), 'chunk')} seen"
    else:
        what = f"incomplete upload: no meta, {plural(len(art.chunks_seen), 'chunk')}"
    return f"{art.sha256[:SHORT]} ({what})"


def as_json(inventory: Inventory) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for sha in sorted(inventory.artifacts):
        art = inventory.artifacts[sha]
        meta = art.meta
        out.append(
            {
                "sha256": sha,
                "state": art.state,
                "name": meta.name if meta else None,
                "format": meta.format if meta else None,
                "size": meta.size if meta else None,
                "chunks": meta.chunks if meta else len(art.chunks_seen),
                "ts": meta.ts if meta else None,
                "used_by": inventory.used_by(sha),
                "problem": art.problem,
            }
        )
    return out


def as_text(inventory: Inventory, now: float) -> str:
    if not inventory.artifacts:
        return "no artifacts on the broker"
    rows = [("ARTIFACT", "SIZE", "CHUNKS", "FORMAT", "NAME", "UPLOADED", "USED BY")]
    total = unused = 0
    for item in as_json(inventory):
        art = inventory.artifacts[str(item["sha256"])]
        used = inventory.used_by(art.sha256)
        unused += not used
        row: tuple[str, ...]
        if art.meta is not None:
            total += art.meta.size
            row = (
                art.sha256[:SHORT],
                size_text(art.meta.size),
                str(art.meta.chunks),
                art.meta.format,
                art.meta.name,
                age_text(art.meta.ts, now),
            )
        else:
            state = "unreadable meta" if art.problem else "incomplete upload (no meta)"
            row = (art.sha256[:SHORT], "-", str(len(art.chunks_seen)), "-", state, "-")
        rows.append((*row, ", ".join(used) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.append(
        f"\n{plural(len(inventory.artifacts), 'artifact')}, {size_text(total)}; "
        f"{unused} used by no service (`mqinfer artifacts gc` removes those)"
    )
    for service, why in sorted(inventory.unreadable_specs.items()):
        lines.append(
            f"warning: the spec of service {service} is unreadable ({why}); every "
            "sha256 in it counts as used"
        )
    return "\n".join(lines)


# ---- command line -------------------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "artifacts",
        help="list and remove the model files kept on the broker",
        description="Model files stay on the broker as retained messages after their services "
        "are undeployed (topics.md §4.5). List them with the services that use them, remove "
        "some, or remove every one no service spec uses. A pipeline service uses each of its "
        "segments' artifacts (not the whole model's).",
    )
    sub2 = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    ls = sub2.add_parser(
        "list",
        help="each artifact: sha256, size, chunks, format, file name, the services using it",
        description="List the artifacts on the broker (their retained metas) and the services "
        "whose specs use each.",
    )
    ls.add_argument("--json", action="store_true", help="print a JSON list, one object each")
    _add_scan(ls)
    options.add_common(ls)
    ls.set_defaults(func=_run_list, parser=ls)

    rm = sub2.add_parser(
        "rm",
        help="remove artifacts: clear the meta and every chunk",
        description="Remove artifacts from the broker: an empty retained message on the meta, "
        "then on each chunk. An artifact a service spec still uses is refused (exit 2, "
        f"naming the services) unless --force; one not on the broker is exit {EXIT_NOT_FOUND}. "
        "Nothing is removed unless every one named can be.",
    )
    rm.add_argument(
        "sha256",
        nargs="+",
        help=f"the artifact's sha256, or at least {MIN_PREFIX} of its first hex digits "
        "(as `list` shows)",
    )
    rm.add_argument(
        "--force",
        action="store_true",
        help="remove it even if a spec uses it (its nodes keep their cached copies; new "
        "replicas fail with artifact_missing)",
    )
    options.add_common(rm)
    rm.set_defaults(func=_run_rm, parser=rm)

    gc = sub2.add_parser(
        "gc",
        help="remove every artifact no service spec uses",
        description="Remove every artifact that no retained service spec uses and that was "
        "uploaded more than --min-age seconds ago (a deploy uploads before it publishes its "
        "spec).",
    )
    gc.add_argument("--dry-run", action="store_true", help="say what would go; remove nothing")
    gc.add_argument(
        "--min-age",
        type=float,
        default=MIN_AGE,
        metavar="SECONDS",
        help="keep unused artifacts uploaded less than this long ago (default %(default)g)",
    )
    _add_scan(gc)
    options.add_common(gc)
    gc.set_defaults(func=_run_gc, parser=gc)


def _add_scan(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--scan-chunks",
        action="store_true",
        help="read every chunk too, to find uploads cut off before their meta (this downloads "
        "every model on the broker; an upload under way looks the same, so run it when no "
        "deploy is)",
    )


def _fail(command: str, e: MQTTError) -> int:
    print(f"mqinfer artifacts {command}: error: {e}", file=sys.stderr)
    return session.EXIT_AUTH if isinstance(e, AuthRefused) else 1


def _run_list(args: argparse.Namespace) -> int:
    url, topics = options.resolve(args.parser, args)
    try:
        inventory = read_inventory(url, topics, args.mqtt_version, args.scan_chunks)
    except MQTTError as e:
        return _fail("list", e)
    if args.json:
        sys.stdout.write(orjson.dumps(as_json(inventory), option=orjson.OPT_INDENT_2).decode())
        sys.stdout.write("\n")
    else:
        print(as_text(inventory, time.time()))
    return 0


def _run_rm(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.parser
    url, topics = options.resolve(parser, args)
    for text in args.sha256:
        if not _HEX.fullmatch(text):
            parser.error(
                f"{text!r} is not an artifact: expected its sha256 (64 lowercase hex digits) "
                f"or at least {MIN_PREFIX} of its first ones"
            )
    full = [t for t in args.sha256 if len(t) == 64]
    try:
        # A full sha256 may name an upload with no meta: its chunks are read to find them.
        inventory = read_inventory(url, topics, args.mqtt_version, full)
    except MQTTError as e:
        return _fail("rm", e)
    chosen: dict[str, Artifact] = {}
    missing = []
    for text in args.sha256:
        matches = [a for sha, a in inventory.artifacts.items() if sha.startswith(text)]
        if len(matches) > 1:
            names = ", ".join(a.sha256[:SHORT] for a in matches)
            print(
                f"mqinfer artifacts rm: {text} names {len(matches)} artifacts ({names}); "
                "give more of the sha256",
                file=sys.stderr,
            )
            return EXIT_REFUSED
        if not matches:
            missing.append(text)
        else:
            chosen[matches[0].sha256] = matches[0]
    if missing:
        print(
            f"mqinfer artifacts rm: not on the broker under {topics.prefix}/artifacts/: "
            + ", ".join(missing)
            + " (`mqinfer artifacts list` shows what is)",
            file=sys.stderr,
        )
        return EXIT_NOT_FOUND
    in_use = {sha: inventory.used_by(sha) for sha in chosen if inventory.used_by(sha)}
    if in_use and not args.force:
        for sha, services in in_use.items():
            print(
                f"mqinfer artifacts rm: {describe(chosen[sha])} is used by service"
                f"{'s' * (len(services) > 1)} {', '.join(services)}: undeploy "
                f"{'them' if len(services) > 1 else 'it'} first, or give --force",
                file=sys.stderr,
            )
        print("mqinfer artifacts rm: nothing removed", file=sys.stderr)
        return EXIT_REFUSED
    try:
        clear(url, topics, list(chosen.values()), args.mqtt_version)
    except MQTTError as e:
        return _fail("rm", e)
    for art in chosen.values():
        used = in_use.get(art.sha256)
        note = f" (still used by {', '.join(used)})" if used else ""
        print(f"removed {describe(art)}{note}")
    return 0


def _run_gc(args: argparse.Namespace) -> int:
    url, topics = options.resolve(args.parser, args)
    if args.min_age < 0:
        args.parser.error("--min-age: expected a number of seconds >= 0")
    try:
        inventory = read_inventory(url, topics, args.mqtt_version, args.scan_chunks)
    except MQTTError as e:
        return _fail("gc", e)
    now = time.time()
    doomed, young = [], []
    for sha in sorted(inventory.artifacts):
        art = inventory.artifacts[sha]
        if inventory.used_by(sha):
            continue
        ts = art.meta.ts if art.meta is not None else None
        if ts is not None and now - ts < args.min_age:
            young.append(art)
        else:
            doomed.append(art)
    if doomed:
        # The specs once more, on a new connection: a spec that came late to the first read,
        # or a deploy published since, keeps its artifact.
        try:
            again = read_inventory(url, topics, args.mqtt_version)
        except MQTTError as e:
            return _fail("gc", e)
        doomed = [a for a in doomed if not again.used_by(a.sha256)]
        inventory.unreadable_specs.update(again.unreadable_specs)
    for service, why in sorted(inventory.unreadable_specs.items()):
        print(
            f"mqinfer artifacts gc: warning: the spec of service {service} is unreadable "
            f"({why}); every sha256 in it is kept",
            file=sys.stderr,
        )
    if doomed and not args.dry_run:
        try:
            clear(url, topics, doomed, args.mqtt_version)
        except MQTTError as e:
            return _fail("gc", e)
    verb = "would remove" if args.dry_run else "removed"
    for art in doomed:
        print(f"{verb} {describe(art)}")
    for art in young:
        assert art.meta is not None
        print(
            f"kept {describe(art)}: uploaded {age_text(art.meta.ts, now)}, "
            f"less than --min-age {args.min_age:g} s"
        )
    freed = sum(a.meta.size for a in doomed if a.meta is not None)
    used = sum(1 for sha in inventory.artifacts if inventory.used_by(sha))
    print(
        f"{verb} {plural(len(doomed), 'artifact')} ({size_text(freed)}); kept "
        f"{used} in use and {len(young)} uploaded less than --min-age ago"
    )
    return 0
