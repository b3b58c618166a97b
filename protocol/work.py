"""What the hub gives a node to do, and what the node answers: binary envelopes, no I/O.

    magic                 4 bytes: b"MQW1" for work, b"MQA1" for an answer
    header length         4 bytes, unsigned, little-endian
    header                UTF-8 JSON object (`Work` or `Answer` below), at most 64 KiB
    body                  raw bytes, as they came: a request's payload as its sender sent
                          it, a pipeline stage's tensors (mqinfer.protocol.tensors), or the
                          result JSON the requester gets

The body is never re-encoded, so a frame crosses each link once, as it came. Work goes to
`nodes/{node}/work`, answers to `nodes/{node}/answer` (topics.md §7).
"""

from __future__ import annotations

import struct
from typing import Annotated, Literal

import orjson
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from mqinfer.protocol.errors import Code, ProtocolError
from mqinfer.protocol.topics import check_id

WORK_MAGIC = b"MQW1"
ANSWER_MAGIC = b"MQA1"
_LEN = struct.Struct("<I")
MAX_HEADER_BYTES = 64 * 1024
MAX_STAGES = 100

Id = Annotated[str, AfterValidator(lambda v: check_id(v))]
# A job names one lease: "{epoch}-{n}", chosen by the dispatcher that gave it.
Job = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,80}$")]


class _Header(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class StageTrace(_Header):
    """What one pipeline stage did for a request (a result's `timing.stages`)."""

    stage: int = Field(ge=0, lt=MAX_STAGES)
    node: Id
    queue_ms: float = Field(ge=0)
    inference_ms: float = Field(ge=0)


class Work(_Header):
    """One piece of work leased to one node ([T-WORK-1])."""

    job: Job = Field(description="The lease: the answer names it, and only it counts")
    service: Id
    stage: int | None = Field(None, ge=0, lt=MAX_STAGES, description="Pipeline stage, if any")
    kind: Literal["request", "tensors"] = Field(
        description="request: the body is a request as sent; tensors: a stage's input"
    )
    lease_ms: float = Field(gt=0, le=3_600_000, description="From receipt: answer within this")
    deadline_ms: float = Field(ge=0, description="What is left of the request's deadline")
    age_ms: float = Field(0, ge=0, description="Time since the hub accepted the request")
    request_id: Id = Field(description="The id the result carries ([T-REQ-2])")
    id_fixed: bool = Field(
        True,
        description="The id came from the topic or correlation data: a JSON body's "
        "request_id does not replace it",
    )
    trace: list[StageTrace] = Field(default_factory=list, max_length=MAX_STAGES)


class Answer(_Header):
    """A node's answer to one piece of work."""

    job: Job
    kind: Literal["result", "tensors", "released"] = Field(
        description="result: the body is the result JSON; tensors: the next stage's input; "
        "released: the node did not do it (the hub gives it to another)"
    )
    ok: bool = Field(True, description="For a result: whether it is an error result")
    code: str | None = Field(None, max_length=64, description="The error's or release's code")
    reason: str | None = Field(None, max_length=2000, description="Why it was released")
    node_ms: float | None = Field(None, ge=0, description="Receipt to answer, on the node")
    service_ms: float | None = Field(None, ge=0, description="A worker's time on it")
    inference_ms: float | None = Field(None, ge=0, description="The model run")
    trace: StageTrace | None = Field(None, description="tensors: what this stage did")


def encode(magic: bytes, header: _Header, body: bytes = b"") -> bytes:
    data = orjson.dumps(header.model_dump(mode="json", exclude_none=True))
    return b"".join([magic, _LEN.pack(len(data)), data, body])


def encode_work(work: Work, body: bytes) -> bytes:
    return encode(WORK_MAGIC, work, body)


def encode_answer(answer: Answer, body: bytes = b"") -> bytes:
    return encode(ANSWER_MAGIC, answer, body)


def _split(payload: bytes, magic: bytes, what: str) -> tuple[dict[str, object], bytes]:
    if len(payload) < 8 or payload[:4] != magic:
        raise ProtocolError(
            Code.BAD_MESSAGE,
            f"not {what}: expected the magic bytes {magic!r}, got {payload[:4]!r} "
            f"({len(payload)} bytes)",
        )
    (size,) = _LEN.unpack_from(payload, 4)
    if size > MAX_HEADER_BYTES or 8 + size > len(payload):
        raise ProtocolError(
            Code.BAD_MESSAGE, f"{what}: header length {size} does not fit {len(payload)} bytes"
        )
    try:
        header = orjson.loads(payload[8 : 8 + size])
    except orjson.JSONDecodeError as e:
        raise ProtocolError(Code.BAD_ENCODING, f"{what}: header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise ProtocolError(Code.BAD_MESSAGE, f"{what}: header must be a JSON object")
    return header, payload[8 + size :]


def _validate(model: type[_Header], header: dict[str, object], what: str) -> _Header:
    try:
        return model.model_validate(header)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(header)"
        said = first["msg"].removeprefix("Value error, ")
        raise ProtocolError(Code.BAD_MESSAGE, f"{what} header '{where}': {said}") from None


def decode_work(payload: bytes) -> tuple[Work, bytes]:
    """Read work; raise ProtocolError naming what is wrong."""
    header, body = _split(payload, WORK_MAGIC, "a work message")
    work = _validate(Work, header, "work")
    assert isinstance(work, Work)
    return work, body


def decode_answer(payload: bytes) -> tuple[Answer, bytes]:
    """Read an answer; raise ProtocolError naming what is wrong."""
    header, body = _split(payload, ANSWER_MAGIC, "an answer")
    answer = _validate(Answer, header, "answer")
    assert isinstance(answer, Answer)
    return answer, body
