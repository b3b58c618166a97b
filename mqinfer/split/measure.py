"""Running models with the real runtime and timing them: whole models, the prefixes of a
model at every candidate cut, and the segments of a split."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mqinfer.node.runtimes import Backend, Model, RuntimeFailure, available_backends
from mqinfer.node.runtimes.base import concrete_shape
from mqinfer.protocol.manifest import TensorInfo
from mqinfer.split.cuts import _Cuts
from mqinfer.split.errors import SplitError, install_hint
from mqinfer.split.graph import SUFFIXES, _Graph

# Timing: warm-up runs, then repetitions until both minimums are met (or MAX_REPS); the
# median. A prefix is timed against the whole model, one run of each in turn, and kept as the
# median ratio of the pairs: other work on a busy machine slows both runs of a pair alike,
# where timing the prefixes one after another would inflate a run of neighbours.
WARMUP_RUNS = 1
MIN_REPS = 5
MIN_TIMING_S = 0.01
MAX_REPS = 200


def _backend(fmt: str) -> Backend:
    backends = available_backends()
    if fmt not in backends:
        raise SplitError(
            f"no runtime here runs {fmt} models (available: {', '.join(backends) or 'none'}); "
            f"{install_hint(fmt)}"
        )
    return backends[fmt]


def _load(backend: Backend, path: Path, threads: int) -> Model:
    try:
        return backend.load(str(path), threads)
    except RuntimeFailure as exc:
        raise SplitError(str(exc)) from None


def _run(model: Model, feed: list[np.ndarray], what: str) -> list[np.ndarray]:
    try:
        return model.run(feed)
    except RuntimeFailure as exc:
        raise SplitError(f"{what}: {exc}") from None


def median_ms(model: Model, feed: list[np.ndarray]) -> float:
    """Median run time in ms: a few warm-up runs, then at least MIN_REPS runs and
    MIN_TIMING_S seconds (at most MAX_REPS runs)."""
    for _ in range(WARMUP_RUNS):
        _run(model, feed, "warming up")
    times: list[float] = []
    began = time.perf_counter()
    while len(times) < MAX_REPS and (
        len(times) < MIN_REPS or time.perf_counter() - began < MIN_TIMING_S
    ):
        t0 = time.perf_counter()
        model.run(feed)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000.0


def random_inputs(specs: Sequence[TensorInfo], rng: np.random.Generator) -> list[np.ndarray]:
    """One array per input: floats uniform in [0, 1), 8-bit integers over their whole range,
    wider integers 0 or 1 (they are often indices), dynamic dimensions as 1."""
    arrays = []
    for spec in specs:
        dtype, shape = np.dtype(spec.dtype), concrete_shape(spec.shape)
        if dtype.kind == "f":
            arrays.append(rng.random(shape).astype(dtype))
        elif dtype.kind in "iu" and dtype.itemsize == 1:
            info = np.iinfo(dtype)
            arrays.append(rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True))
        elif dtype.kind == "b":
            arrays.append(rng.integers(0, 2, shape).astype(bool))
        else:
            arrays.append(rng.integers(0, 2, shape).astype(dtype))
    return arrays


def _prefix_latencies(
    g: _Graph,
    cuts: _Cuts,
    backend: Backend,
    whole: Model,
    feed: list[np.ndarray],
    threads: int,
    work: Path,
    unrunnable: dict[int, str],
) -> dict[int, float]:
    """L(c): run time of the prefix [0, c) for every valid cut, L(0) = 0, L(n) the whole
    model. Each prefix is measured as a fraction of the whole model (`paired_ratio`), the
    fractions made non-decreasing (`_isotonic`, with 0 and 1 held at the ends) and scaled by
    the whole model's fastest median. A cut whose prefix the runtime cannot load or run is
    left out, with the reason, in `unrunnable`."""
    whole_ms = [median_ms(whole, feed)]
    measured, ratios = [], []
    for c in cuts.valid(g.n):
        prefix = work / f"prefix{c}{SUFFIXES[g.format]}"
        prefix.write_bytes(g.build(0, c, g.inputs, cuts.order[c]))
        try:
            model = _load(backend, prefix, threads)
            try:
                ratio, took = paired_ratio(model, whole, feed)
            finally:
                model.close()
        except SplitError as e:
            # The runtime cannot run the model cut there (LiteRT's XNNPACK refuses a graph
            # that passes a model input straight through, say): not a candidate.
            unrunnable[c] = str(e)
            continue
        finally:
            prefix.unlink()
        measured.append(c)
        ratios.append(ratio)
        whole_ms.append(took)
    held = float(len(measured) + 1)  # weight that keeps the ends where they are
    fitted = _isotonic([0.0, *ratios, 1.0], [held, *([1.0] * len(ratios)), held])
    scale = min(whole_ms)
    return {c: r * scale for c, r in zip([0, *measured, g.n], fitted, strict=True)}


def _isotonic(values: Sequence[float], weights: Sequence[float]) -> list[float]:
    """The non-decreasing sequence closest to `values` in weighted least squares (pool
    adjacent violators): a noisy dip or spike is averaged with its neighbours, not copied."""
    blocks: list[list[float]] = []  # [weighted mean, weight, count]
    for value, weight in zip(values, weights, strict=True):
        blocks.append([value, weight, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            mean, w, count = blocks.pop()
            last = blocks[-1]
            last[0] = (last[0] * last[1] + mean * w) / (last[1] + w)
            last[1] += w
            last[2] += count
    return [mean for mean, _, count in blocks for _ in range(int(count))]


def paired_ratio(model: Model, whole: Model, feed: list[np.ndarray]) -> tuple[float, float]:
    """Run time of `model` as a fraction of `whole`'s (both fed `feed`), from runs of one
    and then the other: the median of the pairs' ratios, and `whole`'s median in ms."""
    for _ in range(WARMUP_RUNS):
        _run(model, feed, "warming up")
        _run(whole, feed, "warming up")
    ratios: list[float] = []
    whole_s: list[float] = []
    began = time.perf_counter()
    while len(ratios) < MAX_REPS and (
        len(ratios) < MIN_REPS or time.perf_counter() - began < MIN_TIMING_S
    ):
        t0 = time.perf_counter()
        model.run(feed)
        t1 = time.perf_counter()
        whole.run(feed)
        t2 = time.perf_counter()
        ratios.append((t1 - t0) / (t2 - t1))
        whole_s.append(t2 - t1)
    return statistics.median(ratios), statistics.median(whole_s) * 1000.0


def _segment_latencies(whole: Model, parts: Sequence[Model], feed: list[np.ndarray]) -> list[float]:
    values = {spec.name: array for spec, array in zip(whole.inputs, feed, strict=True)}
    result = []
    for k, model in enumerate(parts):
        part_feed = [values[spec.name] for spec in model.inputs]
        result.append(median_ms(model, part_feed))
        outs = _run(model, part_feed, f"segment {k}")
        values.update((spec.name, array) for spec, array in zip(model.outputs, outs, strict=True))
    return result
