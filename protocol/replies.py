"""Where the answer to an inference request goes, and which request id it carries."""

from __future__ import annotations

import hashlib

from mqinfer.protocol.errors import shorten
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


def response_refused(topics: Topics, response_topic: str | None) -> str | None:
    """[T-SERVE-5] why a result must not go to this MQTT 5 response topic; None if it may.

    Under the prefix only `{prefix}/replies/...` is a requester's: a response topic
    elsewhere in the tree (a node's `work`, a service's `spec`) would make the hub publish
    a requester's bytes where only the hub or a node may write. Outside the prefix any
    topic without wildcards is the requester's business."""
    if not response_topic:
        return None
    shown = shorten(response_topic)
    if "+" in response_topic or "#" in response_topic or "\0" in response_topic:
        return f"response topic {shown} has a wildcard: name one topic to publish the result on"
    inside = response_topic == topics.prefix or response_topic.startswith(topics.prefix + "/")
    replies = topics.replies_root()
    if inside and not response_topic.startswith(replies + "/"):
        return (
            f"response topic {shown} is inside {topics.prefix}/ but not under {replies}/: "
            f"choose one under {replies}/ (for example {replies}/<your name>/...) or outside "
            f"{topics.prefix}/"
        )
    return None


def result_topic(topics: Topics, service: str, ref: Ref, response_topic: str | None) -> str:
    """[T-SERVE-3] the MQTT 5 response topic if the request had one that the hub may use
    ([T-SERVE-5]), else the result topic (with the request id when the request topic
    carried one)."""
    if response_topic and response_refused(topics, response_topic) is None:
        return response_topic
    return topics.service_result(service, ref.request_id)
