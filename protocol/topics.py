"""The mqinfer topic tree: builders, parser and the table that topics.md documents.

Every topic string in mqinfer comes from here. Nothing else formats or splits topics.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

DEFAULT_PREFIX = "mqinfer"

# [T-ID-1] node ids, service names and request ids: 1-64 characters from
# A-Z a-z 0-9 _ - . starting with a letter or digit. No '/', '+', '#', '$' or spaces.
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHUNK = re.compile(r"0|[1-9][0-9]{0,5}")


class TopicError(ValueError):
    """A topic, id or prefix that breaks the rules of topics.md."""


class Kind(StrEnum):
    NODE_CAPS = "node_caps"
    NODE_STATE = "node_state"
    NODE_HEARTBEAT = "node_heartbeat"
    NODE_CMD = "node_cmd"
    NODE_REPLY = "node_reply"
    NODE_WORK = "node_work"
    NODE_ANSWER = "node_answer"
    SERVICE_SPEC = "service_spec"
    SERVICE_STATUS = "service_status"
    SERVICE_REQUEST = "service_request"
    SERVICE_RESULT = "service_result"
    ARTIFACT_META = "artifact_meta"
    ARTIFACT_CHUNK = "artifact_chunk"
    COORDINATOR_STATE = "coordinator_state"
    COORDINATOR_HEARTBEAT = "coordinator_heartbeat"


@dataclass(frozen=True)
class TopicSpec:
    kind: Kind
    pattern: str  # relative to the prefix; {node}, {service}, ... are placeholders
    qos: int
    retain: bool


# The one table of topics. topics.md lists exactly these patterns (a test checks it).
TABLE: tuple[TopicSpec, ...] = (
    TopicSpec(Kind.NODE_CAPS, "nodes/{node}/caps", 1, True),
    TopicSpec(Kind.NODE_STATE, "nodes/{node}/state", 1, True),
    TopicSpec(Kind.NODE_HEARTBEAT, "nodes/{node}/heartbeat", 0, True),
    TopicSpec(Kind.NODE_CMD, "nodes/{node}/cmd", 1, False),
    TopicSpec(Kind.NODE_REPLY, "nodes/{node}/reply", 1, False),
    TopicSpec(Kind.NODE_WORK, "nodes/{node}/work", 1, False),
    TopicSpec(Kind.NODE_ANSWER, "nodes/{node}/answer", 1, False),
    TopicSpec(Kind.SERVICE_SPEC, "services/{service}/spec", 1, True),
    TopicSpec(Kind.SERVICE_STATUS, "services/{service}/status", 1, True),
    TopicSpec(Kind.SERVICE_REQUEST, "services/{service}/request", 1, False),
    TopicSpec(Kind.SERVICE_REQUEST, "services/{service}/request/{request_id}", 1, False),
    TopicSpec(Kind.SERVICE_RESULT, "services/{service}/result", 1, False),
    TopicSpec(Kind.SERVICE_RESULT, "services/{service}/result/{request_id}", 1, False),
    TopicSpec(Kind.ARTIFACT_META, "artifacts/{artifact}/meta", 1, True),
    TopicSpec(Kind.ARTIFACT_CHUNK, "artifacts/{artifact}/chunk/{chunk}", 1, True),
    TopicSpec(Kind.COORDINATOR_STATE, "coordinator/state", 1, True),
    TopicSpec(Kind.COORDINATOR_HEARTBEAT, "coordinator/heartbeat", 0, False),
)

SPEC_BY_KIND: dict[Kind, TopicSpec] = {}
for _spec in TABLE:
    SPEC_BY_KIND.setdefault(_spec.kind, _spec)


def check_id(value: str, what: str = "id") -> str:
    """Return value if it is a valid node id / service name / request id, else raise."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise TopicError(
            f"invalid {what} {value!r}: expected 1-64 characters from A-Z a-z 0-9 _ - . "
            "starting with a letter or digit"
        )
    return value


def check_slot(value: str) -> str:
    """What a node runs: a service name, or 'name:k' for stage k (0-99) of a pipeline."""
    name, sep, stage = value.partition(":") if isinstance(value, str) else ("", "", "")
    check_id(name, "service name")
    if sep and not re.fullmatch(r"0|[1-9][0-9]?", stage):
        raise TopicError(f"invalid slot {value!r}: expected NAME or NAME:STAGE (stage 0-99)")
    return value


def check_prefix(prefix: str) -> str:
    """[T-ID-2] A prefix is one or more '/'-separated levels, each a valid id."""
    for level in prefix.split("/"):
        check_id(level, "topic prefix level")
    return prefix


def node_id_from_hostname(hostname: str) -> str:
    """Turn any hostname into a valid node id (the default id of a node)."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "-", hostname.strip()).strip("-_.")
    return (cleaned or "node")[:64]


_FIELD_NAMES = {
    "node": "node id",
    "service": "service name",
    "request_id": "request id",
    "artifact": "artifact sha256",
    "chunk": "chunk index",
}


def check_sha256(value: str) -> str:
    """An artifact is named by the sha256 of its bytes: 64 lowercase hex digits."""
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise TopicError(f"invalid artifact {value!r}: expected 64 lowercase hex digits (sha256)")
    return value


def _check_field(name: str, value: str) -> None:
    if name == "artifact":
        check_sha256(value)
    elif name == "chunk":
        if not _CHUNK.fullmatch(value):
            raise TopicError(f"invalid chunk index {value!r}: expected 0-999999")
    else:
        check_id(value, _FIELD_NAMES[name])


@dataclass(frozen=True)
class Ref:
    """A parsed topic: what it is and whose it is."""

    kind: Kind
    node: str | None = None
    service: str | None = None
    request_id: str | None = None
    artifact: str | None = None
    chunk: str | None = None


class Topics:
    """Topic builders and the parser for one prefix."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = check_prefix(prefix)
        self._levels = prefix.split("/")

    def _join(self, *levels: str) -> str:
        return "/".join([self.prefix, *levels])

    # nodes
    def node_caps(self, node: str) -> str:
        return self._join("nodes", check_id(node, "node id"), "caps")

    def node_state(self, node: str) -> str:
        return self._join("nodes", check_id(node, "node id"), "state")

    def node_heartbeat(self, node: str) -> str:
        return self._join("nodes", check_id(node, "node id"), "heartbeat")

    def node_cmd(self, node: str) -> str:
        return self._join("nodes", check_id(node, "node id"), "cmd")

    def node_reply(self, node: str) -> str:
        return self._join("nodes", check_id(node, "node id"), "reply")

    def node_work(self, node: str) -> str:
        return self._join("nodes", check_id(node, "node id"), "work")

    def node_answer(self, node: str) -> str:
        return self._join("nodes", check_id(node, "node id"), "answer")

    # services
    def service_spec(self, service: str) -> str:
        return self._join("services", check_id(service, "service name"), "spec")

    def service_status(self, service: str) -> str:
        return self._join("services", check_id(service, "service name"), "status")

    def service_request(self, service: str, request_id: str | None = None) -> str:
        levels = ["services", check_id(service, "service name"), "request"]
        if request_id is not None:
            levels.append(check_id(request_id, "request id"))
        return self._join(*levels)

    def service_result(self, service: str, request_id: str | None = None) -> str:
        levels = ["services", check_id(service, "service name"), "result"]
        if request_id is not None:
            levels.append(check_id(request_id, "request id"))
        return self._join(*levels)

    def replies_root(self) -> str:
        """`{prefix}/replies`: under it, requesters' own MQTT 5 response topics
        ([T-SERVE-5]); the ACL gives each account `replies/<its name>/#`."""
        return self._join("replies")

    # artifacts
    def artifact_meta(self, sha256: str) -> str:
        return self._join("artifacts", check_sha256(sha256), "meta")

    def artifact_chunk(self, sha256: str, index: int) -> str:
        return self._join("artifacts", check_sha256(sha256), "chunk", str(index))

    def artifact_chunks(self, sha256: str) -> str:
        """Filter for every chunk of one artifact."""
        return self._join("artifacts", check_sha256(sha256), "chunk", "+")

    def service_requests(self, service: str) -> list[str]:
        """Filters for both request topics of one service."""
        base = self.service_request(service)
        return [base, base + "/+"]

    def coordinator_state(self) -> str:
        return self._join("coordinator", "state")

    def coordinator_heartbeat(self) -> str:
        return self._join("coordinator", "heartbeat")

    def all_requests(self) -> list[str]:
        """Filters for every service's request topics (the dispatcher's)."""
        base = self._join("services", "+", "request")
        return [base, base + "/+"]

    # subscriptions
    def all_nodes(self, kind: Kind) -> str:
        """Wildcard filter for one node topic kind across all nodes."""
        spec = SPEC_BY_KIND[kind]
        return self._join(*spec.pattern.replace("{node}", "+").split("/"))

    def all_services(self, kind: Kind) -> str:
        spec = SPEC_BY_KIND[kind]
        return self._join(*spec.pattern.replace("{service}", "+").split("/"))

    def everything(self) -> str:
        return self._join("#")

    # parsing
    def parse(self, topic: str) -> Ref:
        """Parse a topic under this prefix; raise TopicError naming what is wrong."""
        levels = topic.split("/")
        n = len(self._levels)
        if levels[:n] != self._levels:
            raise TopicError(f"topic {topic!r} is not under prefix {self.prefix!r}")
        rest = levels[n:]
        for spec in TABLE:
            pattern = spec.pattern.split("/")
            if len(pattern) != len(rest):
                continue
            fields: dict[str, str] = {}
            for want, got in zip(pattern, rest, strict=True):
                if want.startswith("{"):
                    name = want[1:-1]
                    _check_field(name, got)
                    fields[name] = got
                elif want != got:
                    break
            else:
                return Ref(spec.kind, **fields)
        raise TopicError(f"topic {topic!r} is not in the mqinfer topic tree (see topics.md)")
