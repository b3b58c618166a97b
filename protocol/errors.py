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
    # inference requests (results on services/{service}/result...)
    BAD_PAYLOAD = "bad_payload"  # not PNG, JPEG, .npy, JSON, nor raw bytes of the input's size
    BAD_IMAGE = "bad_image"  # a PNG or JPEG that does not decode (e.g. truncated)
    WRONG_SHAPE = "wrong_shape"  # an array or JSON input whose shape the model cannot take
    WRONG_DTYPE = "wrong_dtype"  # an array whose dtype cannot be converted without loss
    BUSY = "busy"  # the replica's queue is full; retry later
    TIMEOUT = "timeout"  # no result before the request's deadline
    UNAVAILABLE = "unavailable"  # the service has no ready replica
    INFERENCE_FAILED = "inference_failed"  # the runtime raised while running the model
    BAD_TENSOR = "bad_tensor"  # a stage message that is not a valid tensor message (pipelines)
    # provisioning (command replies and service status)
    BAD_ARTIFACT = "bad_artifact"  # a meta or chunk out of bounds, or the sha256 does not match
    ARTIFACT_MISSING = "artifact_missing"  # no meta on the broker: the model was never uploaded
    STORAGE_FAILED = "storage_failed"  # the node could not write its cache (disk full, ...)
    SUPERSEDED = "superseded"  # a newer command for the same service replaced this one
    UNSUPPORTED_FORMAT = "unsupported_format"  # no runtime on the node runs this format
    LOAD_FAILED = "load_failed"  # the runtime refused the model file
    UNTRUSTED = "untrusted"  # a node with trusted keys got a spec unsigned or not signed by one


class ProtocolError(ValueError):
    """A message that cannot be accepted, with a code and a message a sender can act on."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def shorten(value: str, limit: int = 60) -> str:
    """A value quoted for an error message, cut to `limit` characters: a hostile sender
    chooses what it sends, and an error must not echo a megabyte back."""
    if len(value) <= limit:
        return repr(value)
    return repr(value[:limit]) + f"... ({len(value)} characters)"
