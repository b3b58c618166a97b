"""The provisioner: specs, replies and the registry in, commands and statuses out."""

from __future__ import annotations

import time
from typing import Any

from mqinfer.coordinator.provision import (
    DEPLOY_ATTEMPTS,
    DEPLOY_TIMEOUT,
    RECONCILE_EVERY,
    RETRY_FAILED_MAX_S,
    RETRY_FAILED_S,
    Action,
    Provisioner,
    PublishStatus,
    SendCommand,
)
from mqinfer.coordinator.registry import NodeRecord, Registry
from mqinfer.protocol import messages as m

SHA = "ab" * 32
OTHER_SHA = "cd" * 32
NAME = "digits"


def spec(**kw: object) -> m.ServiceSpec:
    fields: dict[str, object] = {
        "name": NAME,
        "model": "digits_int8.tflite",
        "artifact": SHA,
        "format": "tflite",
        "size": 50_000,
        "replicas": 2,
        "revision": "r1",
    }
    fields.update(kw)
    return m.ServiceSpec.model_validate(fields)


def online(node_id: str, session: int = 1, services: tuple[str, ...] = ()) -> NodeRecord:
    host = m.Host(
        hostname=node_id,
        os="Linux 6.1",
        arch="x86_64",
        cores=4,
        memory_total_mb=4096,
        python="3.11",
    )
    caps = m.Capabilities(
        node=node_id,
        session=session,
        ts=0.0,
        agent="0.1",
        host=host,
        runtimes={"litert": m.Runtime(package="ai-edge-litert", version="1", formats=["tflite"])},
        accelerators=[m.Accelerator(kind="cpu", name="cpu", runtime="litert")],
        formats=["tflite"],
    )
    return NodeRecord(
        node_id,
        state="online",
        session=session,
        caps=caps,
        heartbeat=beat(node_id, session, services),
    )


def beat(node_id: str, session: int, services: tuple[str, ...] = ()) -> m.Heartbeat:
    return m.Heartbeat(
        node=node_id,
        session=session,
        seq=0,
        ts=0.0,
        interval=1.0,
        uptime=0.0,
        load=(0.0, 0.0, 0.0),
        memory_available_mb=2048,
        services={s: "ready" for s in services},
    )


def registry(*nodes: str) -> Registry:
    return Registry(nodes={n: online(n) for n in nodes})


def sends(actions: list[Action], op: str | None = None) -> list[SendCommand]:
    return [a for a in actions if isinstance(a, SendCommand) and (op is None or a.command.op == op)]


def statuses(actions: list[Action]) -> list[m.ServiceStatus | None]:
    return [a.status for a in actions if isinstance(a, PublishStatus)]


def last_status(actions: list[Action]) -> m.ServiceStatus:
    [status] = statuses(actions)
    assert status is not None
    return status


def replicas(status: m.ServiceStatus) -> dict[str, tuple[str, str | None]]:
    return {r.node: (r.state, r.reason) for r in status.replicas}


def reply(cmd: SendCommand, ok: bool = True, code: str = "load_failed") -> m.CommandReply:
    error = None if ok else m.ErrorInfo(code=code, message="the runtime refused it")
    return m.CommandReply(node=cmd.node, id=cmd.command.id, ok=ok, error=error)


def started(reg: Registry, s: m.ServiceSpec | None = None) -> tuple[Provisioner, list[Action]]:
    """A provisioner past its grace period, given `s`, after its first deciding step."""
    p = Provisioner(grace=1.0)
    if s is not None:
        p.on_spec(NAME, s)
    assert p.step(reg, 0.0) == []
    return p, p.step(reg, 1.0)


def deployed(reg: Registry, s: m.ServiceSpec) -> tuple[Provisioner, list[SendCommand]]:
    """A provisioner whose replicas all answered their deploy."""
    p, actions = started(reg, s)
    cmds = sends(actions, "deploy")
    for cmd in cmds:
        p.on_reply(reply(cmd), 1.5)
    assert last_status(p.step(reg, 2.0)).state == "ready"
    return p, cmds


# ---- placement and replies -----------------------------------------------------------


def test_nothing_happens_during_the_grace_period() -> None:
    reg = registry("n1", "n2", "n3")
    reg.nodes["n1"].heartbeat = beat("n1", 1, ("stray",))
    p = Provisioner(grace=1.0)
    p.on_spec(NAME, spec())
    assert p.step(reg, 10.0) == []
    assert p.step(reg, 10.5) == []
    assert p.step(reg, 10.99) == []
    assert sends(p.step(reg, 11.0), "deploy")


def test_replicas_are_deployed_then_ready() -> None:
    reg = registry("n1", "n2", "n3")
    p, actions = started(reg, spec())
    cmds = sends(actions)
    assert [(c.node, c.command.op) for c in cmds] == [("n1", "deploy"), ("n2", "deploy")]
    assert cmds[0].command.args["spec"] == spec().model_dump(mode="json", exclude_none=True)
    assert cmds[0].command.id != cmds[1].command.id
    status = last_status(actions)
    assert (status.name, status.state, status.want) == (NAME, "deploying", 2)
    assert (status.artifact, status.revision) == (SHA, "r1")
    assert replicas(status) == {"n1": ("deploying", None), "n2": ("deploying", None)}

    p.on_reply(reply(cmds[0]), 1.2)
    status = last_status(p.step(reg, 1.4))
    assert status.state == "degraded"
    assert status.reason == "1 of 2 replicas ready"
    p.on_reply(reply(cmds[1]), 1.5)
    status = last_status(p.step(reg, 1.6))
    assert (status.state, status.reason) == ("ready", None)
    assert status.ready_nodes() == ["n1", "n2"]
    # Nothing changed: nothing is sent or published again.
    assert p.step(reg, 1.8) == []


def test_an_error_reply_fails_the_node_and_places_the_replica_elsewhere() -> None:
    reg = registry("n1", "n2", "n3")
    p, actions = started(reg, spec())
    cmd1, cmd2 = sends(actions, "deploy")
    p.on_reply(reply(cmd1), 1.1)
    p.on_reply(reply(cmd2, ok=False), 1.1)
    actions = p.step(reg, 1.2)
    assert [(c.node, c.command.op) for c in sends(actions)] == [("n3", "deploy")]
    status = last_status(actions)
    assert status.state == "degraded"
    assert replicas(status) == {
        "n1": ("ready", None),
        "n2": ("failed", "load_failed: the runtime refused it"),
        "n3": ("deploying", None),
    }
    [cmd3] = sends(actions)
    p.on_reply(reply(cmd3), 1.3)
    status = last_status(p.step(reg, 1.4))
    assert status.state == "ready"
    assert status.ready_nodes() == ["n1", "n3"]
    assert replicas(status)["n2"][0] == "failed"


def test_a_reply_to_an_unknown_command_changes_nothing() -> None:
    reg = registry("n1", "n2")
    p, _ = started(reg, spec())
    p.on_reply(m.CommandReply(node="n1", id="not-a-command-we-sent", ok=False), 1.1)
    p.on_reply(m.CommandReply(node="n1", id=None, ok=False), 1.1)
    assert p.step(reg, 1.2) == []


def test_a_lost_node_loses_its_replica_and_it_is_placed_again() -> None:
    reg = registry("n1", "n2", "n3")
    p, _ = deployed(reg, spec())
    reg.nodes["n2"].state = "lost"
    actions = p.step(reg, 3.0)
    assert [(c.node, c.command.op) for c in sends(actions)] == [("n3", "deploy")]
    status = last_status(actions)
    assert status.state == "degraded"
    assert replicas(status) == {"n1": ("ready", None), "n3": ("deploying", None)}
    [cmd] = sends(actions)
    p.on_reply(reply(cmd), 3.5)
    status = last_status(p.step(reg, 4.0))
    assert status.state == "ready"
    assert status.ready_nodes() == ["n1", "n3"]


def test_a_deploy_without_answer_is_sent_again_then_given_up() -> None:
    assert DEPLOY_ATTEMPTS == 2
    reg = registry("n1")
    p, actions = started(reg, spec(replicas=1))
    [first] = sends(actions)
    assert p.step(reg, 1.0 + DEPLOY_TIMEOUT) == []  # not yet over the limit
    again = sends(p.step(reg, 1.0 + DEPLOY_TIMEOUT + 0.5))
    assert [(c.node, c.command.op) for c in again] == [("n1", "deploy")]
    assert again[0].command.id != first.command.id
    assert p.step(reg, 1.5 + 2 * DEPLOY_TIMEOUT) == []
    actions = p.step(reg, 2.0 + 2 * DEPLOY_TIMEOUT)
    assert sends(actions) == []
    status = last_status(actions)
    assert status.state == "failed"
    reason = f"failed: no answer to deploy within {DEPLOY_TIMEOUT:.0f} s"
    assert replicas(status) == {"n1": ("failed", reason[len("failed: ") :])}
    assert status.reason == f"no node can take 1 more replica(s): n1: {reason}"
    # The late answer to the first deploy is not taken for the last one.
    gave_up = 2.0 + 2 * DEPLOY_TIMEOUT
    p.on_reply(reply(first), gave_up + 1)
    assert p.step(reg, gave_up + 2) == []
    # No answer can pass (a node slow to fetch): the node is tried again later.
    [retry] = sends(p.step(reg, gave_up + RETRY_FAILED_S), "deploy")
    assert retry.command.id not in (first.command.id, again[0].command.id)


# ---- removal ----------------------------------------------------------------------------


def test_a_cleared_spec_undeploys_then_clears_the_status() -> None:
    reg = registry("n1", "n2", "n3")
    p, _ = deployed(reg, spec())
    p.on_spec(NAME, None)
    actions = p.step(reg, 3.0)
    undeploys = sends(actions)
    assert sorted((c.node, c.command.op) for c in undeploys) == [
        ("n1", "undeploy"),
        ("n2", "undeploy"),
    ]
    assert all(c.command.args == {"service": NAME} for c in undeploys)
    status = last_status(actions)
    assert (status.name, status.state, status.replicas) == (NAME, "removed", [])
    p.on_reply(reply(undeploys[0]), 3.1)
    assert p.step(reg, 3.2) == []  # one undeploy still in flight
    p.on_reply(reply(undeploys[1]), 3.3)
    assert p.step(reg, 3.4) == [PublishStatus(NAME, None)]
    assert NAME not in p.services
    assert p.step(reg, 3.6) == []


def test_a_cleared_spec_does_not_wait_for_a_node_that_is_gone() -> None:
    reg = registry("n1", "n2")
    p, _ = deployed(reg, spec())
    reg.nodes["n2"].state = "offline"
    p.on_spec(NAME, None)
    actions = p.step(reg, 3.0)
    assert [(c.node, c.command.op) for c in sends(actions)] == [("n1", "undeploy")]
    assert [s.state if s else None for s in statuses(actions)] == ["removed"]
    # No answer at all: given up after the undeploy timeout.
    assert p.step(reg, 10.0) == []
    assert p.step(reg, 30.0) == [PublishStatus(NAME, None)]


# ---- reconciliation and restart -------------------------------------------------------


def test_a_stray_service_is_undeployed_at_most_once_per_interval() -> None:
    """[T-COORD-5] a node whose current-session heartbeat lists a service it was not given
    is told to stop it, at most once every RECONCILE_EVERY per node, service and session."""
    reg = registry("n1", "n2")
    reg.nodes["n1"].heartbeat = beat("n1", 1, ("stray",))
    reg.nodes["n2"].heartbeat = beat("n2", 0, ("old-session",))  # an older session's beat
    p, actions = started(reg)
    assert statuses(actions) == []
    assert [(c.node, c.command.op, c.command.args) for c in sends(actions)] == [
        ("n1", "undeploy", {"service": "stray"})
    ]
    assert p.step(reg, 1.0 + RECONCILE_EVERY / 2) == []
    assert p.step(reg, 0.9 + RECONCILE_EVERY) == []
    again = sends(p.step(reg, 1.1 + RECONCILE_EVERY))
    assert [(c.node, c.command.args["service"]) for c in again] == [("n1", "stray")]
    # A new session of the node is a new case: told at once.
    reg.nodes["n1"] = online("n1", session=2, services=("stray",))
    renewed = sends(p.step(reg, 1.2 + RECONCILE_EVERY))
    assert [(c.node, c.command.args["service"]) for c in renewed] == [("n1", "stray")]


def test_a_node_running_a_service_placed_elsewhere_is_told_to_stop() -> None:
    """[T-COORD-5]"""
    reg = registry("n1", "n2", "n3")
    p, _ = deployed(reg, spec())
    reg.nodes["n1"].heartbeat = beat("n1", 1, (NAME,))  # placed there: fine
    reg.nodes["n3"].heartbeat = beat("n3", 1, (NAME,))  # not placed there
    actions = p.step(reg, 3.0)
    assert [(a.node, a.command.op) for a in sends(actions)] == [("n3", "undeploy")]


def test_a_replica_its_node_no_longer_runs_is_deployed_again() -> None:
    """[T-COORD-5] a heartbeat sent after the replica became ready that does not list the
    service: the node restarted without it."""
    reg = registry("n1", "n2", "n3")
    p, _ = deployed(reg, spec())
    later = beat("n1", 1).model_copy(update={"ts": time.time() + 60, "seq": 5})
    reg.nodes["n1"].heartbeat = later
    actions = p.step(reg, 3.0)
    assert [(c.node, c.command.op) for c in sends(actions)] == [("n1", "deploy")]
    assert replicas(last_status(actions))["n1"] == ("deploying", None)


def test_a_retained_status_is_adopted_without_deploying() -> None:
    """[T-COORD-4] a restarted coordinator adopts the ready replicas a previous one
    published for the same artifact, on nodes that are online."""
    reg = registry("n1", "n2", "n3")
    for n in ("n1", "n2"):
        reg.nodes[n].heartbeat = beat(n, 1, (NAME,))
    before = m.ServiceStatus(
        name=NAME,
        state="ready",
        replicas=[
            m.ReplicaStatus(node="n1", state="ready"),
            m.ReplicaStatus(node="n2", state="ready"),
        ],
        want=2,
        artifact=SHA,
        revision="r1",
        ts=123.0,
    )
    p = Provisioner(grace=1.0)
    p.on_status(NAME, before)
    p.on_spec(NAME, spec())
    assert p.step(reg, 0.0) == []
    actions = p.step(reg, 1.0)
    assert sends(actions) == []
    status = last_status(actions)
    assert status.model_dump(exclude={"ts"}) == before.model_dump(exclude={"ts"})
    assert p.step(reg, 2.0) == []


def test_a_retained_status_for_another_artifact_is_not_adopted() -> None:
    """[T-COORD-4]"""
    reg = registry("n1", "n2")
    before = m.ServiceStatus(
        name=NAME,
        state="ready",
        replicas=[m.ReplicaStatus(node="n1", state="ready")],
        want=1,
        artifact=OTHER_SHA,
    )
    p = Provisioner(grace=1.0)
    p.on_status(NAME, before)
    p.on_spec(NAME, spec(replicas=1))
    p.step(reg, 0.0)
    actions = p.step(reg, 1.0)
    assert [(c.node, c.command.op) for c in sends(actions)] == [("n1", "deploy")]
    assert last_status(actions).state == "deploying"


def test_a_retained_status_without_a_spec_is_cleared() -> None:
    reg = registry("n1")
    before = m.ServiceStatus(
        name=NAME, state="ready", replicas=[m.ReplicaStatus(node="n1", state="ready")], want=1
    )
    p = Provisioner(grace=1.0)
    p.on_status(NAME, before)
    p.step(reg, 0.0)
    published: list[Any] = []
    for t in (1.0, 2.0, 30.0):
        published += statuses(p.step(reg, t))
    assert published and published[-1] is None


# ---- spec changes and failures -----------------------------------------------------------


def test_a_change_that_needs_no_reload_keeps_replicas_ready() -> None:
    reg = registry("n1", "n2", "n3")
    p, _ = deployed(reg, spec())
    p.on_spec(NAME, spec(deadline_ms=2000, revision="r2"))
    actions = p.step(reg, 3.0)
    cmds = sends(actions)
    assert sorted((c.node, c.command.op) for c in cmds) == [("n1", "deploy"), ("n2", "deploy")]
    assert all(c.command.args["spec"]["deadline_ms"] == 2000 for c in cmds)
    status = last_status(actions)
    assert (status.state, status.revision) == ("ready", "r2")
    assert status.ready_nodes() == ["n1", "n2"]


def test_an_artifact_change_redeploys() -> None:
    reg = registry("n1", "n2", "n3")
    p, _ = deployed(reg, spec())
    p.on_spec(NAME, spec(artifact=OTHER_SHA, revision="r2"))
    actions = p.step(reg, 3.0)
    cmds = sends(actions)
    assert sorted((c.node, c.command.op) for c in cmds) == [("n1", "deploy"), ("n2", "deploy")]
    status = last_status(actions)
    assert (status.state, status.artifact) == ("deploying", OTHER_SHA)
    assert replicas(status) == {"n1": ("deploying", None), "n2": ("deploying", None)}
    for cmd in cmds:
        p.on_reply(reply(cmd), 3.5)
    assert last_status(p.step(reg, 4.0)).state == "ready"


def test_fewer_replicas_undeploys_the_surplus() -> None:
    reg = registry("n1", "n2", "n3")
    p, _ = deployed(reg, spec())
    p.on_spec(NAME, spec(replicas=1))
    actions = p.step(reg, 3.0)
    # Replicas not yet ready go first; among ready ones, the lower node id.
    assert [c.node for c in sends(actions, "undeploy")] == ["n1"]
    status = last_status(actions)
    assert (status.state, status.ready_nodes()) == ("ready", ["n2"])


def test_fewer_replicas_undeploys_a_replica_not_yet_ready_first() -> None:
    reg = registry("n1", "n2", "n3")
    p, actions = started(reg, spec())
    cmd1, _ = sends(actions, "deploy")
    p.on_reply(reply(cmd1), 1.1)  # n1 ready, n2 still deploying
    p.on_spec(NAME, spec(replicas=1))
    actions = p.step(reg, 1.2)
    assert [c.node for c in sends(actions, "undeploy")] == ["n2"]
    status = last_status(actions)
    assert (status.state, status.ready_nodes(), status.want) == ("ready", ["n1"], 1)


def test_no_node_runs_the_format_fails_with_each_nodes_reason() -> None:
    reg = registry("n1", "n2")
    reg.nodes["n3"] = online("n3")
    reg.nodes["n3"].state = "offline"
    _, actions = started(reg, spec(format="onnx"))
    assert sends(actions) == []
    status = last_status(actions)
    assert status.state == "failed"
    assert status.replicas == []
    assert status.reason == (
        "no node can take 2 more replica(s): n1: cannot run onnx (runs tflite); "
        "n2: cannot run onnx (runs tflite); n3: offline"
    )


# ---- pipelines --------------------------------------------------------------------------


def pipeline_spec(stages: int = 2, **kw: object) -> m.ServiceSpec:
    from mqinfer.protocol.manifest import Manifest, Pipeline, Segment, TensorInfo, Verification

    tensor = TensorInfo(name="x", dtype="int8", shape=[1, 4])
    segments = [
        Segment(
            manifest=Manifest(
                name=f"digits.seg{k}",
                format="tflite",
                file=f"digits.seg{k}.tflite",
                sha256=f"{k:02x}" * 32,
                size=10_000 * (k + 1),
                inputs=[tensor],
                outputs=[tensor],
            ),
            ops=(k, k + 1),
        )
        for k in range(stages)
    ]
    pipeline = Pipeline(
        name="digits",
        model="digits_int8.tflite",
        sha256=SHA,
        format="tflite",
        segments=segments,
        verification=Verification(inputs=8, exact=True, max_abs_diff=0.0, tolerance=0.0),
    )
    return spec(replicas=1, pipeline=pipeline, **kw)


def test_a_pipeline_places_each_stage_on_its_own_node_with_its_segment() -> None:
    reg = registry("n1", "n2", "n3")
    s = pipeline_spec(3)
    p, actions = started(reg, s)
    cmds = sends(actions, "deploy")
    assert sorted(c.command.args["stage"] for c in cmds) == [0, 1, 2]
    assert len({c.node for c in cmds}) == 3  # stages run in parallel on different nodes
    status = last_status(actions)
    assert (status.name, status.state, status.stages, status.want) == (NAME, "deploying", 3, 1)
    assert {(r.stage, r.state) for r in status.replicas} == {
        (0, "deploying"),
        (1, "deploying"),
        (2, "deploying"),
    }
    for cmd in cmds[:2]:
        p.on_reply(reply(cmd), 1.2)
    assert last_status(p.step(reg, 1.3)).state == "deploying"  # stage 2 cannot serve yet
    p.on_reply(reply(cmds[2]), 1.4)
    status = last_status(p.step(reg, 1.5))
    assert status.state == "ready"
    by_stage = {c.command.args["stage"]: c.node for c in cmds}
    assert status.ready_nodes(0) == [by_stage[0]]
    assert status.head_ready() == [by_stage[0]]
    assert status.ready_nodes() == []  # no replica runs the whole model


def test_stages_share_a_node_only_when_there_is_no_other() -> None:
    reg = registry("n1")
    _, actions = started(reg, pipeline_spec(2))
    assert sorted((c.node, c.command.args["stage"]) for c in sends(actions, "deploy")) == [
        ("n1", 0),
        ("n1", 1),
    ]


def test_a_lost_stage_node_is_replaced_and_the_pipeline_waits_for_it() -> None:
    reg = registry("n1", "n2", "n3")
    p, actions = started(reg, pipeline_spec(2))
    cmds = sends(actions, "deploy")
    for cmd in cmds:
        p.on_reply(reply(cmd), 1.2)
    assert last_status(p.step(reg, 1.3)).state == "ready"
    stage1 = next(c.node for c in cmds if c.command.args["stage"] == 1)
    reg.nodes[stage1].state = "lost"
    actions = p.step(reg, 2.0)
    [again] = sends(actions, "deploy")
    assert again.command.args["stage"] == 1
    assert again.node not in {c.node for c in cmds}
    status = last_status(actions)
    assert status.state == "deploying"
    assert status.ready_nodes(1) == []
    p.on_reply(reply(again), 2.5)
    assert last_status(p.step(reg, 3.0)).ready_nodes(1) == [again.node]


def test_undeploying_a_pipeline_stops_every_stage_then_clears_the_status() -> None:
    reg = registry("n1", "n2")
    p, actions = started(reg, pipeline_spec(2))
    cmds = sends(actions, "deploy")
    for cmd in cmds:
        p.on_reply(reply(cmd), 1.2)
    p.step(reg, 1.3)
    p.on_spec(NAME, None)
    actions = p.step(reg, 2.0)
    undeploys = sends(actions, "undeploy")
    assert sorted((c.node, c.command.args["stage"]) for c in undeploys) == sorted(
        (c.node, c.command.args["stage"]) for c in cmds
    )
    assert last_status(actions).state == "removed"
    for cmd in undeploys:
        p.on_reply(reply(cmd), 2.1)
    assert statuses(p.step(reg, 2.2)) == [None]
    assert p.services == {}


def test_a_whole_model_redeployed_as_a_pipeline_swaps_the_replicas() -> None:
    reg = registry("n1", "n2")
    p, _ = deployed(reg, spec())
    p.on_spec(NAME, pipeline_spec(2, revision="r2"))
    actions = p.step(reg, 3.0)
    assert sorted((c.node, c.command.args) for c in sends(actions, "undeploy")) == [
        ("n1", {"service": NAME}),
        ("n2", {"service": NAME}),
    ]
    deploys = sends(actions, "deploy")
    assert sorted(c.command.args["stage"] for c in deploys) == [0, 1]
    assert last_status(actions).stages == 2


def test_a_stray_stage_on_a_node_is_undeployed_by_its_slot() -> None:
    reg = registry("n1")
    reg.nodes["n1"].heartbeat = beat("n1", 1, ("old:1",))
    _, actions = started(reg)
    [cmd] = sends(actions, "undeploy")
    assert cmd.command.args == {"service": "old", "stage": 1}


def test_a_restarted_coordinator_adopts_a_pipeline_without_redeploying() -> None:
    reg = registry("n1", "n2")
    s = pipeline_spec(2)
    p, actions = started(reg, s)
    for cmd in sends(actions, "deploy"):
        p.on_reply(reply(cmd), 1.2)
    published = last_status(p.step(reg, 1.3))
    for node, stage in (("n1", 0), ("n2", 1)):
        reg.nodes[node].heartbeat = beat(node, 1, (f"{NAME}:{stage}",))

    fresh = Provisioner(grace=1.0)
    fresh.on_spec(NAME, s)
    fresh.on_status(NAME, published)
    assert fresh.step(reg, 10.0) == []
    actions = fresh.step(reg, 11.0)
    assert sends(actions) == []  # adopted: no deploy, and the strays check passes
    again = last_status(actions)
    assert again.model_dump(exclude={"ts"}) == published.model_dump(exclude={"ts"})


# ---- measured costs ----------------------------------------------------------------------


def measured(reg: Registry, node: str, slot: str, inference_ms: float, workers: int = 1) -> None:
    rec = reg.nodes[node]
    assert rec.heartbeat is not None
    stats = {slot: m.ReplicaStats(served=10, inference_ms=inference_ms, workers=workers)}
    rec.heartbeat = rec.heartbeat.model_copy(update={"stats": stats})


def test_fewer_replicas_drop_the_slowest_and_more_avoid_nodes_that_ran_it_slowly() -> None:
    """Scaling down keeps the replica its node measured fastest; scaling up again prefers
    a node not measured yet over one that ran the model 10x slower."""
    reg = registry("n1", "n2", "n3")
    p, _ = deployed(reg, spec())  # n1, n2
    measured(reg, "n1", NAME, 20.0)
    measured(reg, "n2", NAME, 2.0)
    p.step(reg, 3.0)
    p.on_spec(NAME, spec(replicas=1, revision="r2"))
    [gone] = sends(p.step(reg, 4.0), "undeploy")
    assert gone.node == "n1"
    p.on_spec(NAME, spec(replicas=2, revision="r3"))
    deploys = [c.node for c in sends(p.step(reg, 5.0), "deploy") if c.node != "n2"]
    assert deploys == ["n3"]


def test_a_spec_that_now_asks_for_a_label_moves_replicas_off_nodes_without_it() -> None:
    """[T-COORD-6] re-deploying with new constraints re-checks the replicas already placed:
    those on nodes that no longer qualify are undeployed and placed on nodes that do."""
    reg = registry("n1", "n2", "n3")
    assert reg.nodes["n3"].caps is not None
    reg.nodes["n3"].caps.labels["zone"] = "lab"
    p, cmds = deployed(reg, spec())
    assert sorted(c.node for c in cmds) == ["n1", "n2"]
    p.on_spec(NAME, spec(constraints={"labels": {"zone": "lab"}}, revision="r2"))
    actions = p.step(reg, 3.0)
    assert sorted(c.node for c in sends(actions, "undeploy")) == ["n1", "n2"]
    assert [c.node for c in sends(actions, "deploy")] == ["n3"]
    [deploy] = sends(actions, "deploy")
    assert last_status(actions).state == "deploying"
    p.on_reply(reply(deploy), 3.5)
    status = last_status(p.step(reg, 3.6))
    assert (status.state, status.ready_nodes(), status.want) == ("degraded", ["n3"], 2)
    assert "label zone=lab not set" in (status.reason or "")
    # An accelerator asked for that the replica's node lacks: the same.
    p.on_spec(NAME, spec(constraints={"accelerator": "edgetpu"}, revision="r3"))
    actions = p.step(reg, 4.0)
    assert [c.node for c in sends(actions, "undeploy")] == ["n3"]
    assert sends(actions, "deploy") == []
    assert last_status(actions).state == "failed"


def test_a_deploy_that_failed_for_a_passing_reason_is_tried_again_later() -> None:
    """A node that could not find the model's meta yet (on a cluster it can arrive late)
    gets the deploy again after RETRY_FAILED_S, then after twice that; one whose runtime
    refused the model does not."""
    reg = registry("n1", "n2")
    p, actions = started(reg, spec())
    cmd1, cmd2 = sends(actions, "deploy")
    p.on_reply(reply(cmd1), 1.1)
    p.on_reply(reply(cmd2, ok=False, code="artifact_missing"), 1.1)
    status = last_status(p.step(reg, 1.2))
    assert status.state == "degraded" and replicas(status)["n2"][0] == "failed"
    assert sends(p.step(reg, 1.1 + RETRY_FAILED_S - 1)) == []
    [again] = sends(p.step(reg, 1.1 + RETRY_FAILED_S), "deploy")
    assert again.node == "n2"
    t = 1.1 + RETRY_FAILED_S + 1
    p.on_reply(reply(again, ok=False, code="artifact_missing"), t)
    assert sends(p.step(reg, t + RETRY_FAILED_S)) == []  # later this time
    [third] = sends(p.step(reg, t + 2 * RETRY_FAILED_S), "deploy")
    p.on_reply(reply(third), t + 2 * RETRY_FAILED_S + 1)
    assert last_status(p.step(reg, t + 2 * RETRY_FAILED_S + 2)).state == "ready"

    q, actions = started(registry("n1", "n2"), spec())
    cmd1, cmd2 = sends(actions, "deploy")
    q.on_reply(reply(cmd1), 1.1)
    q.on_reply(reply(cmd2, ok=False, code="load_failed"), 1.1)
    assert sends(q.step(reg, 1.2)) == []
    assert sends(q.step(reg, 1.1 + RETRY_FAILED_MAX_S * 2)) == []
