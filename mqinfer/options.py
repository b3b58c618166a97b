"""Options every command shares: broker URL and credentials, TLS files, topic prefix, MQTT
version, logging, signals."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from types import FrameType
from urllib.parse import urlsplit

from mqinfer.mqtt import DEFAULT_BROKER, BrokerURL, parse_brokers
from mqinfer.mqtt.url import TLSFileError, TLSFiles
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
        help="broker URL mqtt://[user@]HOST:PORT or mqtts://...; repeat it (or separate "
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
    c = parser.add_argument_group(
        "broker credentials and TLS",
        "A password in the broker URL is visible to other users in `ps`: give it in a file "
        "or in MQINFER_PASSWORD instead. Any --tls-* option makes a URL without a scheme "
        "mqtts:// (port 8883).",
    )
    c.add_argument(
        "--username",
        metavar="NAME",
        help="user name to log in to the broker with (env MQINFER_USERNAME)",
    )
    c.add_argument(
        "--password-file",
        metavar="FILE",
        help="read the password from the first line of FILE (env MQINFER_PASSWORD_FILE; "
        "or the password itself in env MQINFER_PASSWORD)",
    )
    c.add_argument(
        "--tls-ca",
        metavar="FILE",
        help="PEM file of the CA certificates that sign the broker's certificate "
        "(env MQINFER_TLS_CA; default with TLS: the system's CAs)",
    )
    c.add_argument(
        "--tls-cert",
        metavar="FILE",
        help="PEM client certificate (chain) for mutual TLS; needs --tls-key "
        "(env MQINFER_TLS_CERT)",
    )
    c.add_argument(
        "--tls-key",
        metavar="FILE",
        help="unencrypted PEM private key of --tls-cert (env MQINFER_TLS_KEY)",
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
        creds = credentials(args, os.environ)
        urls = brokers(args, os.environ, creds, warn=lambda line: _warn(parser, line))
    except ValueError as e:
        parser.error(str(e))
    try:
        topics = Topics(args.prefix)
    except TopicError as e:
        parser.error(f"--prefix: {e}")
    return urls, topics


def _warn(parser: argparse.ArgumentParser, line: str) -> None:
    print(f"{parser.prog}: warning: {line}", file=sys.stderr)


@dataclass(frozen=True)
class Credentials:
    """Who we are to the broker, from the options and the environment (not the URL)."""

    username: str | None = None
    password: str | None = None
    tls_files: TLSFiles | None = None  # None: no --tls-* option given


MAX_PASSWORD = 65535  # bytes: an MQTT string


def credentials(args: argparse.Namespace, environ: Mapping[str, str]) -> Credentials:
    """The user name, password and TLS files: an option beats its environment variable;
    --password-file beats MQINFER_PASSWORD_FILE and MQINFER_PASSWORD, which exclude each
    other. Raise ValueError naming the option or file that is wrong."""
    username = args.username or environ.get("MQINFER_USERNAME") or None
    password_file = args.password_file
    if password_file is None:
        from_file, plain = environ.get("MQINFER_PASSWORD_FILE"), environ.get("MQINFER_PASSWORD")
        if from_file and plain is not None:
            raise ValueError(
                "MQINFER_PASSWORD and MQINFER_PASSWORD_FILE are both set; keep one of them"
            )
        password_file = from_file or None
        password = plain
    if password_file is not None:
        password = read_password(password_file)
    if password is not None and len(password.encode()) > MAX_PASSWORD:
        raise ValueError(f"the password is longer than {MAX_PASSWORD} bytes")
    files = {
        name: getattr(args, f"tls_{name}") or environ.get(f"MQINFER_TLS_{name.upper()}") or None
        for name in ("ca", "cert", "key")
    }
    if (files["cert"] is None) != (files["key"] is None):
        given, missing = ("cert", "key") if files["cert"] else ("key", "cert")
        raise ValueError(
            f"--tls-{given} needs --tls-{missing} (or MQINFER_TLS_{missing.upper()}): "
            "a client certificate and its private key go together"
        )
    tls_files = None
    if any(files.values()):
        tls_files = TLSFiles(files["ca"], files["cert"], files["key"])
        try:
            tls_files.context()  # every file read and checked now, not at the first connect
        except TLSFileError as e:
            raise ValueError(f"TLS: {e}") from None
    return Credentials(username, password, tls_files)


def read_password(path: str) -> str:
    """The first line of a password file, without its line ending."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PASSWORD + 2)
    except OSError as e:
        raise ValueError(f"password file {path}: cannot read it: {e.strerror or e}") from None
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise ValueError(f"password file {path}: not UTF-8 text") from None
    password = text.splitlines()[0] if text else ""
    if not password:
        raise ValueError(f"password file {path}: empty (expected the password on its first line)")
    return password


def brokers(
    args: argparse.Namespace,
    environ: Mapping[str, str],
    creds: Credentials,
    warn: Callable[[str], None],
) -> list[BrokerURL]:
    """The broker URLs with the credentials and TLS files applied to each. A password in
    a --broker URL works, with a warning; given twice (URL and option), it is an error."""
    tls = creds.tls_files is not None
    if args.broker:
        texts, where = list(args.broker), "--broker"
    elif environ.get("MQINFER_BROKER"):
        texts, where = [environ["MQINFER_BROKER"]], "MQINFER_BROKER"
    else:  # the default broker; over TLS (mqtts://127.0.0.1:8883) when TLS files were given
        texts, where = [(urlsplit(DEFAULT_BROKER).hostname or "") if tls else DEFAULT_BROKER], ""
    urls = parse_brokers(texts, tls_default=tls)
    out = []
    for url in urls:
        if url.password is not None:
            if creds.password is not None:
                raise ValueError(
                    f"the password is given twice: in {where} {url} and by "
                    "--password-file, MQINFER_PASSWORD_FILE or MQINFER_PASSWORD; keep one"
                )
            if where == "--broker":
                warn(
                    f"the password in --broker {url} is visible to other users in `ps`; "
                    "use --password-file FILE, MQINFER_PASSWORD_FILE or MQINFER_PASSWORD"
                )
        if url.username and creds.username and url.username != creds.username:
            raise ValueError(
                f"two user names: {url.username!r} in {where} {url} and {creds.username!r} "
                "by --username or MQINFER_USERNAME; keep one"
            )
        username = url.username or creds.username
        password = url.password if url.password is not None else creds.password
        if password is not None and username is None:
            raise ValueError(
                f"a password needs a user name for {url}: give --username NAME "
                "(or MQINFER_USERNAME, or NAME@ in the URL)"
            )
        if tls and not url.tls:
            warn(
                f"{url} asks for plain MQTT, so the --tls-* options are not used for it; "
                "write mqtts:// (or leave out the scheme) to connect over TLS"
            )
        url = replace(url, username=username, password=password)
        if creds.tls_files is not None and url.tls:
            url = replace(url, tls_files=creds.tls_files)
        out.append(url)
    return out


def stop_on_signals() -> threading.Event:
    """An event set by SIGINT or SIGTERM (for a clean shutdown)."""
    stop = threading.Event()

    def handler(_sig: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop
