"""Where the answer to an inference request goes, and which request id it carries."""

from __future__ import annotations

from mqinfer.protocol.topics import Ref, TopicError, Topics, check_id


def request_id(ref: Ref, correlation: bytes | None, from_body: str | None, key: str) -> str:
    """[T-REQ-2] the id in the topic, else a correlation data that is a valid id, else the
    JSON body's request_id, else the first 16 hex digits of the request key."""
    if ref.request_id:
        return ref.request_id
    if correlation:
        try:
            return check_id(correlation.decode(), "request id")
        except (UnicodeDecodeError, TopicError):
            pass
    return from_body or key[:16]


def result_topic(topics: Topics, service: str, ref: Ref, response_topic: str | None) -> str:
    """[T-SERVE-3] the MQTT 5 response topic if the request had one, else the result topic
    (with the request id when the request topic carried one)."""
    if response_topic:
        return response_topic
    return topics.service_result(service, ref.request_id)
