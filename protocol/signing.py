"""Signed deploys: a deployer vouches for a spec with its Ed25519 key, and a node that
trusts that key runs only specs it vouched for. Pure functions on the spec model and on
keys held in memory: no I/O, no key files (mqinfer.keys reads and writes those).

What is signed (topics.md §4.6, "Signed specs"): the bytes

    b"mqinfer-spec-v1\\n" + orjson.dumps(spec without `signature`, sorted keys)

where the spec is `spec.model_dump(mode="json", exclude_none=True)`: every field as the
receiver decoded it, defaults filled in, fields that are None left out, no whitespace.
That covers the name, the artifact's sha256, format, size, replicas, constraints, the
manifest, the revision and, for a pipeline, every segment's manifest with its sha256.
A node checks the sha256 of every artifact it fetches against the spec, so a signed
spec covers the model files too. The prefix keeps a spec signature from being taken for
a signature over anything else.

A key id is the first 16 hex digits of the sha256 of the 32-byte raw public key.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Mapping

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from mqinfer.protocol import messages as m
from mqinfer.protocol.errors import Code, ProtocolError

DOMAIN = b"mqinfer-spec-v1\n"

TrustedKeys = Mapping[str, Ed25519PublicKey]  # key id -> public key


def key_id(public_key: Ed25519PublicKey) -> str:
    """The short name of a key: 16 hex digits of the sha256 of its raw 32 bytes."""
    raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[: m.KEY_ID_HEX]


def trusted(keys: Iterable[Ed25519PublicKey]) -> dict[str, Ed25519PublicKey]:
    """Public keys by key id, as `verify` takes them."""
    return {key_id(k): k for k in keys}


def signed_bytes(spec: m.ServiceSpec) -> bytes:
    """The canonical bytes a signature is over: the spec without its signature."""
    content = spec.model_dump(mode="json", exclude_none=True, exclude={"signature"})
    return DOMAIN + orjson.dumps(content, option=orjson.OPT_SORT_KEYS)


def sign(spec: m.ServiceSpec, private_key: Ed25519PrivateKey) -> m.Signature:
    """The `signature` field for `spec` (any signature it has already is left out)."""
    sig = private_key.sign(signed_bytes(spec))
    return m.Signature(
        key=key_id(private_key.public_key()), sig=base64.b64encode(sig).decode("ascii")
    )


def signed(spec: m.ServiceSpec, private_key: Ed25519PrivateKey) -> m.ServiceSpec:
    """The spec with its signature in place."""
    return spec.model_copy(update={"signature": sign(spec, private_key)})


def verify(spec: m.ServiceSpec, keys: TrustedKeys) -> str:
    """The id of the trusted key that signed `spec`; ProtocolError(UNTRUSTED) saying what
    was wrong when it is unsigned, signed by a key not in `keys`, or the signature does
    not match its content."""
    name = f"spec {spec.name!r} (revision {spec.revision or 'none'})"
    expected = ", ".join(sorted(keys)) or "none"
    sig = spec.signature
    if sig is None:
        raise ProtocolError(
            Code.UNTRUSTED,
            f"{name} is unsigned; this node runs only specs signed by a key it trusts "
            f"(key ids {expected}): deploy with --sign-key",
        )
    public = keys.get(sig.key)
    if public is None:
        raise ProtocolError(
            Code.UNTRUSTED,
            f"{name} is signed by key {sig.key}, which this node does not trust; "
            f"expected a signature by one of the key ids {expected}",
        )
    try:
        raw = base64.b64decode(sig.sig.encode("ascii"), validate=True)
    except ValueError:  # binascii.Error and UnicodeEncodeError are ValueErrors
        raw = b""
    if len(raw) != m.SIGNATURE_BYTES:
        raise ProtocolError(
            Code.UNTRUSTED,
            f"{name}: signature.sig is not the base64 of a {m.SIGNATURE_BYTES}-byte Ed25519 "
            "signature",
        )
    try:
        public.verify(raw, signed_bytes(spec))
    except InvalidSignature:
        raise ProtocolError(
            Code.UNTRUSTED,
            f"{name}: the signature by key {sig.key} does not match its content (changed "
            "after it was signed?); expected a signature over this spec, made with "
            "`mqinfer deploy --sign-key`",
        ) from None
    return sig.key
