"""The mqinfer wire contract, with no I/O: topics, messages, codecs and error codes."""

from protocol.messages import PROTOCOL_VERSION
from protocol.topics import DEFAULT_PREFIX, Topics

__all__ = ["DEFAULT_PREFIX", "PROTOCOL_VERSION", "Topics"]
