"""Signed deploys: the canonical bytes, signing and checking specs, key files, and the
node's check before it queues a deploy. No broker: tests/integration/test_signing.py has
the deploys themselves."""

from __future__ import annotations

import base64
import hashlib
import re
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from mqinfer.coordinator.provision import Provisioner
from mqinfer.keys import KeyFileError, generate, load_private_key, load_public_key
from mqinfer.node.provisioning import Provisioning
from mqinfer.protocol import codec, signing
from mqinfer.protocol import messages as m
from mqinfer.protocol.errors import Code, ProtocolError
from mqinfer.protocol.manifest import Manifest, Pipeline, Segment, TensorInfo, Verification
from mqinfer.protocol.topics import Kind
from tests.unit.test_provision import registry, sends

REPO = Path(__file__).resolve().parents[2]
MANIFEST = Manifest.model_validate_json((REPO / "models/digits/digits_int8.json").read_bytes())
# Fixed seeds: Ed25519 signatures are deterministic, so a signature is a stable value too.
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
TRUSTED = signing.trusted([KEY.public_key()])


def spec(**kw: Any) -> m.ServiceSpec:
    fields: dict[str, Any] = {
        "name": "digits",
        "model": "digits_int8.tflite",
        "artifact": MANIFEST.sha256,
        "format": "tflite",
        "size": MANIFEST.size,
        "replicas": 2,
        "manifest": MANIFEST,
        "revision": "b1a2332fa41b",
    }
    fields.update(kw)
    return m.ServiceSpec.model_validate(fields)


def pipeline_spec() -> m.ServiceSpec:
    tensor = TensorInfo(name="x", dtype="int8", shape=[1, 4])
    segments = [
        Segment(
            manifest=Manifest(
                name=f"digits.seg{k}",
                format="tflite",
                file=f"digits.seg{k}.tflite",
                sha256=f"{k + 1:02x}" * 32,
                size=10_000 * (k + 1),
                inputs=[tensor],
                outputs=[tensor],
            ),
            ops=(k, k + 1),
            latency_ms=0.125 * (k + 1),
        )
        for k in range(2)
    ]
    pipeline = Pipeline(
        name="digits",
        model="digits_int8.tflite",
        sha256=MANIFEST.sha256,
        format="tflite",
        segments=segments,
        verification=Verification(inputs=8, exact=True, max_abs_diff=0.0, tolerance=0.0),
    )
    return spec(pipeline=pipeline, size=30_000, replicas=1)


def untrusted(s: m.ServiceSpec, keys: signing.TrustedKeys = TRUSTED) -> str:
    with pytest.raises(ProtocolError) as e:
        signing.verify(s, keys)
    assert e.value.code == Code.UNTRUSTED
    assert str(e.value.code) == "untrusted"  # the code on the wire
    return e.value.message


# ---- the canonical bytes ----------------------------------------------------------------


def test_the_signed_bytes_are_the_spec_without_its_signature_sorted_and_compact() -> None:
    s = spec(manifest=None, constraints={"labels": {"zone": "lab", "a": "b"}})
    assert signing.signed_bytes(s) == (
        b"mqinfer-spec-v1\n"
        b'{"artifact":"7b632f0ca83ea0040b7e47d25dfd20acc3e742145693b5448efb0ab32db7b247",'
        b'"constraints":{"labels":{"a":"b","zone":"lab"}},"deadline_ms":10000,'
        b'"format":"tflite","model":"digits_int8.tflite","name":"digits","queue":128,'
        b'"replicas":2,"revision":"b1a2332fa41b","size":49880,"threads":1,"v":1,"workers":1}'
    )
    # The signature is not part of what it signs.
    assert signing.signed_bytes(signing.signed(s, KEY)) == signing.signed_bytes(s)


def test_a_signature_is_stable_and_names_its_key() -> None:
    raw = KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert signing.key_id(KEY.public_key()) == hashlib.sha256(raw).hexdigest()[:16]
    first, again = signing.sign(spec(), KEY), signing.sign(spec(), KEY)
    assert first == again
    assert first.key == signing.key_id(KEY.public_key())
    assert len(base64.b64decode(first.sig)) == 64
    assert signing.verify(signing.signed(spec(), KEY), TRUSTED) == first.key


@pytest.mark.parametrize("make", [spec, pipeline_spec], ids=["whole", "pipeline"])
def test_a_signed_spec_survives_every_hop_to_the_node(make: Any) -> None:
    """Published by deploy, decoded by the coordinator, sent in a deploy command, decoded
    by the node: the signature still holds, whatever order the JSON keys came in."""
    s = signing.signed(make(), KEY)
    published = codec.encode(s)
    at_coordinator = codec.decode(Kind.SERVICE_SPEC, published)
    assert isinstance(at_coordinator, m.ServiceSpec)
    assert signing.verify(at_coordinator, TRUSTED) == s.signature.key  # type: ignore[union-attr]
    # The keys of every object reversed: the same spec, the same signed bytes.
    reordered = _reverse_keys(orjson.loads(published))
    again = codec.decode(Kind.SERVICE_SPEC, orjson.dumps(reordered))
    assert isinstance(again, m.ServiceSpec)
    assert signing.signed_bytes(again) == signing.signed_bytes(s)
    # The coordinator builds each node's deploy command from the spec it decoded.
    p = Provisioner(grace=0.0)
    p.on_spec("digits", at_coordinator)
    cmds = sends(p.step(registry("n1", "n2", "n3"), 0.0), "deploy")
    assert cmds
    for cmd in cmds:
        wire = codec.decode(Kind.NODE_CMD, codec.encode(cmd.command))
        assert isinstance(wire, m.Command)
        at_node = m.ServiceSpec.model_validate(wire.args["spec"])
        assert at_node.signature == s.signature
        assert signing.verify(at_node, TRUSTED) == signing.key_id(KEY.public_key())


def _reverse_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _reverse_keys(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [_reverse_keys(v) for v in value]
    return value


CHANGES: dict[str, Any] = {
    "name": {"name": "digits2"},
    "artifact": {"artifact": "ab" * 32},
    "format": {"format": "onnx"},
    "size": {"size": 1},
    "replicas": {"replicas": 3},
    "revision": {"revision": "000000000000"},
    "constraints": {"constraints": m.Constraints(accelerator="cpu")},
    "workers": {"workers": 4},
    "manifest": {"manifest": MANIFEST.model_copy(update={"labels": ["x"] * 10})},
    "no manifest": {"manifest": None},
}


@pytest.mark.parametrize("change", list(CHANGES), ids=list(CHANGES))
def test_a_changed_field_breaks_the_signature(change: str) -> None:
    good = signing.signed(spec(), KEY)
    bad = good.model_copy(update=CHANGES[change])
    message = untrusted(bad)
    assert "does not match its content" in message
    assert signing.key_id(KEY.public_key()) in message


def test_a_changed_segment_breaks_the_signature_of_a_pipeline() -> None:
    good = signing.signed(pipeline_spec(), KEY)
    assert good.pipeline is not None
    seg = good.pipeline.segments[1]
    swapped = seg.model_copy(
        update={"manifest": seg.manifest.model_copy(update={"sha256": "cd" * 32})}
    )
    pipeline = good.pipeline.model_copy(update={"segments": [good.pipeline.segments[0], swapped]})
    bad = good.model_copy(update={"pipeline": pipeline})
    assert bad.for_stage(1).artifact == "cd" * 32  # what stage 1 would fetch
    assert "does not match its content" in untrusted(bad)


# ---- what the node is told --------------------------------------------------------------


def test_an_unsigned_spec_is_untrusted() -> None:
    message = untrusted(spec())
    assert "'digits' (revision b1a2332fa41b) is unsigned" in message
    assert signing.key_id(KEY.public_key()) in message and "--sign-key" in message


def test_a_spec_signed_by_an_unknown_key_is_untrusted() -> None:
    other = signing.key_id(OTHER.public_key())
    message = untrusted(signing.signed(spec(), OTHER))
    assert f"signed by key {other}, which this node does not trust" in message
    assert f"one of the key ids {signing.key_id(KEY.public_key())}" in message


def test_another_key_under_a_trusted_id_is_untrusted() -> None:
    """A signature made with another key but naming the trusted key's id."""
    forged = signing.sign(spec(), OTHER).model_copy(
        update={"key": signing.key_id(KEY.public_key())}
    )
    assert "does not match its content" in untrusted(spec(signature=forged))


def test_any_of_several_trusted_keys_will_do() -> None:
    both = signing.trusted([KEY.public_key(), OTHER.public_key()])
    assert signing.verify(signing.signed(spec(), OTHER), both) == signing.key_id(OTHER.public_key())


def _decode_with(signature: object) -> ProtocolError:
    data = orjson.loads(codec.encode(spec()))
    data["signature"] = signature
    with pytest.raises(ProtocolError) as e:
        codec.decode(Kind.SERVICE_SPEC, orjson.dumps(data))
    assert e.value.code == Code.BAD_MESSAGE
    return e.value


@pytest.mark.parametrize(
    ("sig", "said"),
    [
        ("not base64!" + "A" * 77, "standard base64 of a 64-byte Ed25519 signature"),
        (base64.b64encode(bytes(63)).decode(), "standard base64 of a 64-byte Ed25519 signature"),
        ("A" * 10_000, "at most 88 characters"),
        (12, "valid string"),
    ],
    ids=["bad base64", "short", "oversize", "not a string"],
)
def test_a_malformed_signature_is_refused_where_it_is_decoded(sig: object, said: str) -> None:
    good = signing.sign(spec(), KEY)
    e = _decode_with({"key": good.key, "sig": sig})
    assert "ServiceSpec field 'signature.sig'" in e.message and said in e.message


@pytest.mark.parametrize("key", ["ABCDEF0123456789", "0123", "g" * 16, "0" * 10_000])
def test_a_malformed_key_id_is_refused_where_it_is_decoded(key: str) -> None:
    good = signing.sign(spec(), KEY)
    e = _decode_with({"key": key, "sig": good.sig})
    assert "ServiceSpec field 'signature.key'" in e.message


def test_bad_base64_that_skipped_decoding_is_still_untrusted() -> None:
    """verify does not rely on the decoder's checks."""
    kid = signing.key_id(KEY.public_key())
    sig = m.Signature.model_construct(key=kid, sig="%%%")
    message = untrusted(spec().model_copy(update={"signature": sig}))
    assert "signature.sig is not the base64 of a 64-byte Ed25519 signature" in message


def test_a_node_with_trusted_keys_refuses_before_it_queues_anything() -> None:
    """The check runs on the network thread, before the artifact path or the queue: an
    agent with nothing in it is never touched."""
    replies: list[object] = []
    prov = Provisioning(SimpleNamespace(), lambda c, o: replies.append(o))  # type: ignore[arg-type]
    try:
        prov.trust(TRUSTED)
        for bad in (spec(), signing.signed(spec(), OTHER)):
            cmd = m.Command(id="c1", op="deploy", args={"spec": bad.model_dump(mode="json")})
            with pytest.raises(ProtocolError) as e:
                prov.submit(cmd)
            assert e.value.code == Code.UNTRUSTED
        assert prov.pending == 0 and replies == []
    finally:
        prov.close()


# ---- key files ----------------------------------------------------------------------------


def test_generated_keys_load_back_and_sign(tmp_path: Path) -> None:
    key_path, pub_path, kid = generate(tmp_path / "keys", "deployer")
    assert (key_path.name, pub_path.name) == ("deployer.key", "deployer.pub")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    private, public = load_private_key(key_path), load_public_key(pub_path)
    assert signing.key_id(public) == signing.key_id(private.public_key()) == kid
    s = signing.signed(spec(), private)
    assert signing.verify(s, signing.trusted([public])) == kid


def test_generate_never_overwrites(tmp_path: Path) -> None:
    key_path, _, _ = generate(tmp_path, "deployer")
    before = key_path.read_bytes()
    with pytest.raises(KeyFileError, match="exists; not overwriting it"):
        generate(tmp_path, "deployer")
    assert key_path.read_bytes() == before
    (tmp_path / "lonely.pub").write_text("x")  # half a pair is not replaced either
    with pytest.raises(KeyFileError, match=re.escape("lonely.pub exists")):
        generate(tmp_path, "lonely")
    assert not (tmp_path / "lonely.key").exists()
    with pytest.raises(KeyFileError, match="invalid key name"):
        generate(tmp_path, "../escape")


def test_key_files_of_the_wrong_kind_say_so(tmp_path: Path) -> None:
    key_path, pub_path, _ = generate(tmp_path, "k")
    with pytest.raises(
        KeyFileError, match=re.escape("that is a private key: give nodes the .pub file")
    ):
        load_public_key(key_path)
    with pytest.raises(
        KeyFileError, match=re.escape("that is a public key: sign with the .key file")
    ):
        load_private_key(pub_path)
    with pytest.raises(KeyFileError, match="No such file"):
        load_public_key(tmp_path / "missing.pub")
    junk = tmp_path / "junk.pub"
    junk.write_text("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    with pytest.raises(KeyFileError, match="not a readable PEM public key"):
        load_public_key(junk)
