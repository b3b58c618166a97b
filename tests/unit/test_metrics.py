"""coordinator.web: the Prometheus text, parsed back line by line, and the counters across a
takeover (no broker: the agent's registry and dispatcher are fed directly)."""

from __future__ import annotations

import hashlib
import math
import re

import orjson
import pytest

from mqinfer.coordinator.agent import CoordinatorAgent
from mqinfer.coordinator.dispatch import (
    LATENCY_BUCKETS,
    Dispatcher,
    Incoming,
    ReadyReplica,
    SendWork,
)
from mqinfer.coordinator.registry import Registry
from mqinfer.coordinator.web import AddressError, Sampler, metrics_text, parse_address
from mqinfer.protocol import messages as m
from mqinfer.protocol import work as w
from mqinfer.protocol.topics import Topics

SHA = hashlib.sha256(b"model").hexdigest()
T = Topics("p/mqinfer")

# The text exposition format 0.0.4, strictly: what a line may be.
NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\\\|\\"|\\n)*"'
VALUE = r"[+-]?(?:[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?|Inf|NaN)"
SAMPLE = re.compile(rf"({NAME})(?:\{{({LABEL}(?:,{LABEL})*)?\}})? ({VALUE})")
HELP = re.compile(rf"# HELP ({NAME}) (.*)")
TYPE = re.compile(rf"# TYPE ({NAME}) (counter|gauge|histogram|summary|untyped)")
SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("",), "gauge": ("",)}

Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> tuple[Series, dict[str, str]]:
    """Every line valid; every sample of a family declared before it; no series twice.
    Returns the series and each family's type."""
    assert text.endswith("\n")
    types: dict[str, str] = {}
    series: Series = {}
    for line in text.splitlines():
        if line.startswith("# HELP"):
            assert HELP.fullmatch(line), line
            continue
        if line.startswith("# TYPE"):
            match = TYPE.fullmatch(line)
            assert match, line
            assert match.group(1) not in types, f"family declared twice: {line}"
            types[match.group(1)] = match.group(2)
            continue
        match = SAMPLE.fullmatch(line)
        assert match, f"not a valid sample line: {line!r}"
        name, labels, value = match.groups()
        family = [f for f, kind in types.items() if any(name == f + s for s in SUFFIXES[kind])]
        assert family, f"sample of an undeclared family: {line}"
        pairs = tuple(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', labels or ""))
        key = (name, pairs)
        assert key not in series, f"series twice: {line}"
        series[key] = float(value.replace("Inf", "inf"))
    return series, types


def value(series: Series, name: str, **labels: str) -> float:
    return series[(name, tuple(labels.items()))]


def check_histograms(series: Series, types: dict[str, str]) -> None:
    """Buckets ascend in le and count up; +Inf equals _count."""
    for family in [f for f, k in types.items() if k == "histogram"]:
        groups: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
        for (name, labels), v in series.items():
            if name == family + "_bucket":
                rest = tuple(p for p in labels if p[0] != "le")
                le = dict(labels)["le"]
                groups.setdefault(rest, []).append((float(le.replace("Inf", "inf")), v))
        for rest, buckets in groups.items():
            les = [le for le, _ in buckets]
            assert les == sorted(les) and les[-1] == math.inf
            counts = [c for _, c in buckets]
            assert counts == sorted(counts), f"{family}{rest}: buckets not cumulative"
            assert counts[-1] == series[(family + "_count", rest)]


def spec(name: str) -> m.ServiceSpec:
    return m.ServiceSpec(name=name, model="m.tflite", artifact=SHA, format="tflite", replicas=2)


def incoming(rid: str, service: str = "digits") -> Incoming:
    return Incoming(
        service=service,
        payload=b"x" * 10,
        reply=T.service_result(service) + "/" + rid,
        correlation=None,
        request_id=rid,
        id_fixed=True,
    )


def node_messages(agent: CoordinatorAgent, node: str, now: float) -> None:
    caps = m.Capabilities(
        node=node,
        session=1,
        ts=1.0,
        agent="0.1.0",
        host=m.Host(
            hostname=node, os="Linux", arch="x86_64", cores=4, memory_total_mb=1024, python="3"
        ),
        runtimes={"litert": m.Runtime(package="ai-edge-litert", version="2", formats=["tflite"])},
        accelerators=[m.Accelerator(kind="cpu", name="cpu", runtime="litert")],
        formats=["tflite"],
    )
    state = m.NodeState(node=node, state="online", session=1, ts=1.0)
    beat = m.Heartbeat(
        node=node,
        session=1,
        seq=1,
        ts=1.0,
        interval=0.5,
        uptime=3.0,
        load=(0.25, 0.5, 0.75),
        memory_available_mb=512,
        inflight=2,
    )
    reg = agent.registry
    reg.apply(T.parse(T.node_caps(node)), caps, now, False)
    reg.apply(T.parse(T.node_state(node)), state, now, False)
    reg.apply(T.parse(T.node_heartbeat(node)), beat, now, False)


def serve(d: Dispatcher, rid: str, now: float, took: float, ok: bool = True) -> None:
    """A request through the dispatcher, answered by its replica `took` seconds later."""
    actions = d.on_request(incoming(rid), now)
    [work] = [a for a in actions if isinstance(a, SendWork)]
    header, _ = w.decode_work(work.payload)
    answer = w.Answer(job=header.job, kind="result", ok=ok, code=None if ok else "bad_image")
    d.on_answer(work.node, answer, b"{}", now + took)


def active_dispatcher(agent: CoordinatorAgent, now: float) -> Dispatcher:
    d = Dispatcher("e1")
    d.open(now)
    d.set_spec("digits", spec("digits"), now)
    d.set_ready("digits", [ReadyReplica("edge-1", 1), ReadyReplica("edge-2", 1)], now)
    agent.dispatcher = d
    agent.active = True
    return d


@pytest.fixture
def agent() -> CoordinatorAgent:
    a = CoordinatorAgent(T, Registry(missed_beats=3), "hub")
    node_messages(a, "edge-1", 10.0)
    node_messages(a, "edge-2", 10.0)
    status = m.ServiceStatus(
        name="digits",
        state="degraded",
        replicas=[
            m.ReplicaStatus(node="edge-1", state="ready"),
            m.ReplicaStatus(node="edge-2", state="deploying"),
        ],
        session=1,
        seq=1,
    )
    a.registry.apply(
        T.parse(T.coordinator_state()),
        m.CoordinatorState(id="hub", state="online", session=1),
        0,
        False,
    )
    a.registry.apply(T.parse(T.service_spec("digits")), spec("digits"), 10.0, False)
    a.registry.apply(T.parse(T.service_status("digits")), status, 10.0, False)
    return a


def test_every_line_is_valid_exposition_and_the_figures_are_what_happened(
    agent: CoordinatorAgent,
) -> None:
    d = active_dispatcher(agent, 100.0)
    serve(d, "r1", 100.0, 0.003)  # in the 0.005 bucket
    serve(d, "r2", 100.0, 0.04)  # 0.05
    serve(d, "r3", 100.0, 0.04, ok=False)  # 0.05, an error result
    serve(d, "r4", 100.0, 45.0)  # slower than every bound
    d.on_request(incoming("r5", "nope"), 101.0)  # not deployed: refused at once
    agent.registry.nodes["edge-2"].state = "lost"
    series, types = parse(metrics_text(Sampler(agent).take()))
    check_histograms(series, types)

    assert value(series, "mqinfer_coordinator_active") == 1
    assert value(series, "mqinfer_service_requests_total", service="digits") == 4
    assert value(series, "mqinfer_service_requests_total", service="(none)") == 1
    assert value(series, "mqinfer_service_errors_total", service="digits", code="bad_image") == 1
    assert value(series, "mqinfer_service_errors_total", service="(none)", code="unavailable") == 1
    assert value(series, "mqinfer_dispatch_accepted_total") == 5
    assert value(series, "mqinfer_dispatch_answered_total") == 5
    bucket = "mqinfer_service_latency_seconds_bucket"
    assert value(series, bucket, service="digits", le="0.005") == 1
    assert value(series, bucket, service="digits", le="0.025") == 1
    assert value(series, bucket, service="digits", le="0.05") == 3
    assert value(series, bucket, service="digits", le="30.0") == 3
    assert value(series, bucket, service="digits", le="+Inf") == 4
    assert value(series, "mqinfer_service_latency_seconds_count", service="digits") == 4
    assert value(series, "mqinfer_service_latency_seconds_sum", service="digits") == pytest.approx(
        45.083
    )
    assert len([k for k in series if k[0] == bucket and k[1][0] == ("service", "digits")]) == (
        len(LATENCY_BUCKETS) + 1
    )
    assert value(series, "mqinfer_service_replicas", service="digits", state="ready") == 1
    assert value(series, "mqinfer_service_replicas", service="digits", state="deploying") == 1
    assert value(series, "mqinfer_service_state", service="digits", state="degraded") == 1
    assert value(series, "mqinfer_service_state", service="digits", state="ready") == 0
    assert value(series, "mqinfer_node_state", node="edge-1", state="online") == 1
    assert value(series, "mqinfer_node_state", node="edge-2", state="lost") == 1
    assert value(series, "mqinfer_nodes", state="online") == 1
    assert value(series, "mqinfer_nodes", state="lost") == 1
    assert value(series, "mqinfer_node_load1", node="edge-1") == 0.25
    assert value(series, "mqinfer_node_memory_available_bytes", node="edge-1") == 512 * 2**20
    assert value(series, "mqinfer_node_inflight", node="edge-1") == 2
    assert value(series, "mqinfer_node_heartbeat_age_seconds", node="edge-1") >= 0
    assert types["mqinfer_service_requests_total"] == "counter"
    assert types["mqinfer_service_latency_seconds"] == "histogram"


def test_counters_only_go_up_across_scrapes_and_a_new_dispatcher(
    agent: CoordinatorAgent,
) -> None:
    """A takeover gives the agent a new dispatcher whose counters start at 0: the metrics
    add them to what the old one counted, so no counter goes down."""
    sampler = Sampler(agent)
    d = active_dispatcher(agent, 0.0)
    for i in range(3):
        serve(d, f"a{i}", 1.0, 0.02)
    first, types = parse(metrics_text(sampler.take()))
    serve(d, "a3", 2.0, 0.2, ok=False)  # after the scrape, before the takeover
    d2 = active_dispatcher(agent, 3.0)
    serve(d2, "b0", 3.0, 0.02)
    second, _ = parse(metrics_text(sampler.take()))
    serve(d2, "b1", 4.0, 0.02)
    third, _ = parse(metrics_text(sampler.take()))

    monotonic = [
        f + s
        for f, kind in types.items()
        if kind in ("counter", "histogram")
        for s in SUFFIXES[kind]
    ]
    for before, after in ((first, second), (second, third)):
        for key, v in before.items():
            if key[0] in monotonic:
                assert after[key] >= v, f"{key} went down: {v} -> {after[key]}"
    assert value(first, "mqinfer_service_requests_total", service="digits") == 3
    assert value(second, "mqinfer_service_requests_total", service="digits") == 5
    assert value(third, "mqinfer_service_requests_total", service="digits") == 6
    assert value(third, "mqinfer_service_errors_total", service="digits", code="bad_image") == 1
    assert value(third, "mqinfer_service_latency_seconds_count", service="digits") == 6


def test_label_values_are_escaped_and_odd_error_codes_are_bounded(
    agent: CoordinatorAgent,
) -> None:
    """A node may answer with any short code: the label takes 'other' for those mqinfer does
    not define, so a hostile node cannot grow the series without bound."""
    d = active_dispatcher(agent, 0.0)
    for i, code in enumerate(['a"b\\c\nd', "x" * 64, "zz"]):
        actions = d.on_request(incoming(f"r{i}"), 1.0)
        [work] = [a for a in actions if isinstance(a, SendWork)]
        header, _ = w.decode_work(work.payload)
        d.on_answer(
            work.node, w.Answer(job=header.job, kind="result", ok=False, code=code), b"{}", 1.1
        )
    series, _ = parse(metrics_text(Sampler(agent).take()))
    assert value(series, "mqinfer_service_errors_total", service="digits", code="other") == 3
    view = Sampler(agent).take()
    view["nodes"][0]["id"] = 'we"ird\\id\n'  # escaping itself, whatever a label holds
    series, _ = parse(metrics_text(view))
    assert value(series, "mqinfer_node_load1", node='we\\"ird\\\\id\\n') == 0.25


def test_the_snapshot_is_json_with_the_status_fields(agent: CoordinatorAgent) -> None:
    view = Sampler(agent).take()
    again = orjson.loads(orjson.dumps(view))
    assert [n["id"] for n in again["nodes"]] == ["edge-1", "edge-2"]
    assert again["nodes"][0]["accelerators"] == ["cpu"]
    assert again["nodes"][0]["limit_s"] == 1.5
    assert again["services"][0]["name"] == "digits" and again["services"][0]["queued"] == 0
    assert again["coordinator"]["id"] == "hub"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("9100", ("127.0.0.1", 9100)),
        (":9100", ("127.0.0.1", 9100)),
        ("0.0.0.0:9100", ("0.0.0.0", 9100)),
        ("hub.local:80", ("hub.local", 80)),
        ("[::1]:9100", ("::1", 9100)),
    ],
)
def test_addresses(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["", "host", "host:", "1:2:3", "65536", "x:-1", "[::1]"])
def test_bad_addresses_say_what_is_expected(text: str) -> None:
    with pytest.raises(AddressError, match=r"expected PORT, HOST:PORT|IPv6 address in brackets"):
        parse_address(text)
