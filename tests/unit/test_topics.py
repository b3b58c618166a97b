"""Topic builders and parser, and their agreement with topics.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mqinfer.protocol.topics import (
    TABLE,
    Kind,
    Ref,
    TopicError,
    Topics,
    check_prefix,
    node_id_from_hostname,
)

REPO = Path(__file__).resolve().parents[2]
TOPICS_MD = (REPO / "topics.md").read_text()


def test_build_and_parse_round_trip() -> None:
    t = Topics("mqinfer")
    cases = {
        t.node_caps("edge-1"): Ref(Kind.NODE_CAPS, node="edge-1"),
        t.node_state("edge-1"): Ref(Kind.NODE_STATE, node="edge-1"),
        t.node_heartbeat("edge-1"): Ref(Kind.NODE_HEARTBEAT, node="edge-1"),
        t.node_cmd("edge-1"): Ref(Kind.NODE_CMD, node="edge-1"),
        t.node_reply("edge-1"): Ref(Kind.NODE_REPLY, node="edge-1"),
        t.service_spec("digits"): Ref(Kind.SERVICE_SPEC, service="digits"),
        t.service_status("digits"): Ref(Kind.SERVICE_STATUS, service="digits"),
        t.service_request("digits"): Ref(Kind.SERVICE_REQUEST, service="digits"),
        t.service_request("digits", "r1"): Ref(
            Kind.SERVICE_REQUEST, service="digits", request_id="r1"
        ),
        t.service_result("digits"): Ref(Kind.SERVICE_RESULT, service="digits"),
        t.service_result("digits", "r1"): Ref(
            Kind.SERVICE_RESULT, service="digits", request_id="r1"
        ),
        t.node_work("n1"): Ref(Kind.NODE_WORK, node="n1"),
        t.node_answer("n1"): Ref(Kind.NODE_ANSWER, node="n1"),
        t.coordinator_heartbeat(): Ref(Kind.COORDINATOR_HEARTBEAT),
        t.artifact_meta(SHA): Ref(Kind.ARTIFACT_META, artifact=SHA),
        t.artifact_chunk(SHA, 12): Ref(Kind.ARTIFACT_CHUNK, artifact=SHA, chunk="12"),
        t.coordinator_state(): Ref(Kind.COORDINATOR_STATE),
    }
    assert len(cases) == len(TABLE)
    for topic, ref in cases.items():
        assert t.parse(topic) == ref


SHA = "ab" * 32


@pytest.mark.parametrize(
    "topic",
    [
        "mqinfer/artifacts/AB" + "ab" * 31 + "/meta",  # uppercase hex
        "mqinfer/artifacts/abc/meta",  # too short
        "mqinfer/artifacts/" + SHA + "/chunk/01",  # leading zero
        "mqinfer/artifacts/" + SHA + "/chunk/-1",
    ],
)
def test_artifact_topics_are_strict(topic: str) -> None:
    with pytest.raises(TopicError):
        Topics().parse(topic)


def test_user_facing_topics_are_fixed() -> None:
    t = Topics()
    assert t.service_request("digits") == "mqinfer/services/digits/request"
    assert t.service_result("digits") == "mqinfer/services/digits/result"
    assert t.service_result("digits", "abc") == "mqinfer/services/digits/result/abc"


def test_multi_level_prefix() -> None:
    t = Topics("site-a/mqinfer")
    assert t.node_state("n1") == "site-a/mqinfer/nodes/n1/state"
    assert t.parse("site-a/mqinfer/nodes/n1/state") == Ref(Kind.NODE_STATE, node="n1")
    assert t.all_nodes(Kind.NODE_CAPS) == "site-a/mqinfer/nodes/+/caps"
    assert t.all_services(Kind.SERVICE_STATUS) == "site-a/mqinfer/services/+/status"


@pytest.mark.parametrize("bad", ["", "a/b", "a+b", "a#", "$sys", "-lead", "a b", "x" * 65, "é"])
def test_invalid_ids_are_refused_with_the_rule(bad: str) -> None:
    """[T-ID-1]"""
    with pytest.raises(TopicError, match="expected 1-64 characters"):
        Topics().node_state(bad)


@pytest.mark.parametrize("bad", ["", "$SYS", "a//b", "a/+/b", "/lead"])
def test_invalid_prefixes(bad: str) -> None:
    """[T-ID-2]"""
    with pytest.raises(TopicError):
        check_prefix(bad)


@pytest.mark.parametrize(
    ("topic", "why"),
    [
        ("other/nodes/a/state", "not under prefix"),
        ("mqinfer/nodes/a/unknown", "not in the mqinfer topic tree"),
        ("mqinfer/nodes/a", "not in the mqinfer topic tree"),
        ("mqinfer/nodes/a b/state", "invalid node id"),
        ("mqinfer/services/s/request/r/extra", "not in the mqinfer topic tree"),
    ],
)
def test_parse_says_what_is_wrong(topic: str, why: str) -> None:
    with pytest.raises(TopicError, match=why):
        Topics().parse(topic)


@pytest.mark.parametrize(
    ("hostname", "node_id"),
    [
        ("edge-1", "edge-1"),
        ("Pi 4 (kitchen)", "Pi-4--kitchen"),
        ("host.local", "host.local"),
        ("###", "node"),
    ],
)
def test_default_node_id_from_hostname(hostname: str, node_id: str) -> None:
    assert node_id_from_hostname(hostname) == node_id
    Topics().node_state(node_id_from_hostname(hostname))  # always valid


def _documented_topics() -> dict[str, tuple[int, bool]]:
    rows = re.findall(r"^\| `\{prefix\}/([^`]+)` \|[^|]*\| (\d) \| (yes|no) \|", TOPICS_MD, re.M)
    return {pattern: (int(qos), retain == "yes") for pattern, qos, retain in rows}


def test_topics_md_lists_exactly_the_protocol_topics() -> None:
    documented = _documented_topics()
    implemented = {s.pattern: (s.qos, s.retain) for s in TABLE}
    assert documented == implemented


def test_every_must_in_topics_md_is_cited_by_a_test() -> None:
    ids = set(re.findall(r"\[(T-[A-Z]+-\d+)\]", TOPICS_MD))
    assert len(ids) >= 10
    tests = "".join(p.read_text() for p in (REPO / "tests").rglob("test_*.py"))
    cited = set(re.findall(r"\[(T-[A-Z]+-\d+)\]", tests))
    assert ids - cited == set(), "MUSTs no test cites"
    assert cited - ids == set(), "tests cite ids topics.md does not have"
