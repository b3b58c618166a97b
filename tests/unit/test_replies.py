"""Where the answer to a request goes and which id it carries (no broker)."""

from __future__ import annotations

import pytest

from mqinfer.protocol.replies import request_id, request_key, result_topic, valid_id
from mqinfer.protocol.topics import Topics

T = Topics()
REQUEST = T.service_request("digits")
KEYS = [request_key(REQUEST, f"img-{i}".encode(), None, None) for i in range(3)]


def test_request_key_is_24_hex_digits_and_stable() -> None:
    key = request_key(REQUEST, b"abc", b"c1", "reply/here")
    assert len(key) == 24 and int(key, 16) >= 0
    assert key == request_key(REQUEST, b"abc", b"c1", "reply/here")


def test_request_key_depends_on_every_part() -> None:
    base = request_key(REQUEST, b"abc", b"c1", "reply/here")
    variants = [
        request_key(T.service_request("digits", "r1"), b"abc", b"c1", "reply/here"),
        request_key(REQUEST, b"abd", b"c1", "reply/here"),
        request_key(REQUEST, b"abc", b"c2", "reply/here"),
        request_key(REQUEST, b"abc", None, "reply/here"),
        request_key(REQUEST, b"abc", b"c1", "reply/there"),
        request_key(REQUEST, b"abc", b"c1", None),
    ]
    assert base not in variants
    assert len(set(variants)) == len(variants)


# ---- replies ----------------------------------------------------------------------------


def test_request_id_precedence() -> None:
    """[T-REQ-2] topic id, then a correlation data that is a valid id, then the body's id,
    then the first 16 hex digits of the key."""
    key = KEYS[0]
    with_id = T.parse(T.service_request("digits", "from-topic"))
    plain = T.parse(REQUEST)
    assert request_id(with_id, b"from-corr", "from-body", key) == "from-topic"
    assert request_id(plain, b"from-corr", "from-body", key) == "from-corr"
    assert request_id(plain, None, "from-body", key) == "from-body"
    assert request_id(plain, None, None, key) == key[:16]
    assert request_id(plain, b"", None, key) == key[:16]


@pytest.mark.parametrize(
    "correlation",
    [b"\xff\xfe not utf-8", b"has space", b"a/b", b"-leading-dash", b"x" * 65],
)
def test_request_id_skips_correlation_that_is_not_a_valid_id(correlation: bytes) -> None:
    key = KEYS[1]
    plain = T.parse(REQUEST)
    assert request_id(plain, correlation, "from-body", key) == "from-body"
    assert request_id(plain, correlation, None, key) == key[:16]


def test_result_topic() -> None:
    """[T-SERVE-3] the response topic wins; else result/{id} when the request topic had an
    id; else result."""
    with_id = T.parse(T.service_request("digits", "r1"))
    plain = T.parse(REQUEST)
    assert result_topic(T, "digits", with_id, "my/inbox") == "my/inbox"
    assert result_topic(T, "digits", plain, "my/inbox") == "my/inbox"
    assert result_topic(T, "digits", with_id, None) == "mqinfer/services/digits/result/r1"
    assert result_topic(T, "digits", plain, None) == "mqinfer/services/digits/result"
    assert result_topic(T, "digits", plain, "") == "mqinfer/services/digits/result"


def test_valid_id() -> None:
    assert valid_id(b"cam-1") and not valid_id(b"a/b") and not valid_id(None)
    assert not valid_id(b"") and not valid_id(b"\xff")


def test_response_topics_inside_the_tree_must_be_under_replies() -> None:
    """[T-SERVE-5] a requester's response topic: anywhere outside the prefix, or under
    {prefix}/replies/; never another part of the tree, never a wildcard."""
    from mqinfer.protocol.replies import response_refused

    plain = T.parse(REQUEST)
    assert response_refused(T, None) is None
    assert response_refused(T, "my/inbox") is None
    assert response_refused(T, "mqinfer/replies/cam-1/x") is None
    assert response_refused(T, "mqinferx/nodes/n1/work") is None  # another prefix
    for topic in ("mqinfer/nodes/n1/work", "mqinfer/services/d/spec", "mqinfer", "mqinfer/replies"):
        why = response_refused(T, topic)
        assert why is not None and "not under mqinfer/replies/" in why
        assert result_topic(T, "digits", plain, topic) == "mqinfer/services/digits/result"
    assert "wildcard" in (response_refused(T, "my/+/inbox") or "")
    long = "mqinfer/nodes/" + "x" * 5000
    assert len(response_refused(T, long) or "") < 400
