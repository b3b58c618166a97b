"""Error codes carried in `error.code` of replies and results (topics.md, "Errors")."""

from __future__ import annotations

from enum import StrEnum


class Code(StrEnum):
    BAD_TOPIC = "bad_topic"  # the topic is not in the tree, or an id in it is invalid
    TOO_LARGE = "too_large"  # payload over the limit for that topic
    BAD_ENCODING = "bad_encoding"  # not UTF-8 JSON where JSON is expected
    BAD_MESSAGE = "bad_message"  # JSON that does not match the schema
    UNSUPPORTED_VERSION = "unsupported_version"  # `v` is not a major version we speak
    MISMATCH = "mismatch"  # payload names another node/service than its topic
    UNKNOWN_COMMAND = "unknown_command"
    INTERNAL = "internal"


class ProtocolError(ValueError):
    """A message that cannot be accepted, with a code and a message a sender can act on."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
