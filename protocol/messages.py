"""Wire messages: pydantic models, one per payload kind in topics.md.

Messages are frozen values. Unknown fields are ignored ([T-VER-2]) so newer components
can add fields without breaking older ones; `v` is the major protocol version ([T-VER-1]).
"""

from __future__ import annotations

import base64
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from mqinfer.protocol.manifest import Format, Manifest, Pipeline, Sha256
from mqinfer.protocol.topics import check_id, check_slot

PROTOCOL_VERSION = 1

# Ids are checked where a message is decoded, not where they are used ([T-ID-1]).
Id = Annotated[str, AfterValidator(lambda v: check_id(v))]
Slot = Annotated[str, AfterValidator(check_slot)]
MAX_SLOTS = 256  # services a heartbeat may list (a node runs far fewer)
MAX_CHUNK_BYTES = 256 * 1024  # [T-ART-1]
MAX_CHUNKS = 1_000_000  # chunk indices are 0-999999 (topics.md §1)


class Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    v: int = Field(PROTOCOL_VERSION, description="Major protocol version")


# ---- capabilities ---------------------------------------------------------------


class Host(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    hostname: str
    os: str = Field(description="Operating system, e.g. 'Linux 6.1.0'")
    arch: str = Field(description="Machine architecture, e.g. 'x86_64', 'aarch64'")
    cpu_model: str | None = Field(None, description="CPU model name, None when unknown")
    cores: int = Field(ge=1, description="Logical CPU cores")
    memory_total_mb: int = Field(ge=0)
    python: str


class Runtime(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    package: str = Field(description="Python distribution that provides it")
    version: str
    formats: list[str] = Field(description="Model formats it runs, e.g. ['tflite']")
    providers: list[str] = Field(
        default_factory=list, description="Execution providers (ONNX Runtime) or delegates"
    )


class Accelerator(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    kind: Literal["cpu", "edgetpu", "gpu", "openvino", "npu"]
    name: str = Field(description="Human readable device name")
    runtime: str = Field(description="Runtime key (in Capabilities.runtimes) that reaches it")
    detail: dict[str, Any] = Field(default_factory=dict)
    memory_mb: int | None = Field(
        None,
        ge=0,
        description="Memory the device has for models (a GPU's), MB; None when it uses the "
        "host's or it is not known",
    )
    free_mb: int | None = Field(
        None, ge=0, description="Of memory_mb, what was free when the node started, MB"
    )


class Capabilities(Wire):
    """Retained on nodes/{node}/caps."""

    node: str
    session: int = Field(description="Session counter of the connection that sent it")
    ts: float = Field(description="Unix time (s) of the announcement")
    agent: str = Field(description="mqinfer version of the node agent")
    host: Host
    runtimes: dict[str, Runtime] = Field(
        description="Runtimes that import, keyed 'litert', 'tflite_runtime', 'onnxruntime'"
    )
    accelerators: list[Accelerator] = Field(description="Usable compute devices; always a cpu")
    formats: list[str] = Field(description="Model formats this node can run")
    models: list[Sha256] = Field(
        default_factory=list, max_length=100_000, description="sha256 of cached artifacts"
    )
    labels: dict[str, str] = Field(default_factory=dict, description="Operator-given labels")
    absent: dict[str, str] = Field(
        default_factory=dict,
        description="What was probed and not found, with the reason (e.g. edgetpu)",
    )
    speed_ms: float | None = Field(
        None, description="Run time of a fixed reference workload at start (lower: faster)"
    )
    max_workers: int | None = Field(None, description="Worker threads per replica, at most")
    artificial_slowdown: float = Field(
        1.0, ge=1.0, description="For experiments only: model runs made this many times slower"
    )


# ---- presence -------------------------------------------------------------------

NodeStateName = Literal["online", "offline", "lost"]


class NodeState(Wire):
    """Retained on nodes/{node}/state; the Will carries state 'lost'."""

    node: str
    state: NodeStateName
    session: int
    ts: float | None = Field(None, description="Unix time; absent in a Will (set at connect)")
    reason: str | None = None
    by: Literal["node", "will", "coordinator"] = "node"


class Heartbeat(Wire):
    """Retained (QoS 0) on nodes/{node}/heartbeat, every `interval` seconds."""

    node: str
    session: int
    seq: int = Field(ge=0)
    ts: float
    interval: float = Field(gt=0, description="Seconds until the next heartbeat")
    uptime: float = Field(ge=0, description="Seconds since the agent started")
    load: tuple[float, float, float] = Field(description="1, 5, 15 min load average")
    memory_available_mb: int = Field(ge=0)
    inflight: int = Field(0, ge=0, description="Requests queued or being worked on")
    services: dict[Slot, str] = Field(
        default_factory=dict,
        max_length=MAX_SLOTS,
        description="Services this session runs: slot -> 'loading' | 'ready' | 'failed'; "
        "a slot is the service name, or 'name:k' for stage k of a pipeline",
    )
    stats: dict[Slot, ReplicaStats] = Field(
        default_factory=dict,
        max_length=MAX_SLOTS,
        description="What each slot's model costs here, measured",
    )


class ReplicaStats(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    served: int = Field(0, ge=0, description="Requests answered (or passed on) since deploy")
    inference_ms: float | None = Field(
        None, description="Model run time: warm-up at deploy, then a running mean of traffic"
    )
    queue_ms: float | None = Field(None, description="Running mean of time spent queued")
    service_ms: float | None = Field(
        None, description="Running mean of a worker's time per request: decode, run, answer"
    )
    workers: int = Field(1, ge=1, description="Worker threads (interpreters) it runs")
    rate: float | None = Field(None, description="Requests per second since the last heartbeat")


def slot(service: str, stage: int | None) -> str:
    """What a node runs: a service, or stage k of a pipeline service ('name:k')."""
    return service if stage is None else f"{service}:{stage}"


def parse_slot(value: str) -> tuple[str, int | None]:
    name, sep, stage = value.partition(":")
    return (name, int(stage)) if sep and stage.isdigit() else (name, None)


class CoordinatorState(Wire):
    """Retained on coordinator/state; the Will carries state 'lost'."""

    id: str
    state: NodeStateName
    session: int
    ts: float | None = None


class CoordinatorHeartbeat(Wire):
    """On coordinator/heartbeat (QoS 0, not retained) every `interval` seconds while a
    coordinator is active: standbys take over when it stops, nodes learn they lost the hub."""

    id: str
    session: int
    seq: int = Field(ge=0)
    ts: float
    interval: float = Field(gt=0)
    dispatch: dict[str, Any] = Field(
        default_factory=dict, description="What the dispatcher is doing (figures)"
    )


# ---- commands -------------------------------------------------------------------


class ErrorInfo(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    code: str
    message: str


class Command(Wire):
    """Sent to nodes/{node}/cmd."""

    id: str = Field(min_length=1, max_length=128, description="Command id, echoed in the reply")
    op: str = Field(max_length=64, description="Operation, e.g. 'ping', 'announce'")
    args: dict[str, Any] = Field(default_factory=dict)


class CommandReply(Wire):
    """Sent by the node on nodes/{node}/reply."""

    node: str
    id: str | None = Field(None, description="The command's id; None if it could not be read")
    ok: bool
    result: dict[str, Any] = Field(default_factory=dict)
    error: ErrorInfo | None = None


# ---- services -------------------------------------------------------------------


class Constraints(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    accelerator: Literal["cpu", "edgetpu", "gpu", "openvino", "npu"] | None = Field(
        None, description="Only nodes with an accelerator of this kind"
    )
    labels: dict[str, str] = Field(
        default_factory=dict, description="Only nodes whose labels include all of these"
    )


KEY_ID_HEX = 16  # a key id: the first 16 hex digits of the sha256 of the raw public key
SIGNATURE_BYTES = 64  # an Ed25519 signature
SIGNATURE_B64 = 88  # its standard base64, padded


def _check_key_id(value: str) -> str:
    if len(value) != KEY_ID_HEX or any(c not in "0123456789abcdef" for c in value):
        raise ValueError(
            f"expected a key id of {KEY_ID_HEX} lowercase hex digits "
            "(as `mqinfer keys generate` prints)"
        )
    return value


def _check_sig(value: str) -> str:
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except ValueError:  # binascii.Error and UnicodeEncodeError are ValueErrors
        raw = b""
    if len(raw) != SIGNATURE_BYTES:
        raise ValueError(
            f"expected the standard base64 of a {SIGNATURE_BYTES}-byte Ed25519 signature "
            f"({SIGNATURE_B64} characters)"
        )
    return value


class Signature(BaseModel):
    """Who vouches for a spec: an Ed25519 signature over the spec without this field
    (mqinfer.protocol.signing, topics.md §4.6)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    key: Annotated[str, AfterValidator(_check_key_id)] = Field(
        max_length=KEY_ID_HEX, description="Id of the signing key (16 hex digits)"
    )
    sig: Annotated[str, AfterValidator(_check_sig)] = Field(
        max_length=SIGNATURE_B64, description="Base64 of the 64-byte Ed25519 signature"
    )


class ServiceSpec(Wire):
    """Retained on services/{service}/spec: the desired state of one service."""

    name: Id
    model: str = Field(
        max_length=255, description="Model file name, for people (e.g. digits_int8.tflite)"
    )
    artifact: Sha256 = Field(description="sha256 of the model file (artifacts/{sha256}/...)")
    format: Format = Field(description="tflite, onnx or edgetpu_tflite")
    size: int = Field(0, ge=0, description="Model file size in bytes")
    replicas: int = Field(1, ge=0)
    constraints: Constraints = Field(default_factory=Constraints)
    deadline_ms: int = Field(10_000, gt=0, description="Each request is answered within this")
    workers: int = Field(1, ge=1, le=64, description="Worker threads (interpreters) per replica")
    threads: int = Field(1, ge=1, le=64, description="Runtime threads per worker")
    queue: int = Field(
        128,
        ge=1,
        le=100_000,
        description="Requests that wait at the hub per ready replica before one is answered busy",
    )
    manifest: Manifest | None = Field(None, description="Inputs, preprocessing and labels")
    revision: str = Field("", description="Set by each deploy; echoed in the status")
    pipeline: Pipeline | None = Field(
        None,
        description="A split model: each segment is a stage placed on its own node, chained "
        "through services/{service}/stage/{k}; `artifact` is then the whole model's sha256",
    )

    signature: Signature | None = Field(
        None,
        description="The deployer's signature over the rest of the spec; nodes started with "
        "trusted keys run only specs that carry a good one",
    )

    @property
    def stages(self) -> int:
        """0 for a whole-model service, else the number of pipeline stages."""
        return len(self.pipeline.segments) if self.pipeline else 0

    def for_stage(self, stage: int | None) -> ServiceSpec:
        """The spec as one stage sees it: that segment's artifact, size and file name."""
        if stage is None or self.pipeline is None:
            return self
        seg = self.pipeline.segments[stage].manifest
        return self.model_copy(update={"artifact": seg.sha256, "size": seg.size, "model": seg.file})


# A replica takes a new spec in place (and keeps serving) unless one of these changed.
RELOAD_FIELDS = ("artifact", "format", "workers", "threads", "pipeline")


def needs_reload(old: ServiceSpec, new: ServiceSpec) -> bool:
    return any(getattr(old, f) != getattr(new, f) for f in RELOAD_FIELDS)


ReplicaState = Literal["deploying", "ready", "failed", "removing"]
# A runtime as a node reports it in a deploy reply: 'litert', 'onnxruntime', 'openvino GPU'.
RUNTIME_NAME = r"^[A-Za-z0-9_.\-]+( [A-Za-z0-9_.\-]+)?$"
RUNTIME_NAME_MAX = 64


def runtime_name(value: object) -> str | None:
    """The `runtime` of a deploy reply's result when it is a runtime name, else None (a
    node's reply is input: a bad one must not spoil the status built from it)."""
    if (
        isinstance(value, str)
        and len(value) <= RUNTIME_NAME_MAX
        and re.fullmatch(RUNTIME_NAME, value)
    ):
        return value
    return None


class ReplicaStatus(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    node: Id
    state: ReplicaState
    reason: str | None = None
    stage: int | None = Field(None, description="Pipeline stage it runs; None: the whole model")
    runtime: str | None = Field(
        None,
        max_length=RUNTIME_NAME_MAX,
        pattern=RUNTIME_NAME,
        description="The runtime it serves with, as its node's deploy reply said",
    )


class ServiceStatus(Wire):
    """Retained on services/{service}/status: what the coordinator made of the spec.

    The replicas in state 'ready' are the ones the dispatcher gives work to.
    """

    name: Slot  # the service (a provisioner's per-stage status names the slot)
    state: Literal["deploying", "ready", "degraded", "failed", "removed"]
    reason: str | None = None
    replicas: list[ReplicaStatus] = Field(default_factory=list, max_length=10_000)
    want: int = Field(0, ge=0, description="Replicas asked for (per stage for a pipeline)")
    stages: int = Field(0, ge=0, description="Pipeline stages; 0 for a whole-model service")
    artifact: Sha256 | None = None
    revision: str | None = Field(None, description="The spec revision this status is for")
    ts: float | None = None
    session: int | None = Field(
        None, description="Session of the coordinator that published it ([T-STATUS-2])"
    )
    seq: int | None = Field(
        None, ge=0, description="Counts up with every status the coordinator publishes"
    )

    def ready_nodes(self, stage: int | None = None) -> list[str]:
        return sorted(r.node for r in self.replicas if r.state == "ready" and r.stage == stage)

    def head_ready(self) -> list[str]:
        """Ready replicas of what takes the requests: the whole model, or stage 0."""
        return self.ready_nodes(0 if self.stages else None)

    def listed_nodes(self, stage: int | None = None) -> list[str]:
        return sorted({r.node for r in self.replicas if r.stage == stage})


# ---- artifacts ------------------------------------------------------------------


class ArtifactMeta(Wire):
    """Retained on artifacts/{sha256}/meta once every chunk is published."""

    sha256: Sha256
    name: str = Field(max_length=255, description="Original file name, e.g. digits_int8.tflite")
    format: Format
    size: int = Field(ge=1, description="File size in bytes")
    chunk_size: int = Field(gt=0, le=MAX_CHUNK_BYTES)
    chunks: int = Field(ge=1, le=MAX_CHUNKS)
    manifest: Manifest | None = None
    ts: float | None = None

    @field_validator("chunks")
    @classmethod
    def _chunks_add_up(cls, chunks: int, info: ValidationInfo) -> int:
        size, chunk_size = info.data.get("size"), info.data.get("chunk_size")
        if size is None or chunk_size is None:
            return chunks  # their own errors are reported
        want = -(-size // chunk_size)
        if chunks != want:
            raise ValueError(
                f"{chunks} chunks of {chunk_size} bytes do not hold {size} bytes "
                f"(expected {want} chunks)"
            )
        return chunks

    def chunk_length(self, index: int) -> int:
        """How many bytes chunk `index` must have: chunk_size, the last one the rest."""
        if index < self.chunks - 1:
            return self.chunk_size
        return self.size - self.chunk_size * (self.chunks - 1)
