"""The mqinfer wire contract, with no I/O: topics, messages, codecs and error codes."""

from mqinfer.protocol.messages import PROTOCOL_VERSION
from mqinfer.protocol.topics import DEFAULT_PREFIX, Topics

__all__ = ["DEFAULT_PREFIX", "PROTOCOL_VERSION", "Topics"]
