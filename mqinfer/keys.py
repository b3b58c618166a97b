"""`mqinfer keys`: Ed25519 key files for signed deploys, and reading them back.

A deployer keeps NAME.key (PEM, PKCS#8, unencrypted, mode 0600) and gives `mqinfer
deploy --sign-key NAME.key`; every node that should run only its deploys gets NAME.pub
(PEM, SubjectPublicKeyInfo) with `mqinfer node --trust-key NAME.pub`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
    load_pem_public_key,
)

from mqinfer.protocol import signing
from mqinfer.protocol.topics import TopicError, check_id

MAX_KEY_FILE = 64 * 1024  # a PEM Ed25519 key is about 120 bytes


class KeyFileError(ValueError):
    """A key file that cannot be used, with what was wrong and what was expected."""


def _read(path: Path, what: str) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_KEY_FILE:
            raise KeyFileError(f"{path}: {size} bytes is not a key file ({what} expected)")
        return path.read_bytes()
    except OSError as e:
        raise KeyFileError(f"{path}: {e.strerror or e} ({what} expected)") from None


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 private key in a PEM file (as `mqinfer keys generate` writes NAME.key)."""
    data = _read(path, "an Ed25519 private key in PEM, NAME.key of `mqinfer keys generate`")
    if b"PRIVATE KEY" not in data:
        hint = "; that is a public key: sign with the .key file" if b"PUBLIC KEY" in data else ""
        raise KeyFileError(f"{path}: not a PEM private key{hint}")
    try:
        key = load_pem_private_key(data, password=None)
    except TypeError:
        raise KeyFileError(f"{path}: the key is encrypted; expected an unencrypted key") from None
    except ValueError as e:
        raise KeyFileError(f"{path}: not a readable PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: a {type(key).__name__}; expected an Ed25519 key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """The Ed25519 public key in a PEM file (as `mqinfer keys generate` writes NAME.pub)."""
    data = _read(path, "an Ed25519 public key in PEM, NAME.pub of `mqinfer keys generate`")
    if b"PUBLIC KEY" not in data:
        hint = "; that is a private key: give nodes the .pub file" if b"PRIVATE" in data else ""
        raise KeyFileError(f"{path}: not a PEM public key{hint}")
    try:
        key = load_pem_public_key(data)
    except ValueError as e:
        raise KeyFileError(f"{path}: not a readable PEM public key ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path}: a {type(key).__name__}; expected an Ed25519 key")
    return key


def generate(out: Path, name: str) -> tuple[Path, Path, str]:
    """Write out/NAME.key (mode 0600) and out/NAME.pub; never overwrite either.
    Returns both paths and the key id."""
    try:
        check_id(name, "key name")
    except TopicError as e:
        raise KeyFileError(str(e)) from None
    key_path, pub_path = out / f"{name}.key", out / f"{name}.pub"
    for path in (key_path, pub_path):
        if path.exists():
            raise KeyFileError(f"{path} exists; not overwriting it (choose another --name)")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    public_pem = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    try:
        out.mkdir(parents=True, exist_ok=True)
        # O_EXCL: a file that appeared meanwhile is not overwritten either.
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(private_pem)
        fd = os.open(pub_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(public_pem)
    except FileExistsError as e:
        raise KeyFileError(f"{e.filename} exists; not overwriting it") from None
    except OSError as e:
        raise KeyFileError(f"{out}: {e.strerror or e}") from None
    return key_path, pub_path, signing.key_id(key.public_key())


# ---- command line -------------------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "keys",
        help="make signing keys for signed deploys",
        description="Keys for signed deploys. A deployer signs each spec with `mqinfer deploy "
        "--sign-key NAME.key`; nodes started with `mqinfer node --trust-key NAME.pub` run only "
        "specs signed by a key they trust and refuse others with `untrusted`.",
    )
    keys_sub = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    g = keys_sub.add_parser(
        "generate",
        help="write a new Ed25519 key pair and print its key id",
        description="Write a new Ed25519 key pair: DIR/NAME.key, the private key (PEM, "
        "unencrypted, mode 0600: keep it with the deployer, give it to `mqinfer deploy "
        "--sign-key`), and DIR/NAME.pub, the public key (give it to every node with "
        "`mqinfer node --trust-key`). Prints the key id that specs, statuses and node logs "
        "name. Existing files are never overwritten.",
    )
    g.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for the files")
    g.add_argument(
        "--name",
        default="deploy",
        help="file name stem: 1-64 of A-Z a-z 0-9 _ - . (default %(default)s)",
    )
    g.set_defaults(func=_run_generate, parser=g)


def _run_generate(args: argparse.Namespace) -> int:
    try:
        key_path, pub_path, kid = generate(args.out, args.name)
    except KeyFileError as e:
        print(f"mqinfer keys generate: {e}", file=sys.stderr)
        return 2
    print(f"private key {key_path} (keep it secret: mqinfer deploy --sign-key)", file=sys.stderr)
    print(f"public key  {pub_path} (for nodes: mqinfer node --trust-key)", file=sys.stderr)
    print(kid)
    return 0
