"""Where a model may be cut: the tensors crossing each position, the positions refused and
why, and explicit cut positions checked against them."""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass

from mqinfer.split.errors import SplitError
from mqinfer.split.graph import _Graph

# `max_crossing` None (automatic): cuts where up to this many tensors cross are candidates,
# model inputs and outputs passed through included.
AUTO_MAX_CROSSING = 4


@dataclass(frozen=True)
class _Cuts:
    live: list[frozenset[int]]  # per position 0..n: the tensors crossing it
    order: list[list[int]]  # the same, in the order segments list them
    problems: dict[int, tuple[str, str]]  # invalid position -> (kind, why)
    pass_through: bool = False  # a segment may pass tensors on unused

    def valid(self, n: int) -> list[int]:
        return [c for c in range(1, n) if c not in self.problems]

    def single(self, n: int) -> list[int]:
        """The valid positions where one tensor crosses."""
        return [c for c in self.valid(n) if len(self.live[c]) == 1]

    def chainable(self, a: int, b: int) -> bool:
        """Whether [a, b) can be a segment: no tensor crosses both of its cuts, unless
        segments may pass tensors through."""
        return self.pass_through or not self.live[a] & self.live[b]


def _analyse(g: _Graph, max_crossing: int | None) -> _Cuts:
    """The tensors crossing each position, and why a position cannot be a cut. With more
    than one tensor allowed to cross (or None: up to AUTO_MAX_CROSSING), a model input still
    read later or a model output made early crosses like any other tensor: the segments in
    between pass it on unused."""
    pass_through = max_crossing is None or max_crossing > 1
    limit = AUTO_MAX_CROSSING if max_crossing is None else max_crossing
    start: dict[int, int] = {t: 0 for t in g.inputs}
    producer: dict[int, int] = {}
    for i in range(g.n):
        for t in g.reads[i]:
            if t not in start:
                why = (
                    "made by a later operator (the operators are not in execution order)"
                    if any(t in w for w in g.writes[i:])
                    else "made by no operator and not a model input (state or an unsupported "
                    "external tensor)"
                )
                raise SplitError(
                    f"operator {i} ({g.op_name(i)}) reads tensor '{g.names[t]}', which is {why}"
                )
        for t in g.writes[i]:
            start[t], producer[t] = i + 1, i
    end: dict[int, int] = {}
    for i, reads in enumerate(g.reads):
        for t in reads:
            end[t] = max(end.get(t, -1), i)
    model_outputs, model_inputs = set(g.outputs), set(g.inputs)
    for t in model_outputs:
        end[t] = g.n
    live: list[set[int]] = [set() for _ in range(g.n + 1)]
    for t, s in start.items():
        for c in range(s, end.get(t, -1) + 1):
            live[c].add(t)
    live[0], live[g.n] = set(g.inputs), set(g.outputs)

    name_count = collections.Counter(g.names[t] for t in start)
    problems: dict[int, tuple[str, str]] = {}
    for c in range(1, g.n):
        crossing = live[c]
        late = sorted(crossing & model_inputs, key=g.inputs.index)
        early = sorted(crossing & model_outputs, key=g.outputs.index)
        unsendable = [t for t in crossing if g.nbytes.get(t) is None]
        shared = [t for t in crossing if name_count[g.names[t]] > 1]
        if late and not pass_through:
            t = late[0]
            problems[c] = (
                "input",
                f"model input '{g.names[t]}' is still read by operator {end[t]}, so the "
                "segment before would have to pass it through unused",
            )
        elif early and not pass_through:
            t = early[0]
            problems[c] = (
                "output",
                f"model output '{g.names[t]}' is made by operator {producer.get(t, 0)}, so "
                "the segments after would have to pass it through unused",
            )
        elif not crossing:
            problems[c] = ("empty", "no tensor crosses it")
        elif len(crossing) > limit:
            problems[c] = (
                "crossing",
                f"{len(crossing)} tensors cross it ({g.describe(_ordered(crossing, start))})",
            )
        elif shared:
            problems[c] = (
                "name",
                f"another tensor is also called '{g.names[shared[0]]}', and segments match "
                "the tensors they pass on by name",
            )
        elif unsendable:
            problems[c] = (
                "type",
                f"tensor '{g.names[unsendable[0]]}' has a type that cannot be sent between "
                "segments",
            )
    order = [_ordered(s, start) for s in live]
    order[0], order[g.n] = list(g.inputs), list(g.outputs)
    return _Cuts([frozenset(s) for s in live], order, problems, pass_through)


def _ordered(keys: set[int], start: dict[int, int]) -> list[int]:
    """Crossing tensors in the order they were made."""
    return sorted(keys, key=lambda t: (start.get(t, 0), t))


def _refusal(g: _Graph, cuts: _Cuts, segments: int, max_crossing: int | None) -> str:
    valid = cuts.valid(g.n)
    head = (
        f"cannot cut {g.n} operators into {segments} segments: {len(valid)} of the "
        f"{max(g.n - 1, 0)} positions between operators are valid cuts"
        + (
            f" ({', '.join(str(c) for c in valid[:12])}{', ...' if len(valid) > 12 else ''})"
            if valid
            else ""
        )
        + f", {segments - 1} are needed."
    )
    kinds: dict[str, list[int]] = {}
    for c, (kind, _) in sorted(cuts.problems.items()):
        kinds.setdefault(kind, []).append(c)
    parts = []
    for kind, positions in kinds.items():
        if kind == "crossing":
            c = min(positions, key=lambda p: len(cuts.live[p]))
            fewest = len(cuts.live[c])
            limit = AUTO_MAX_CROSSING if max_crossing is None else max_crossing
            parts.append(
                f"{len(positions)} have more than {limit} tensor(s) crossing (the fewest,"
                f" {fewest}, at {c}: {g.describe(cuts.order[c])}); --max-crossing {fewest} "
                "would allow it"
            )
        else:
            c = positions[0]
            parts.append(
                f"{len(positions)} are refused because, e.g. at {c}, {cuts.problems[c][1]}"
            )
    return head + (" Of the others: " + "; ".join(parts) + "." if parts else "")


def _check_positions(model: str, g: _Graph, cuts: _Cuts, at: list[int]) -> None:
    """Explicit cut positions: increasing, inside the model, valid and chainable."""
    if at != sorted(set(at)) or not all(0 < c < g.n for c in at):
        raise SplitError(
            f"{model}: cut positions {at}: expected increasing positions between 1 and {g.n - 1}"
        )
    for c in at:
        if c in cuts.problems:
            raise SplitError(f"{model}: cannot cut at {c}: {cuts.problems[c][1]}")
    for a, b in itertools.pairwise(at):
        shared = cuts.live[a] & cuts.live[b]
        if shared and not cuts.pass_through:
            raise SplitError(
                f"{model}: cannot cut at both {a} and {b}: {g.describe(sorted(shared))} would "
                f"pass through segment [{a}, {b})"
            )


def _measured(g: _Graph, cuts: _Cuts, extra: int) -> _Cuts:
    """The cuts to measure: every valid cut where one tensor crosses, and at most `extra`
    of those where several do, spread evenly over the model (timing every prefix of a
    model of a thousand nodes would take long). The others become invalid."""
    several = [c for c in cuts.valid(g.n) if len(cuts.live[c]) > 1]
    if len(several) <= extra:
        return cuts
    step = len(several) / extra
    kept = {several[int((k + 0.5) * step)] for k in range(extra)}
    problems = dict(cuts.problems)
    for c in several:
        if c not in kept:
            problems[c] = ("unmeasured", "several tensors cross it, and it was not measured")
    return _Cuts(cuts.live, cuts.order, problems, cuts.pass_through)


def _without(cuts: _Cuts, unrunnable: dict[int, str]) -> _Cuts:
    """`cuts` less the positions where the runtime could not run the model cut there."""
    problems = dict(cuts.problems)
    for c, why in unrunnable.items():
        problems[c] = ("runtime", f"the runtime cannot run the model cut there ({why})")
    return _Cuts(cuts.live, cuts.order, problems, cuts.pass_through)
