"""Where the answer to an inference request goes, and which request id it carries."""

from __future__ import annotations

import hashlib

from mqinfer.protocol.topics import Ref, TopicError, Topics, check_id


def request_key(
    topic: str, payload: bytes, correlation: bytes | None, response_topic: str | None
) -> str:
    """24 hex digits that tell a request from others: the default request id is its first
    16 ([T-REQ-2]). The same for the same topic, correlation, response topic and payload."""
    h = hashlib.blake2b(digest_size=12)
    h.update(topic.encode())
    h.update(b"\0")
    h.update(correlation or b"")
    h.update(b"\0")
    h.update((response_topic or "").encode())
    h.update(b"\0")
    h.update(payload)
    return h.hexdigest()


def valid_id(correlation: bytes | None) -> bool:
    """Whether MQTT 5 correlation data can serve as the request id ([T-ID-1])."""
    if not correlation:
        return False
    try:
        check_id(correlation.decode(), "request id")
    except (UnicodeDecodeError, TopicError):
        return False
    return True


def request_id(ref: Ref, correlation: bytes | None, from_body: str | None, key: str) -> str:
    """[T-REQ-2] the id in the topic, else a correlation data that is a valid id, else the
    JSON body's request_id, else the first 16 hex digits of the request key."""
    if ref.request_id:
        return ref.request_id
    if correlation is not None and valid_id(correlation):
        return correlation.decode()
    return from_body or key[:16]


def result_topic(topics: Topics, service: str, ref: Ref, response_topic: str | None) -> str:
    """[T-SERVE-3] the MQTT 5 response topic if the request had one, else the result topic
    (with the request id when the request topic carried one)."""
    if response_topic:
        return response_topic
    return topics.service_result(service, ref.request_id)
