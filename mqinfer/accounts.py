"""`mqinfer accounts`: the Mosquitto password file and ACL for a site, one account per role.

Roles (topics.md, "Roles and trust"):

- coordinator: the hub. Reads the whole tree, gives work, publishes results.
- node: one account per node, the username is the node id. Its own subtree, the work
  given to it, model artifacts and the coordinator's state and heartbeat; never a
  request, a result or another node's topics.
- sensor: sends requests; reads its results only under `replies/<its name>/`
  ([T-SERVE-5]), and with `--shared-results` also `services/+/result[/#]` (what MQTT
  3.1.1 requesters need, shared by every such account).
- operator: deploys and removes services (specs and artifacts) and follows them.
- observer: reads the cluster's state (`mqinfer status`), nothing else.

The ACL names every account with `user` lines; it has no `pattern` line, because a
pattern applies to every account: with `pattern write nodes/%u/...` a sensor could
announce itself as a node. Passwords are random, kept in `secrets/<name>` (mode 0600)
and reused when the command runs again, so adding an account changes no other.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mqinfer.protocol.topics import DEFAULT_PREFIX, TopicError, check_id, check_prefix

ROLES = ("coordinator", "node", "sensor", "operator", "observer")
PBKDF2_ITERATIONS = 101  # what mosquitto_passwd writes for `$7$`
SALT_BYTES = 12


@dataclass
class Site:
    """Who may connect, by role; names are unique across roles."""

    prefix: str = DEFAULT_PREFIX
    coordinator: str = "coordinator"
    nodes: list[str] = field(default_factory=list)
    sensors: list[str] = field(default_factory=list)
    operators: list[str] = field(default_factory=list)
    observers: list[str] = field(default_factory=list)
    shared_results: bool = False  # sensors also read services/+/result[/#]
    site_fallback: bool = False  # nodes may answer requests `unavailable` ([T-HUB-4])

    def accounts(self) -> list[tuple[str, str]]:
        """(name, role) for every account, in the order of the ACL."""
        out = [(self.coordinator, "coordinator")]
        out += [(n, "node") for n in self.nodes]
        out += [(n, "sensor") for n in self.sensors]
        out += [(n, "operator") for n in self.operators]
        out += [(n, "observer") for n in self.observers]
        return out

    def check(self) -> None:
        """Raise ValueError naming what is wrong: a bad prefix or name, or a name twice."""
        try:
            check_prefix(self.prefix)
            seen: dict[str, str] = {}
            for name, role in self.accounts():
                check_id(name, f"{role} name")
                if name in seen:
                    raise ValueError(
                        f"{name!r} is named as {seen[name]} and as {role}: an account has "
                        "one role; give each its own name"
                    )
                seen[name] = role
        except TopicError as e:
            raise ValueError(str(e)) from None


def _rules(site: Site, name: str, role: str) -> list[str]:
    p = site.prefix
    if role == "coordinator":
        writes = [
            "nodes/+/cmd",
            "nodes/+/work",
            "nodes/+/state",  # marks a node lost; clears a forgotten node's topics
            "nodes/+/caps",
            "nodes/+/heartbeat",
            "services/+/spec",
            "services/+/status",
            "services/+/result",
            "services/+/result/#",
            "replies/#",
            "artifacts/#",
            "coordinator/state",
            "coordinator/heartbeat",
        ]
        return [f"topic read {p}/#"] + [f"topic write {p}/{t}" for t in writes]
    if role == "node":
        own = f"{p}/nodes/{name}"
        rules = [
            f"topic write {own}/caps",
            f"topic readwrite {own}/state",
            f"topic write {own}/heartbeat",
            f"topic write {own}/reply",
            f"topic read {own}/cmd",
            f"topic read {own}/work",
            f"topic write {own}/answer",
            f"topic read {p}/artifacts/#",
            f"topic read {p}/coordinator/state",
            f"topic read {p}/coordinator/heartbeat",
        ]
        if site.site_fallback:
            rules += [
                f"topic read {p}/services/+/request",
                f"topic read {p}/services/+/request/#",
                f"topic write {p}/services/+/result",
                f"topic write {p}/services/+/result/#",
                f"topic write {p}/replies/#",
            ]
        return rules
    if role == "sensor":
        rules = [
            f"topic write {p}/services/+/request",
            f"topic write {p}/services/+/request/#",
            f"topic read {p}/replies/{name}/#",
            f"topic read {p}/services/+/status",
            f"topic read {p}/coordinator/state",
        ]
        if site.shared_results:
            rules += [f"topic read {p}/services/+/result", f"topic read {p}/services/+/result/#"]
        return rules
    if role == "operator":
        return [
            f"topic write {p}/services/+/spec",
            f"topic read {p}/services/+/spec",
            f"topic read {p}/services/+/status",
            f"topic readwrite {p}/artifacts/#",
            f"topic read {p}/nodes/+/caps",
            f"topic read {p}/nodes/+/state",
            f"topic read {p}/nodes/+/heartbeat",
            f"topic read {p}/coordinator/state",
            f"topic read {p}/coordinator/heartbeat",
        ]
    if role == "observer":
        return [
            f"topic read {p}/nodes/+/caps",
            f"topic read {p}/nodes/+/state",
            f"topic read {p}/nodes/+/heartbeat",
            f"topic read {p}/services/+/spec",
            f"topic read {p}/services/+/status",
            f"topic read {p}/coordinator/state",
            f"topic read {p}/coordinator/heartbeat",
        ]
    raise ValueError(f"unknown role {role!r}: expected one of {', '.join(ROLES)}")


def acl_text(site: Site) -> str:
    """The Mosquitto acl_file for `site`: a `user` block per account, no `pattern` line."""
    site.check()
    lines = [
        f"# Mosquitto ACL for mqinfer (prefix {site.prefix}), written by `mqinfer accounts`.",
        "# One block per account; no `pattern` lines (they would apply to every account).",
        "# What each role may do, and what a stolen credential of it can do: topics.md §11.",
    ]
    for name, role in site.accounts():
        lines += ["", f"# {role}", f"user {name}", *_rules(site, name, role)]
    return "\n".join(lines) + "\n"


def password_hash(password: str, salt: bytes | None = None) -> str:
    """Mosquitto 2's `$7$` format: PBKDF2-HMAC-SHA512, as `mosquitto_passwd` writes it."""
    salt = salt if salt is not None else secrets.token_bytes(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ITERATIONS)
    b64 = base64.b64encode
    return f"$7${PBKDF2_ITERATIONS}${b64(salt).decode()}${b64(digest).decode()}"


def _secret(path: Path) -> str:
    """The account's password: the one kept in `path`, or a new one written there 0600."""
    if path.exists():
        kept = path.read_text().strip()
        if kept:
            return kept
    password = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")
    return password


def write(site: Site, out: Path) -> list[tuple[str, str, Path]]:
    """Write out/mqinfer.passwd, out/mqinfer.acl and out/secrets/<name>; return
    (name, role, secret file) for each account."""
    site.check()
    secrets_dir = out / "secrets"
    secrets_dir.mkdir(parents=True, exist_ok=True)
    secrets_dir.chmod(0o700)
    written, entries = [], []
    for name, role in site.accounts():
        path = secrets_dir / name
        entries.append(f"{name}:{password_hash(_secret(path))}")
        written.append((name, role, path))
    passwd = out / "mqinfer.passwd"
    fd = os.open(passwd, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(entries) + "\n")
    (out / "mqinfer.acl").write_text(acl_text(site))
    return written


def _names(values: list[str]) -> list[str]:
    """Repeated options and comma-separated lists, in order, without repeats."""
    out: list[str] = []
    for value in values:
        out += [v.strip() for v in value.split(",") if v.strip() and v.strip() not in out]
    return out


def run(args: argparse.Namespace) -> int:
    site = Site(
        prefix=args.prefix,
        coordinator=args.coordinator,
        nodes=_names(args.node),
        sensors=_names(args.sensor),
        operators=_names(args.operator),
        observers=_names(args.observer),
        shared_results=args.shared_results,
        site_fallback=args.site_fallback,
    )
    try:
        written = write(site, Path(args.out))
    except ValueError as e:
        print(f"mqinfer accounts: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"mqinfer accounts: cannot write {args.out}: {e.strerror}", file=sys.stderr)
        return 1
    out = Path(args.out).resolve()
    print(f"wrote {out / 'mqinfer.passwd'} and {out / 'mqinfer.acl'}; passwords in {out}/secrets/")
    for name, role, path in written:
        print(f"  {role:<11} {name:<24} {path}")
    print(
        "\nIn mosquitto.conf (see deploy/mosquitto/mosquitto.conf):\n"
        "  allow_anonymous false\n"
        f"  password_file {out / 'mqinfer.passwd'}\n"
        f"  acl_file {out / 'mqinfer.acl'}\n"
        "then reload Mosquitto. Each program connects as its account, the password from a\n"
        "file, never on the command line: for example\n"
        f"  MQINFER_PASSWORD_FILE={out}/secrets/NAME mqinfer node --id NAME "
        "--broker mqtt://NAME@HUB:1883"
    )
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "accounts",
        help="write a Mosquitto password file and ACL for a site, one account per role",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, help="directory to write into (created if needed)")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help="topic prefix (default %(default)s)")
    p.add_argument("--coordinator", default="coordinator", help="the coordinator's account name")
    for role, what in (
        ("node", "a node account; the name is the node id"),
        ("sensor", "a sensor account: sends requests, reads replies/<name>/"),
        ("operator", "an operator account: deploys and removes services"),
        ("observer", "an observer account: reads the cluster's state"),
    ):
        p.add_argument(
            f"--{role}", action="append", default=[], metavar="NAME[,NAME...]", help=what
        )
    p.add_argument(
        "--shared-results",
        action="store_true",
        help="sensors also read services/+/result[/#] (MQTT 3.1.1 requesters need it; "
        "every such sensor then sees every result there)",
    )
    p.add_argument(
        "--site-fallback",
        action="store_true",
        help="nodes may read requests and write results, to answer 'unavailable' when a "
        "bridged site loses the hub (topics.md [T-HUB-4])",
    )
    p.set_defaults(func=run)
