"""Decoding control messages: specific error codes, forward compatibility."""

from __future__ import annotations

import orjson
import pytest

from mqinfer.protocol import codec
from mqinfer.protocol import messages as m
from mqinfer.protocol.errors import Code, ProtocolError
from mqinfer.protocol.topics import Kind, Topics

STATE = {"v": 1, "node": "edge-1", "state": "online", "session": 5, "ts": 1.5}


def _code(kind: Kind, payload: bytes) -> Code:
    with pytest.raises(ProtocolError) as e:
        codec.decode(kind, payload)
    return e.value.code


def test_round_trip_and_none_fields_left_out() -> None:
    """[T-PAY-1]"""
    msg = m.NodeState(node="edge-1", state="lost", session=5, by="will")
    raw = codec.encode(msg)
    assert b"null" not in raw and b'"reason"' not in raw
    assert codec.decode(Kind.NODE_STATE, raw) == msg


def test_unknown_fields_are_ignored() -> None:
    """[T-VER-2]"""
    raw = orjson.dumps({**STATE, "colour": "blue", "future": {"x": 1}})
    assert codec.decode(Kind.NODE_STATE, raw) == m.NodeState.model_validate(STATE)


def test_other_major_version_is_refused() -> None:
    """[T-VER-1]"""
    with pytest.raises(ProtocolError) as e:
        codec.decode(Kind.NODE_STATE, orjson.dumps({**STATE, "v": 2}))
    assert e.value.code is Code.UNSUPPORTED_VERSION
    assert "v=2" in e.value.message and "v=1" in e.value.message


def test_too_large_is_refused_before_parsing() -> None:
    """[T-PAY-2]"""
    big = orjson.dumps({**STATE, "pad": "x" * codec.MAX_CONTROL_BYTES})
    assert _code(Kind.NODE_STATE, big) is Code.TOO_LARGE


@pytest.mark.parametrize(
    ("payload", "code", "says"),
    [
        (b"\xff\xfe\x00", Code.BAD_ENCODING, "expected a UTF-8 JSON object"),
        (b"{oops", Code.BAD_ENCODING, "expected a UTF-8 JSON object"),
        (b"[1,2]", Code.BAD_MESSAGE, "got list"),
        (orjson.dumps({**STATE, "state": "sleepy"}), Code.BAD_MESSAGE, "field 'state'"),
        (orjson.dumps({**STATE, "session": "abc"}), Code.BAD_MESSAGE, "field 'session'"),
        (orjson.dumps({"v": 1, "node": "edge-1"}), Code.BAD_MESSAGE, "more problems"),
    ],
)
def test_bad_payloads_get_a_specific_error(payload: bytes, code: Code, says: str) -> None:
    with pytest.raises(ProtocolError) as e:
        codec.decode(Kind.NODE_STATE, payload)
    assert e.value.code is code
    assert says in e.value.message


def test_payload_must_name_its_topic_owner() -> None:
    t = Topics()
    ref = t.parse(t.node_state("edge-2"))
    with pytest.raises(ProtocolError) as e:
        codec.decode_for(ref, orjson.dumps(STATE))
    assert e.value.code is Code.MISMATCH
    assert "'edge-1'" in e.value.message and "'edge-2'" in e.value.message


def test_every_control_topic_has_a_model() -> None:
    control = {
        Kind.SERVICE_REQUEST,
        Kind.SERVICE_RESULT,
        Kind.ARTIFACT_CHUNK,
        Kind.NODE_WORK,
        Kind.NODE_ANSWER,
    }
    assert set(codec.MODEL_BY_KIND) == set(Kind) - control
    assert _code(Kind.SERVICE_REQUEST, b"{}") is Code.BAD_TOPIC


def test_a_reply_to_an_unreadable_command_reads_back() -> None:
    """A node answers a command it could not read with no id; encoding leaves the None
    out, and the coordinator must still read the reply."""
    reply = m.CommandReply(
        node="edge-1", id=None, ok=False, error=m.ErrorInfo(code="bad_encoding", message="x")
    )
    raw = codec.encode(reply)
    assert b'"id"' not in raw
    assert codec.decode(Kind.NODE_REPLY, raw) == reply
