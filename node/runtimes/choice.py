"""Several runtimes for one format, and the fastest of them for one model, by measurement.

A node with, say, LiteRT and OpenVINO can run a .tflite file on either, and which is
faster depends on the model and the machine. `Candidates` holds a format's runtimes in
order of preference; at deploy, `fastest` loads the model in each, times a few warm runs
on zeros and keeps the fastest (by a clear margin ahead of those preferred to it). A
runtime that refuses the model, fails on zeros or describes its tensors unlike the
preferred one is left out, with the reason.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from mqinfer.node.runtimes.base import CPU, Backend, Model, RuntimeFailure, concrete_shape

WARM = 2  # untimed runs first: the first allocates and plans, OpenVINO's second is slow too
RUNS = 7  # timed runs per runtime; the best counts
MIN_RUNS = 2  # ... at least, even when a run is slow
BUDGET = 1.0  # seconds of timed runs per runtime after which no further run starts
# A runtime later in the order of preference replaces the fastest so far only when it is
# faster by this fraction: within the noise of a few runs the preferred one serves.
MARGIN = 0.1


def label(backend: Backend) -> str:
    """The runtime a replica reports: the backend's key ('litert', 'onnxruntime'), or its
    `label` where the device is not the CPU ('openvino GPU', 'onnxruntime cuda.0')."""
    return str(getattr(backend, "label", backend.key))


class Candidates:
    """A format's runtimes (on their devices), preferred first. As a Backend it loads with
    the preferred one, or the one on the device asked for; a replica measures them with
    `fastest`."""

    def __init__(self, fmt: str, backends: Sequence[Backend]) -> None:
        if len(backends) < 2:
            raise ValueError("Candidates needs two runtimes or more")
        self.backends = list(backends)
        self.key = self.backends[0].key
        self.device = getattr(self.backends[0], "device", CPU)
        self.formats: tuple[str, ...] = (fmt,)

    def load(self, path: str, threads: int, device: str | None = None) -> Model:
        if device is None:
            return self.backends[0].load(path, threads)
        for backend in self.backends:
            if str(getattr(backend, "device", CPU)).lower() == device.lower():
                return backend.load(path, threads, device)
        have = ", ".join(f"{label(b)} on {getattr(b, 'device', CPU)}" for b in self.backends)
        raise RuntimeFailure(
            f"no runtime here runs {self.formats[0]} on {device!r} (there are {have})"
        )


def candidates(backend: Backend) -> list[Backend]:
    """The runtimes behind a node's backend for a format, preferred first."""
    return list(backend.backends) if isinstance(backend, Candidates) else [backend]


@dataclass
class Measured:
    backend: Backend  # the fastest
    model: Model  # the fastest's model, loaded and run
    ms: dict[str, float]  # runtime label -> best timed run (ms), for each that ran
    left_out: dict[str, str] = field(default_factory=dict)  # runtime label -> why

    @property
    def runtime(self) -> str:
        return label(self.backend)

    def summary(self) -> str:
        """'litert 0.07 ms, openvino 0.05 ms: serving with openvino'."""
        parts = [f"{name} {_ms(ms)} ms" for name, ms in self.ms.items()]
        parts += [f"{name} left out ({why})" for name, why in self.left_out.items()]
        return f"{', '.join(parts)}: serving with {self.runtime}"


def _ms(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def _zeros(model: Model) -> list[np.ndarray]:
    return [np.zeros(concrete_shape(s.shape), np.dtype(s.dtype)) for s in model.inputs]


def _tensors(model: Model) -> list[tuple[str, tuple[int, ...]]]:
    return [(t.dtype, tuple(t.shape)) for t in [*model.inputs, *model.outputs]]


def _time(model: Model, runs: int, clock: Callable[[], float], budget: float = BUDGET) -> float:
    """Best of `runs` runs on zeros after WARM untimed ones (ms)."""
    zeros = _zeros(model)
    for _ in range(WARM):
        model.run(zeros)
    best = math.inf
    spent = 0.0
    for done in range(runs):
        if done >= MIN_RUNS and spent > budget:
            break
        start = clock()
        model.run(zeros)
        took = clock() - start
        spent += took
        best = min(best, took)
    return best * 1000


def fastest(
    backends: Sequence[Backend],
    path: str,
    threads: int,
    runs: int = RUNS,
    clock: Callable[[], float] = time.perf_counter,
) -> Measured:
    """Load the model in each runtime and keep the fastest: the first (preferred) one
    unless a later one is faster by MARGIN or more.

    Only the fastest so far stays loaded. Raises RuntimeFailure naming each runtime and
    why, when none can run the model."""
    best: tuple[Backend, Model, float] | None = None
    reference: list[tuple[str, tuple[int, ...]]] | None = None
    first = ""
    ms: dict[str, float] = {}
    left_out: dict[str, str] = {}
    for backend in backends:
        name = label(backend)
        try:
            model = backend.load(path, threads)
        except RuntimeFailure as e:
            left_out[name] = str(e)
            continue
        try:
            tensors = _tensors(model)
            if reference is not None and tensors != reference:
                raise RuntimeFailure(
                    f"it describes the tensors as {tensors}, {first} as {reference}"
                )
            took = _time(model, runs, clock)
        except RuntimeFailure as e:
            model.close()
            left_out[name] = str(e)
            continue
        if reference is None:
            reference, first = tensors, name
        ms[name] = took
        if best is None or took < best[2] * (1 - MARGIN):
            if best is not None:
                best[1].close()
            best = (backend, model, took)
        else:
            model.close()
    if best is None:
        raise RuntimeFailure("; ".join(f"{name}: {why}" for name, why in left_out.items()))
    return Measured(best[0], best[1], ms, left_out)
