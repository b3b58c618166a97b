"""Encoding and table-driven decoding of control messages (JSON via orjson)."""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError

from mqinfer.protocol import messages as m
from mqinfer.protocol.errors import Code, ProtocolError
from mqinfer.protocol.topics import Kind, Ref

# [T-PAY-2] control messages (everything but inference requests/results) are at most 256 KiB.
MAX_CONTROL_BYTES = 256 * 1024

# Which model each control topic carries. Requests and results have their own codecs.
MODEL_BY_KIND: dict[Kind, type[m.Wire]] = {
    Kind.NODE_CAPS: m.Capabilities,
    Kind.NODE_STATE: m.NodeState,
    Kind.NODE_HEARTBEAT: m.Heartbeat,
    Kind.NODE_CMD: m.Command,
    Kind.NODE_REPLY: m.CommandReply,
    Kind.SERVICE_SPEC: m.ServiceSpec,
    Kind.SERVICE_STATUS: m.ServiceStatus,
    Kind.ARTIFACT_META: m.ArtifactMeta,
    Kind.COORDINATOR_STATE: m.CoordinatorState,
    Kind.COORDINATOR_HEARTBEAT: m.CoordinatorHeartbeat,
}

T = TypeVar("T", bound=m.Wire)


def encode(message: BaseModel) -> bytes:
    """[T-PAY-1] UTF-8 JSON, fields that are None left out."""
    return orjson.dumps(message.model_dump(mode="json", exclude_none=True))


def _describe(payload: bytes) -> str:
    head = payload[:16]
    return f"{len(payload)} bytes starting {head!r}"


def load_json(payload: bytes, limit: int = MAX_CONTROL_BYTES) -> Any:
    if len(payload) > limit:
        raise ProtocolError(
            Code.TOO_LARGE, f"payload is {len(payload)} bytes; at most {limit} are accepted here"
        )
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError as e:
        raise ProtocolError(
            Code.BAD_ENCODING, f"expected a UTF-8 JSON object, got {_describe(payload)} ({e})"
        ) from None


def _schema_error(model: type[BaseModel], err: ValidationError) -> ProtocolError:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(message)"
    got = first.get("input")
    shown = repr(got)[:60]
    more = f" (and {err.error_count() - 1} more problems)" if err.error_count() > 1 else ""
    said = first["msg"].removeprefix("Value error, ")
    return ProtocolError(
        Code.BAD_MESSAGE, f"{model.__name__} field '{where}': {said}, got {shown}{more}"
    )


def decode_as(model: type[T], payload: bytes, limit: int = MAX_CONTROL_BYTES) -> T:
    data = load_json(payload, limit)
    if not isinstance(data, dict):
        raise ProtocolError(
            Code.BAD_MESSAGE,
            f"expected a JSON object for {model.__name__}, got {type(data).__name__}",
        )
    version = data.get("v", m.PROTOCOL_VERSION)
    if version != m.PROTOCOL_VERSION:
        raise ProtocolError(
            Code.UNSUPPORTED_VERSION,
            f"message version v={version!r}; this component speaks v={m.PROTOCOL_VERSION}",
        )
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _schema_error(model, e) from None


def decode(kind: Kind, payload: bytes) -> m.Wire:
    """Decode the payload of a control topic; raise ProtocolError saying what was wrong."""
    model = MODEL_BY_KIND.get(kind)
    if model is None:
        raise ProtocolError(Code.BAD_TOPIC, f"{kind} does not carry a control message")
    return decode_as(model, payload)


def decode_for(ref: Ref, payload: bytes) -> m.Wire:
    """Decode a control message and check it names the node or service of its topic."""
    message = decode(ref.kind, payload)
    if ref.artifact is not None:
        owner = getattr(message, "sha256", None)
    elif ref.node:
        owner = getattr(message, "node", None)
    else:
        owner = getattr(message, "name", None)
    expected = ref.node or ref.service or ref.artifact
    if expected is not None and owner is not None and owner != expected:
        what = "sha256" if ref.artifact else ("node" if ref.node else "name")
        raise ProtocolError(
            Code.MISMATCH,
            f"payload {what} {owner!r} does not match the topic's {expected!r}",
        )
    return message
