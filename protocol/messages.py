"""Wire messages: pydantic models, one per payload kind in topics.md.

Messages are frozen values. Unknown fields are ignored ([T-VER-2]) so newer components
can add fields without breaking older ones; `v` is the major protocol version ([T-VER-1]).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

PROTOCOL_VERSION = 1


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
    models: list[str] = Field(default_factory=list, description="sha256 of cached artifacts")
    labels: dict[str, str] = Field(default_factory=dict, description="Operator-given labels")
    absent: dict[str, str] = Field(
        default_factory=dict,
        description="What was probed and not found, with the reason (e.g. edgetpu)",
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
    inflight: int = Field(0, ge=0, description="Requests being worked on")


class CoordinatorState(Wire):
    """Retained on coordinator/state; the Will carries state 'lost'."""

    id: str
    state: NodeStateName
    session: int
    ts: float | None = None


# ---- commands -------------------------------------------------------------------


class ErrorInfo(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    code: str
    message: str


class Command(Wire):
    """Sent to nodes/{node}/cmd."""

    id: str = Field(description="Command id, echoed in the reply")
    op: str = Field(description="Operation, e.g. 'ping', 'announce'")
    args: dict[str, Any] = Field(default_factory=dict)


class CommandReply(Wire):
    """Sent by the node on nodes/{node}/reply."""

    node: str
    id: str | None = Field(description="The command's id; None if it could not be read")
    ok: bool
    result: dict[str, Any] = Field(default_factory=dict)
    error: ErrorInfo | None = None


# ---- services -------------------------------------------------------------------


class ServiceSpec(Wire):
    """Retained on services/{service}/spec: the desired state of one service."""

    name: str
    model: str = Field(description="Model reference (path, name or sha256)")
    replicas: int = Field(1, ge=0)
    constraints: dict[str, Any] = Field(default_factory=dict)


class ReplicaStatus(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    node: str
    state: str


class ServiceStatus(Wire):
    """Retained on services/{service}/status: what the coordinator made of the spec."""

    name: str
    state: Literal["deploying", "ready", "degraded", "failed", "removed"]
    reason: str | None = None
    replicas: list[ReplicaStatus] = Field(default_factory=list)
    ts: float | None = None
