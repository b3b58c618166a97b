"""Deploy and undeploy commands, carried out on one thread the node owns.

A command is read and checked on the network thread (a bad one is answered at once); then
it waits its turn in a bounded queue (`busy` when full). Loading models and stopping
replicas happen one at a time on the provisioning thread; fetching a model's artifact
happens side by side in the Fetcher, so a deploy whose model is missing from the broker
fails on its own after a short wait and never holds up another. A newer command for the
same slot supersedes an older one that has not finished (`superseded`), so a re-sent or
replaced deploy does not load a model twice. A node given trusted keys checks a deploy's
signature first, and refuses one not signed by a key it trusts (`untrusted`) before it
fetches or changes anything.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from mqinfer.mqtt import MQTTError, NotConnected
from mqinfer.node.replica import Replica
from mqinfer.protocol import messages as m
from mqinfer.protocol import signing
from mqinfer.protocol.errors import Code, ProtocolError
from mqinfer.protocol.topics import TopicError, check_id

if TYPE_CHECKING:
    from mqinfer.node.agent import NodeAgent

log = logging.getLogger("mqinfer.node")

MAX_PENDING = 64  # deploy/undeploy commands queued or in progress at once

Reply = Callable[[m.Command, "dict[str, Any] | ProtocolError"], None]


class Provisioning:
    def __init__(self, agent: NodeAgent, reply: Reply, max_pending: int = MAX_PENDING) -> None:
        self.agent = agent
        self.reply = reply
        self.max_pending = max_pending
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="provision")
        self._lock = threading.Lock()
        self._pending = 0
        self._generation: dict[str, int] = {}  # slot -> number of the newest command for it
        self.trusted: signing.TrustedKeys = {}  # key id -> public key; empty: run any spec

    def trust(self, keys: signing.TrustedKeys) -> None:
        """Run only specs signed by one of these keys from now on (empty: any spec)."""
        self.trusted = dict(keys)

    # ---- the network thread -------------------------------------------------------------

    def submit(self, cmd: m.Command) -> None:
        """Queue a deploy or undeploy; raise ProtocolError to have it answered at once."""
        if cmd.op == "deploy":
            spec = _spec(cmd)
            if self.trusted:
                signing.verify(spec, self.trusted)  # raises untrusted
            stage = _stage(cmd, spec)
            slots = [m.slot(spec.name, stage)]
            self.agent.store.path(spec.for_stage(stage).artifact, spec.format)  # checks ids
            work: Callable[[dict[str, int]], None] = lambda gens: self._deploy(  # noqa: E731
                cmd, spec, stage, gens
            )
        elif cmd.op == "undeploy":
            name, stage = _undeploy_args(cmd)
            slots = self._slots_of(name, stage)
            work = lambda gens: self._undeploy(cmd, name, stage, gens)  # noqa: E731
        else:  # pragma: no cover - the command handler sends only these two
            raise ProtocolError(Code.UNKNOWN_COMMAND, f"not a provisioning op: {cmd.op!r}")
        with self._lock:
            if self._pending >= self.max_pending:
                raise ProtocolError(
                    Code.BUSY,
                    f"this node has {self._pending} deploy/undeploy commands in progress "
                    f"(at most {self.max_pending}); retry later",
                )
            self._pending += 1
            gens = {s: self._generation.get(s, 0) + 1 for s in slots}
            self._generation.update(gens)
        self._executor.submit(self._guarded, cmd, work, gens)

    def _slots_of(self, name: str, stage: int | None) -> list[str]:
        if stage is not None:
            return [m.slot(name, stage)]
        running = [s for s, r in list(self.agent.replicas.items()) if r.name == name]
        with self._lock:
            queued = [s for s in self._generation if m.parse_slot(s)[0] == name]
        return sorted({*running, *queued})

    @property
    def pending(self) -> int:
        return self._pending

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    # ---- the provisioning thread --------------------------------------------------------

    def _guarded(
        self, cmd: m.Command, work: Callable[[dict[str, int]], None], gens: dict[str, int]
    ) -> None:
        """Run one step of a command; any failure is its reply ([T-CMD-2])."""
        try:
            work(gens)
        except Exception as e:
            self._done(cmd, _as_error(self.agent.name, cmd, e))

    def _done(self, cmd: m.Command, outcome: dict[str, Any] | ProtocolError) -> None:
        with self._lock:
            self._pending -= 1
        self.reply(cmd, outcome)

    def _superseded(self, gens: dict[str, int]) -> str | None:
        with self._lock:
            for slot, gen in gens.items():
                if self._generation.get(slot, 0) != gen:
                    return slot
        return None

    def _deploy(
        self, cmd: m.Command, spec: m.ServiceSpec, stage: int | None, gens: dict[str, int]
    ) -> None:
        agent = self.agent
        slot = m.slot(spec.name, stage)
        ours = spec.for_stage(stage)
        if (newer := self._superseded(gens)) is not None:
            raise ProtocolError(Code.SUPERSEDED, f"a newer command for {newer} replaced it")
        current = agent.replicas.get(slot)
        if current is not None and current.update(spec):
            self._done(
                cmd,
                {
                    "service": spec.name,
                    "stage": stage,
                    "state": "ready",
                    "already": True,
                    "runtime": current.runtime,
                },
            )
            return
        if spec.format not in agent.backends:
            raise ProtocolError(
                Code.UNSUPPORTED_FORMAT,
                f"{ours.model} is {spec.format!r}; this node runs {sorted(agent.backends)}",
            )
        fetched = agent.fetcher.fetch(ours.artifact, spec.format)

        def loaded(f: Future[Path]) -> None:
            self._executor.submit(
                self._guarded, cmd, lambda g: self._load(cmd, spec, stage, f, g), gens
            )

        fetched.add_done_callback(loaded)

    def _load(
        self,
        cmd: m.Command,
        spec: m.ServiceSpec,
        stage: int | None,
        fetched: Future[Path],
        gens: dict[str, int],
    ) -> None:
        agent = self.agent
        slot = m.slot(spec.name, stage)
        if (newer := self._superseded(gens)) is not None:
            raise ProtocolError(Code.SUPERSEDED, f"a newer command for {newer} replaced it")
        path = fetched.result()  # raises the fetch's ProtocolError
        if slot in agent.replicas:
            agent.remove(agent.connection(), slot)
        replica = Replica(
            node_id=agent.node_id,
            spec=spec,
            path=path,
            backend=agent.backends[spec.format],
            answer=agent.intake.answer,
            max_request_bytes=agent.max_request_bytes,
            stage=stage,
            max_workers=agent.max_workers,
            artificial_slowdown=agent.artificial_slowdown,
        )
        detail = replica.load()
        # [T-DEPLOY-1] ready (loaded and warmed up) before the reply: the hub gives it work
        # from then on.
        replica.start()
        agent.replicas[slot] = replica
        conn = agent.connection()
        if conn is None:
            raise NotConnected("the connection was lost while the model loaded")
        agent.announce(conn)  # the cache changed
        log.info(
            "%s: serving %s (%s) with %s",
            agent.name,
            slot,
            spec.for_stage(stage).model,
            replica.runtime,
        )
        self._done(cmd, {"service": spec.name, "stage": stage, "state": "ready", **detail})

    def _undeploy(self, cmd: m.Command, name: str, stage: int | None, gens: dict[str, int]) -> None:
        agent = self.agent
        conn = agent.connection()
        slots = sorted(gens) if stage is None else [m.slot(name, stage)]
        removed = [s for s in slots if s in agent.replicas and agent.remove(conn, s)]
        self._done(
            cmd, {"service": name, "stage": stage, "removed": bool(removed), "slots": removed}
        )


def _as_error(who: str, cmd: m.Command, e: Exception) -> ProtocolError:
    if isinstance(e, ProtocolError):
        return e
    if isinstance(e, MQTTError):
        return ProtocolError(Code.INTERNAL, f"broker: {e}")
    log.error("%s: %s failed", who, cmd.op, exc_info=e)
    return ProtocolError(Code.INTERNAL, f"{type(e).__name__}: {e}")


def _undeploy_args(cmd: m.Command) -> tuple[str, int | None]:
    name = cmd.args.get("service")
    if not isinstance(name, str):
        raise ProtocolError(Code.BAD_MESSAGE, "undeploy needs args.service (a service name)")
    try:
        check_id(name, "service name")
    except TopicError as e:
        raise ProtocolError(Code.BAD_MESSAGE, f"undeploy args.service: {e}") from None
    stage = cmd.args.get("stage")
    if stage is not None and (
        not isinstance(stage, int) or isinstance(stage, bool) or not 0 <= stage <= 99
    ):
        raise ProtocolError(
            Code.BAD_MESSAGE, f"undeploy args.stage must be a stage 0-99, not {stage!r}"
        )
    return name, stage


def _stage(cmd: m.Command, spec: m.ServiceSpec) -> int | None:
    stage = cmd.args.get("stage")
    if stage is None and not spec.stages:
        return None
    if not isinstance(stage, int) or isinstance(stage, bool) or not 0 <= stage < spec.stages:
        want = f"0-{spec.stages - 1}" if spec.stages else "none (not a pipeline)"
        raise ProtocolError(
            Code.BAD_MESSAGE, f"deploy args.stage is {stage!r}; {spec.name} takes {want}"
        )
    return stage


def _spec(cmd: m.Command) -> m.ServiceSpec:
    try:
        return m.ServiceSpec.model_validate(cmd.args.get("spec"))
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "spec"
        said = first["msg"].removeprefix("Value error, ")
        raise ProtocolError(Code.BAD_MESSAGE, f"deploy args.spec.{where}: {said}") from None
