"""Choosing the cuts by cost: a segment's measured run time plus the transfer of what it
sends on, balanced over the segments under the optional cap on each segment's file size."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

from mqinfer.split.cuts import _Cuts
from mqinfer.split.errors import SplitError
from mqinfer.split.graph import _Graph

# Transfer cost of the message a segment sends (the tensors crossing its end cut; for the
# last segment, the model outputs), charged to the sending segment: a stage is busy until
# its result is handed over. From the Mosquitto QoS 1 round trips measured with paho on
# loopback (request -> echo -> reply, so the payload travels twice): 0.606 ms at 100 B and
# 2.04 ms at 150 KB, i.e. (2.04 - 0.606) / (2 * 150 * 1024) ms per byte one way, plus half
# the small-message round trip per message.
TRANSFER_MS_PER_BYTE = (2.04 - 0.606) / (2 * 150 * 1024)  # ~4.7 ns per byte
TRANSFER_MS_PER_MESSAGE = 0.606 / 2

# Plans whose slowest segment is within this fraction of the best plan's count as equally
# balanced (timing noise is larger); of those, the one with the least total cost (run time
# plus transfers end to end) is chosen, rather than, say, a segment that only converts the
# input and sends it on.
BALANCE_SLACK = 0.05

MB = 1_000_000  # --max-segment-mb counts decimal megabytes, as file sizes are quoted


class _Costs:
    """Segment costs and sizes for positions of the model."""

    def __init__(self, g: _Graph, cuts: _Cuts) -> None:
        self.g, self.cuts = g, cuts
        self.latency: dict[int, float] = {}  # L(position), filled in by measuring
        users: dict[int, list[int]] = {}
        self.weight_bytes: dict[int, int] = {}
        for i, weights in enumerate(g.weights):
            for key, nbytes in weights:
                users.setdefault(key, []).append(i)
                self.weight_bytes[key] = nbytes
        self.users = users
        self._weights: dict[tuple[int, int], int] = {}
        total = sum(self.weight_bytes.values())
        self.overhead_per_op = max(g.size - total, 0) / max(g.n, 1)

    def transfer_ms(self, position: int) -> float:
        nbytes = sum(self.g.nbytes.get(t) or 0 for t in self.cuts.live[position])
        return TRANSFER_MS_PER_MESSAGE + TRANSFER_MS_PER_BYTE * nbytes

    def cost(self, a: int, b: int) -> float:
        run = max(self.latency[b] - self.latency[a], 0.0)
        return run + self.transfer_ms(b)

    def weights(self, a: int, b: int) -> int:
        """Bytes of the constants operators [a, b) use (shared ones counted once)."""
        if (a, b) not in self._weights:
            self._weights[a, b] = sum(
                self.weight_bytes[key]
                for key, ops in self.users.items()
                if any(a <= i < b for i in ops)
            )
        return self._weights[a, b]

    def size_estimate(self, a: int, b: int) -> float:
        return self.weights(a, b) + self.overhead_per_op * (b - a)


def _plan(
    positions: list[int],
    segments: int,
    score: Callable[[int, int], float],
    allowed: Callable[[int, int], bool],
    *,
    total_first: bool = False,
) -> list[int] | None:
    """Positions [0, c1, ..., n] (from `positions`, which starts at 0 and ends at n) that
    minimise the largest score(a, b) of a segment, then the total (with `total_first`, the
    total, then the largest); None if no plan is allowed."""
    last = len(positions) - 1
    # best[j]: (largest, total, previous index) over plans covering [0, positions[j])
    best: list[dict[int, tuple[float, float, int]]] = [{0: (0.0, 0.0, -1)}]
    for k in range(1, segments + 1):
        layer: dict[int, tuple[float, float, int]] = {}
        targets = [last] if k == segments else range(k, last - (segments - k) + 1)
        for j in targets:
            for i, (largest, total, _) in best[k - 1].items():
                if i >= j or not allowed(positions[i], positions[j]):
                    continue
                s = score(positions[i], positions[j])
                candidate = (max(largest, s), total + s, i)
                if j not in layer or _key(candidate, total_first) < _key(layer[j], total_first):
                    layer[j] = candidate
        best.append(layer)
    if last not in best[segments]:
        return None
    chosen, j = [], last
    for k in range(segments, 0, -1):
        chosen.append(positions[j])
        j = best[k][j][2]
    return [0, *reversed(chosen)]


def _key(entry: tuple[float, float, int], total_first: bool) -> tuple[float, float]:
    return (entry[1], entry[0]) if total_first else (entry[0], entry[1])


@dataclass(frozen=True)
class _Built:
    start: int
    end: int
    data: bytes
    weights: int


def _check_fits(
    model: str, g: _Graph, cuts: _Cuts, costs: _Costs, segments: int, cap: float
) -> None:
    """Refuse before measuring anything when no plan keeps the estimated sizes under the cap."""
    positions = [0, *cuts.valid(g.n), g.n]

    def fits(a: int, b: int) -> bool:  # with a margin: the estimate is good to a few %
        return cuts.chainable(a, b) and costs.size_estimate(a, b) <= cap * 1.05

    if _plan(positions, segments, costs.size_estimate, fits) is None:
        raise SplitError(f"{model}: {_no_plan(g, costs, positions, segments, cap)}")


def _build_plan(g: _Graph, cuts: _Cuts, plan: list[int], costs: _Costs) -> list[_Built]:
    return [
        _Built(a, b, g.build(a, b, cuts.order[a], cuts.order[b]), costs.weights(a, b))
        for a, b in itertools.pairwise(plan)
    ]


def _choose(
    model: str, g: _Graph, cuts: _Cuts, costs: _Costs, segments: int, cap: float | None
) -> tuple[list[int], list[_Built]]:
    """The cheapest plan whose segment files fit under the cap, and its segments."""
    positions = [0, *cuts.valid(g.n), g.n]
    too_big: set[tuple[int, int]] = set()  # built and found over the cap

    def allowed(a: int, b: int) -> bool:
        if not cuts.chainable(a, b) or (a, b) in too_big:
            return False
        return cap is None or costs.size_estimate(a, b) <= cap

    while True:
        plan = _balanced_plan(positions, segments, costs, allowed)
        if plan is None:
            raise SplitError(f"{model}: {_no_plan(g, costs, positions, segments, cap)}")
        built = _build_plan(g, cuts, plan, costs)
        over = [(p.start, p.end) for p in built if cap is not None and len(p.data) > cap]
        if not over:
            return plan, built
        too_big.update(over)


def _balanced_plan(
    positions: list[int], segments: int, costs: _Costs, allowed: Callable[[int, int], bool]
) -> list[int] | None:
    """The plan with the least total cost among those whose slowest segment is within
    BALANCE_SLACK of the best possible."""
    best = _plan(positions, segments, costs.cost, allowed)
    if best is None:
        return None
    bound = max(costs.cost(a, b) for a, b in itertools.pairwise(best)) * (1 + BALANCE_SLACK)

    def balanced(a: int, b: int) -> bool:
        return allowed(a, b) and costs.cost(a, b) <= bound

    # cuts where one tensor crosses first, when they balance as well as any
    single = [c for c in positions[1:-1] if len(costs.cuts.live[c]) == 1]
    if len(single) < len(positions) - 2:
        plan = _plan([0, *single, positions[-1]], segments, costs.cost, balanced, total_first=True)
        if plan is not None:
            return plan
    return _plan(positions, segments, costs.cost, balanced, total_first=True) or best


def _no_plan(
    g: _Graph,
    costs: _Costs,
    positions: list[int],
    segments: int,
    cap: float | None,
) -> str:
    if cap is not None:
        heaviest = max(range(g.n), key=lambda i: costs.weights(i, i + 1))
        alone = costs.weights(heaviest, heaviest + 1)
        if alone > cap:
            return (
                f"operator {heaviest} ({g.op_name(heaviest)}) alone holds {alone / MB:.2f} MB "
                f"of weights: no segment can stay under --max-segment-mb {cap / MB:g}"
            )
        best = _plan(positions, segments, costs.size_estimate, costs.cuts.chainable)
        if best is not None:
            largest = max(costs.size_estimate(a, b) for a, b in itertools.pairwise(best))
            return (
                f"no {segments} segments of at most {cap / MB:g} MB each: with the valid cuts "
                f"the largest segment is at least about {largest / MB:.2f} MB; allow more "
                "segments, a larger --max-segment-mb or more --max-crossing"
            )
    return (
        f"no {segments} segments can be chained: every choice of cuts would make some tensor "
        "cross two cuts, passing through a segment; try fewer segments or a larger "
        "--max-crossing"
    )
