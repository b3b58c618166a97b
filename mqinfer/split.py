"""`mqinfer split`: cut a model into segments that run one after another.

A model is a list of operators in execution order (TFLite) or nodes in topological order
(ONNX). A *cut* at position c sends operators [0, c) to one segment and [c, n) to the
next; the tensors made before c and still needed from c on (or model outputs) cross the
cut and become the outputs of the one segment and the inputs of the next, matched by name.

How the cuts are chosen:

1. Candidate cuts are the positions where at most `max_crossing` tensors cross. A cut
   where a model input is still needed later, or a model output is already made, is
   refused: a segment would have to pass that tensor through without using it.
2. The cost of a segment is its run time plus the transfer of the tensors it sends on.
   Run time is measured, not guessed: the prefix [0, c) of the model is built for every
   candidate c and timed with the real runtime, so segment [a, b) takes about L(b) - L(a).
   (Weights are back-loaded in CNNs and run time is front-loaded, so neither the operator
   count nor the weights are a guide.)
3. The cuts minimising the largest segment cost are chosen (dynamic programming over the
   candidates; among plans within `BALANCE_SLACK` of the best, the least total cost wins),
   under the optional cap on each segment's file size.
4. The segments are built, timed one by one, and verified: chained on seeded random inputs
   and on the given samples, their outputs must equal the whole model's (TFLite bitwise;
   ONNX bitwise or within `ONNX_TOLERANCE` of the largest output value).

Only then are the files written: ``{stem}.seg{k}{suffix}`` and ``{stem}.pipeline.json``
(`protocol.manifest.Pipeline`).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import hashlib
import itertools
import statistics
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from node.runtimes import Backend, Model, RuntimeFailure, available_backends
from node.runtimes.base import concrete_shape
from protocol.manifest import (
    Format,
    Manifest,
    Pipeline,
    Segment,
    TensorInfo,
    Verification,
    format_of,
)

# Transfer cost of the message a segment sends (the tensors crossing its end cut; for the
# last segment, the model outputs), charged to the sending segment: a stage is busy until
# its result is handed over. From the Mosquitto QoS 1 round trips measured with paho on
# loopback (request -> echo -> reply, so the payload travels twice): 0.606 ms at 100 B and
# 2.04 ms at 150 KB, i.e. (2.04 - 0.606) / (2 * 150 * 1024) ms per byte one way, plus half
# the small-message round trip per message.
TRANSFER_MS_PER_BYTE = (2.04 - 0.606) / (2 * 150 * 1024)  # ~4.7 ns per byte
TRANSFER_MS_PER_MESSAGE = 0.606 / 2

# ONNX segments are expected to reproduce the whole model bitwise, but ONNX Runtime may fuse
# nodes differently on either side of a cut; a difference up to this fraction of the largest
# |output| is accepted (and recorded). TFLite segments must be bitwise equal.
ONNX_TOLERANCE = 1e-5

# Plans whose slowest segment is within this fraction of the best plan's count as equally
# balanced (timing noise is larger); of those, the one with the least total cost (run time
# plus transfers end to end) is chosen, rather than, say, a segment that only converts the
# input and sends it on.
BALANCE_SLACK = 0.05

RANDOM_INPUTS = 3  # seeded random inputs every split is verified on (besides the samples)
SEED = 0

# Timing: warm-up runs, then repetitions until both minimums are met (or MAX_REPS); the
# median. A prefix is timed against the whole model, one run of each in turn, and kept as the
# median ratio of the pairs: other work on a busy machine slows both runs of a pair alike,
# where timing the prefixes one after another would inflate a run of neighbours.
WARMUP_RUNS = 1
MIN_REPS = 5
MIN_TIMING_S = 0.01
MAX_REPS = 200

SUFFIXES = {"tflite": ".tflite", "onnx": ".onnx"}
MB = 1_000_000  # --max-segment-mb counts decimal megabytes, as file sizes are quoted


class SplitError(Exception):
    """The model cannot be split as asked; the message says what was wrong and what was
    expected."""


# ---- the model as a graph ---------------------------------------------------------------


class _Graph(ABC):
    """Operators in execution order over integer tensor keys. Constant tensors (weights) are
    left out of `reads`; they are counted in `weights`."""

    format: Format
    n: int
    inputs: list[int]  # model inputs, in the model's order
    outputs: list[int]  # model outputs, in the model's order
    reads: list[list[int]]  # per operator: non-constant tensors it reads
    writes: list[list[int]]  # per operator: tensors it makes
    weights: list[list[tuple[int, int]]]  # per operator: (constant key, bytes)
    names: dict[int, str]
    nbytes: dict[int, int | None]  # None: a tensor that cannot be sent between segments
    size: int  # bytes of the model file

    @abstractmethod
    def op_name(self, i: int) -> str: ...

    @abstractmethod
    def build(self, start: int, end: int, inputs: Sequence[int], outputs: Sequence[int]) -> bytes:
        """A model file holding operators [start, end) with these inputs and outputs."""

    def describe(self, keys: Sequence[int]) -> str:
        return ", ".join(f"'{self.names[t]}'" for t in keys)


_TFLITE_ITEMSIZE = {
    0: 4,  # FLOAT32
    1: 2,  # FLOAT16
    2: 4,  # INT32
    3: 1,  # UINT8
    4: 8,  # INT64
    6: 1,  # BOOL
    7: 2,  # INT16
    8: 8,  # COMPLEX64
    9: 1,  # INT8
    10: 8,  # FLOAT64
    11: 16,  # COMPLEX128
    12: 8,  # UINT64
    15: 4,  # UINT32
    16: 2,  # UINT16
}


class _Tflite(_Graph):
    format: Format = "tflite"

    def __init__(self, path: Path) -> None:
        from ai_edge_litert.tools import flatbuffer_utils

        try:
            model = flatbuffer_utils.read_model(str(path))
        except Exception as exc:
            raise SplitError(f"{path.name} is not a readable .tflite model: {exc}") from exc
        self._model: Any = model
        if len(model.subgraphs) != 1:
            raise SplitError(
                f"{path.name} has {len(model.subgraphs)} subgraphs (control flow such as "
                "WHILE or IF): only single-subgraph models can be split"
            )
        if model.externalBuffers:
            raise SplitError(
                f"{path.name} keeps weights in external buffers: only self-contained "
                ".tflite files can be split"
            )
        sg = model.subgraphs[0]
        self._sg: Any = sg
        buffers = model.buffers
        self._const = [
            t.buffer > 0 and buffers[t.buffer].data is not None and len(buffers[t.buffer].data) > 0
            for t in sg.tensors
        ]
        for t in sg.tensors:
            if t.isVariable:
                raise SplitError(
                    f"{path.name} has a variable tensor '{_text(t.name)}' (state kept between "
                    "runs): stateful models cannot be split"
                )
        self.n = len(sg.operators)
        self.inputs = [int(t) for t in sg.inputs]
        self.outputs = [int(t) for t in sg.outputs]
        self.reads, self.writes, self.weights = [], [], []
        for op in sg.operators:
            ins = [int(t) for t in op.inputs if t >= 0]
            self.reads.append([t for t in ins if not self._const[t]])
            self.writes.append([int(t) for t in op.outputs if t >= 0])
            self.weights.append(
                [
                    (int(sg.tensors[t].buffer), len(buffers[sg.tensors[t].buffer].data))
                    for t in dict.fromkeys(ins)
                    if self._const[t]
                ]
            )
        self.names = {i: _text(t.name) for i, t in enumerate(sg.tensors)}
        self.nbytes = {}
        for i, t in enumerate(sg.tensors):
            itemsize = _TFLITE_ITEMSIZE.get(int(t.type))
            shape = [] if t.shape is None else [int(d) for d in t.shape]
            self.nbytes[i] = None if itemsize is None else itemsize * _count(shape)
        self.size = path.stat().st_size

    def op_name(self, i: int) -> str:
        from ai_edge_litert.tools import flatbuffer_utils

        name = flatbuffer_utils.opcode_to_name(self._model, self._sg.operators[i].opcodeIndex)
        return str(name or "custom")

    def build(self, start: int, end: int, inputs: Sequence[int], outputs: Sequence[int]) -> bytes:
        from ai_edge_litert import schema_py_generated as schema
        from ai_edge_litert.tools import flatbuffer_utils

        model, sg = self._model, self._sg
        ops = sg.operators[start:end]
        used: set[int] = set(inputs) | set(outputs)
        for op in ops:
            used.update(int(t) for t in op.inputs if t >= 0)
            used.update(int(t) for t in op.outputs if t >= 0)
            if op.intermediates is not None:
                used.update(int(t) for t in op.intermediates if t >= 0)
        # buffer 0 stays the empty sentinel every non-constant tensor points at
        buffers: list[Any] = [schema.BufferT()]
        buffer_map: dict[int, int] = {}

        def keep_buffer(old: int) -> int:
            if old not in buffer_map:
                buffer_map[old] = len(buffers)
                buffers.append(model.buffers[old])
            return buffer_map[old]

        tensor_map: dict[int, int] = {}
        tensors: list[Any] = []
        for t in sorted(used):
            tensor = copy.copy(sg.tensors[t])
            tensor.buffer = keep_buffer(tensor.buffer) if self._const[t] else 0
            tensor_map[t] = len(tensors)
            tensors.append(tensor)

        def remap(keys: Any) -> list[int] | None:
            if keys is None:
                return None
            return [tensor_map[int(t)] if t >= 0 else -1 for t in keys]

        new_ops = []
        for op in ops:
            new_op = copy.copy(op)
            new_op.inputs = remap(op.inputs)
            new_op.outputs = remap(op.outputs)
            new_op.intermediates = remap(op.intermediates)
            new_ops.append(new_op)
        new_sg = copy.copy(sg)
        new_sg.tensors = tensors
        new_sg.operators = new_ops
        new_sg.inputs = [tensor_map[t] for t in inputs]
        new_sg.outputs = [tensor_map[t] for t in outputs]
        new_model = copy.copy(model)
        new_model.subgraphs = [new_sg]
        new_model.signatureDefs = None  # they name tensors by their old indices
        metadata = []
        for entry in model.metadata or []:
            kept = copy.copy(entry)
            kept.buffer = keep_buffer(entry.buffer)
            metadata.append(kept)
        new_model.metadata = metadata or None
        if model.metadataBuffer is not None:
            new_model.metadataBuffer = [keep_buffer(int(b)) for b in model.metadataBuffer]
        new_model.buffers = buffers
        return bytes(flatbuffer_utils.convert_object_to_bytearray(new_model))


class _Onnx(_Graph):
    format: Format = "onnx"

    def __init__(self, path: Path) -> None:
        import onnx
        import onnx.shape_inference
        import onnx.utils

        try:
            loaded = onnx.load(str(path))
            model = onnx.shape_inference.infer_shapes(loaded)
        except Exception as exc:
            raise SplitError(f"{path.name} is not a readable .onnx model: {exc}") from exc
        graph = model.graph
        for node in graph.node:
            for attr in node.attribute:
                if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                    raise SplitError(
                        f"{path.name} has control flow (a {node.op_type} node with a "
                        "subgraph): only models without subgraphs can be split"
                    )
        self._model = model
        self._extractor = onnx.utils.Extractor(model)
        self._nodes = list(graph.node)
        keys: dict[str, int] = {}

        def key(name: str) -> int:
            return keys.setdefault(name, len(keys))

        initializers = {i.name: i for i in graph.initializer}
        # constants: initializers, and what nodes make from constants alone (Constant, or
        # a shape computed from weights); a segment that needs one recomputes it
        constant = set(initializers)
        for node in graph.node:
            if all(name in constant for name in node.input if name):
                constant.update(name for name in node.output if name)
        self.n = len(graph.node)
        self.inputs = [key(i.name) for i in graph.input if i.name not in initializers]
        self.outputs = [key(o.name) for o in graph.output]
        self.reads, self.writes, self.weights = [], [], []
        for node in graph.node:
            names = list(dict.fromkeys(name for name in node.input if name))
            self.reads.append([key(name) for name in names if name not in constant])
            self.writes.append([key(name) for name in node.output if name])
            self.weights.append(
                [
                    (key(name), _initializer_bytes(initializers[name]))
                    for name in names
                    if name in initializers
                ]
            )
        self.names = {k: name for name, k in keys.items()}
        infos = {v.name: v for v in (*graph.value_info, *graph.input, *graph.output)}
        self.nbytes = {k: _value_bytes(infos.get(name)) for name, k in keys.items()}
        self.size = path.stat().st_size
        self._constant = constant
        self._position = {
            name: i for i, node in enumerate(graph.node) for name in node.output if name
        }

    def op_name(self, i: int) -> str:
        return str(self._nodes[i].op_type)

    def build(self, start: int, end: int, inputs: Sequence[int], outputs: Sequence[int]) -> bytes:
        segment = self._extractor.extract_model(
            [self.names[t] for t in inputs], [self.names[t] for t in outputs]
        )
        # besides its own nodes, a segment may only recompute constants made earlier
        stray = [
            node.name or node.op_type
            for node in segment.graph.node
            if not start <= self._position.get(_first(node.output), -1) < end
            and not all(name in self._constant for name in node.output if name)
        ]
        if stray:
            raise SplitError(
                f"ONNX segment [{start}, {end}) would also need node {stray[0]!r} from outside "
                "it: the model's nodes are not in topological order"
            )
        return bytes(segment.SerializeToString())


def _first(names: Sequence[str]) -> str:
    return next((name for name in names if name), "")


def _text(name: Any) -> str:
    return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name or "")


def _count(shape: Sequence[int]) -> int:
    return int(np.prod(concrete_shape(shape), dtype=np.int64))


def _initializer_bytes(tensor: Any) -> int:
    import onnx.helper

    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except Exception:
        itemsize = 4
    return itemsize * _count([int(d) for d in tensor.dims])


def _value_bytes(info: Any) -> int | None:
    """Bytes of a tensor from its ONNX type (dynamic dimensions as 1); None without a type."""
    import onnx.helper

    if info is None or not info.type.HasField("tensor_type"):
        return None
    tensor_type = info.type.tensor_type
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).itemsize
    except Exception:
        return None
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim]
    return itemsize * _count(dims)


def _read_graph(path: Path) -> _Graph:
    fmt = _format(path)
    return _Tflite(path) if fmt == "tflite" else _Onnx(path)


def _format(path: Path) -> str:
    try:
        fmt = format_of(path.name)
    except ValueError as exc:
        raise SplitError(str(exc)) from None
    if fmt == "edgetpu_tflite":
        raise SplitError(
            f"{path.name} is compiled for the Edge TPU: its graph sits inside one "
            "edgetpu-custom-op and cannot be cut. Split the CPU .tflite model instead and "
            "compile each segment with edgetpu_compiler"
        )
    return fmt


# ---- where the model can be cut ---------------------------------------------------------


@dataclass(frozen=True)
class _Cuts:
    live: list[frozenset[int]]  # per position 0..n: the tensors crossing it
    order: list[list[int]]  # the same, in the order segments list them
    problems: dict[int, tuple[str, str]]  # invalid position -> (kind, why)

    def valid(self, n: int) -> list[int]:
        return [c for c in range(1, n) if c not in self.problems]

    def chainable(self, a: int, b: int) -> bool:
        """Whether [a, b) can be a segment: no tensor crosses both of its cuts."""
        return not self.live[a] & self.live[b]


def _analyse(g: _Graph, max_crossing: int) -> _Cuts:
    """The tensors crossing each position, and why a position cannot be a cut."""
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
        if late:
            t = late[0]
            problems[c] = (
                "input",
                f"model input '{g.names[t]}' is still read by operator {end[t]}, so the "
                "segment before would have to pass it through unused",
            )
        elif early:
            t = early[0]
            problems[c] = (
                "output",
                f"model output '{g.names[t]}' is made by operator {producer.get(t, 0)}, so "
                "the segments after would have to pass it through unused",
            )
        elif not crossing:
            problems[c] = ("empty", "no tensor crosses it")
        elif len(crossing) > max_crossing:
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
    return _Cuts([frozenset(s) for s in live], order, problems)


def _ordered(keys: set[int], start: dict[int, int]) -> list[int]:
    """Crossing tensors in the order they were made."""
    return sorted(keys, key=lambda t: (start.get(t, 0), t))


def _refusal(g: _Graph, cuts: _Cuts, segments: int, max_crossing: int) -> str:
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
            parts.append(
                f"{len(positions)} have more than {max_crossing} tensor(s) crossing (the fewest,"
                f" {fewest}, at {c}: {g.describe(cuts.order[c])}); --max-crossing {fewest} "
                "would allow it"
            )
        else:
            c = positions[0]
            parts.append(
                f"{len(positions)} are refused because, e.g. at {c}, {cuts.problems[c][1]}"
            )
    return head + (" Of the others: " + "; ".join(parts) + "." if parts else "")


# ---- measuring ----------------------------------------------------------------------------


def _backend(fmt: str) -> Backend:
    backends = available_backends()
    if fmt not in backends:
        raise SplitError(
            f"no runtime here runs {fmt} models (available: {', '.join(backends) or 'none'}); "
            "install ai-edge-litert for .tflite or onnxruntime for .onnx"
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


# ---- choosing the cuts ------------------------------------------------------------------


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


# ---- verification -----------------------------------------------------------------------


def verify(
    whole: Model,
    segments: Sequence[Model],
    inputs: Sequence[Sequence[np.ndarray]],
    tolerance: float = 0.0,
) -> Verification:
    """Run every input through the whole model and through the chained segments (each
    segment's inputs taken by name from the model inputs and earlier segments' outputs) and
    compare the outputs by name. `tolerance` is relative to the largest |output| of the
    whole model (0: bitwise). Raises SplitError on any difference beyond it."""
    if not inputs:
        raise SplitError("verification needs at least one input")
    exact, worst, accepted = True, 0.0, 0.0
    for number, feed in enumerate(inputs):
        expected = _run(whole, list(feed), "the whole model failed")
        values = {spec.name: array for spec, array in zip(whole.inputs, feed, strict=True)}
        for k, segment in enumerate(segments):
            missing = [spec.name for spec in segment.inputs if spec.name not in values]
            if missing:
                raise SplitError(
                    f"segment {k} needs tensor '{missing[0]}', which neither the model inputs "
                    "nor the segments before it provide"
                )
            got = _run(segment, [values[spec.name] for spec in segment.inputs], f"segment {k}")
            values.update(
                (spec.name, array) for spec, array in zip(segment.outputs, got, strict=True)
            )
        for spec, want in zip(whole.outputs, expected, strict=True):
            have = values.get(spec.name)
            if have is None:
                raise SplitError(f"no segment makes the model output '{spec.name}'")
            if have.dtype != want.dtype or have.shape != want.shape:
                raise SplitError(
                    f"model output '{spec.name}': the segments give {have.dtype} "
                    f"{list(have.shape)}, the whole model {want.dtype} {list(want.shape)}"
                )
            floating = want.dtype.kind in "fc"
            limit = 0.0
            if floating:  # relative to the largest finite |value|
                limit = tolerance * float(np.max(np.abs(want[np.isfinite(want)]), initial=0.0))
                accepted = max(accepted, limit)
            if np.array_equal(have, want, equal_nan=floating):
                continue
            exact = False
            wide = np.complex128 if want.dtype.kind == "c" else np.float64
            delta = np.abs(have.astype(wide) - want.astype(wide))
            same = have == want
            if floating:
                same |= np.isnan(have) & np.isnan(want)
            delta[same] = 0.0  # equal infinities give nan differences
            diff = float(np.max(delta))
            if not diff <= limit:  # nan included
                allowed = "bitwise equality" if limit == 0 else f"at most {limit:.3g}"
                raise SplitError(
                    f"verification failed on input {number}: model output '{spec.name}' of the "
                    f"chained segments differs from the whole model's by up to {diff:.3g}; "
                    f"expected {allowed}"
                )
            worst = max(worst, diff)
    return Verification(inputs=len(inputs), exact=exact, max_abs_diff=worst, tolerance=accepted)


def verify_files(
    model_path: str | Path,
    segment_paths: Sequence[str | Path],
    *,
    samples: Sequence[Sequence[np.ndarray]] = (),
    random: int = RANDOM_INPUTS,
    threads: int = 1,
) -> Verification:
    """`verify` for model files: the whole model against its segment files, on `random`
    seeded random inputs and the `samples`."""
    model_path = Path(model_path)
    fmt = _format(model_path)
    backend = _backend(fmt)
    whole = _load(backend, model_path, threads)
    parts = [_load(backend, Path(p), threads) for p in segment_paths]
    rng = np.random.default_rng(SEED)
    inputs = [random_inputs(whole.inputs, rng) for _ in range(random)] + [list(s) for s in samples]
    return verify(whole, parts, inputs, ONNX_TOLERANCE if fmt == "onnx" else 0.0)


# ---- splitting ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Built:
    start: int
    end: int
    data: bytes
    weights: int


def split_model(
    path: str | Path,
    segments: int,
    out_dir: str | Path,
    *,
    max_segment_mb: float | None = None,
    max_crossing: int = 1,
    threads: int = 1,
    samples: Sequence[Sequence[np.ndarray]] = (),
    name: str | None = None,
    at: Sequence[int] | None = None,
) -> Pipeline:
    """Split the model at `path` into `segments` pieces of about equal cost, verify them and
    write ``{stem}.seg{k}{suffix}`` and ``{stem}.pipeline.json`` into `out_dir`.

    `samples`: real inputs (one list of arrays per sample, in the model's input order) the
    split is verified on besides seeded random ones. `max_segment_mb` caps each segment
    file's size (decimal MB); `max_crossing` is the most tensors allowed to cross a cut;
    latencies are measured with `threads` runtime threads. `at`: cut at these operator
    positions instead of choosing by cost (segments - 1 of them). `name` names the pipeline
    (default: the name in the manifest beside the model, else the file stem).
    Raises SplitError; nothing is written unless the split is verified.
    """
    path, out_dir = Path(path), Path(out_dir)
    _check_request(segments, max_segment_mb, max_crossing, threads, at)
    if not path.is_file():
        raise SplitError(f"{path}: no such model file")
    fmt = _format(path)
    backend = _backend(fmt)
    g = _read_graph(path)
    if g.n < segments:
        raise SplitError(
            f"{path.name} has {g.n} operators: it cannot be cut into {segments} segments"
        )
    cuts = _analyse(g, max_crossing)
    costs = _Costs(g, cuts)
    cap = None if max_segment_mb is None else max_segment_mb * MB
    if at is not None:
        _check_positions(path.name, g, cuts, list(at))
    elif len(cuts.valid(g.n)) < segments - 1:
        raise SplitError(f"{path.name}: {_refusal(g, cuts, segments, max_crossing)}")
    elif cap is not None:
        _check_fits(path.name, g, cuts, costs, segments, cap)

    rng = np.random.default_rng(SEED)
    with tempfile.TemporaryDirectory(prefix="mqinfer-split-") as tmp:
        work = Path(tmp)
        whole = _load(backend, path, threads)
        feed = random_inputs(whole.inputs, rng)
        if at is not None:
            plan = [0, *at, g.n]
            built = _build_plan(g, cuts, plan, costs)
            over = [p for p in built if cap is not None and len(p.data) > cap]
            if over:
                raise SplitError(
                    f"{path.name}: segment [{over[0].start}, {over[0].end}) would be "
                    f"{len(over[0].data) / MB:.2f} MB, over --max-segment-mb {max_segment_mb:g}"
                )
        else:
            costs.latency = _prefix_latencies(g, cuts, backend, whole, feed, threads, work)
            plan, built = _choose(path.name, g, cuts, costs, segments, cap)
        whole.close()

        stem = path.name[: -len(SUFFIXES[fmt])]
        files = [f"{stem}.seg{k}{SUFFIXES[fmt]}" for k in range(segments)]
        for file, part in zip(files, built, strict=True):
            (work / file).write_bytes(part.data)
        whole = _load(backend, path, threads)
        parts = [_load(backend, work / file, threads) for file in files]
        _check_tensors(g, cuts, plan, whole, parts)
        verification = verify(
            whole,
            parts,
            [random_inputs(whole.inputs, rng) for _ in range(RANDOM_INPUTS)]
            + [list(sample) for sample in samples],
            ONNX_TOLERANCE if fmt == "onnx" else 0.0,
        )
        seg_latency = _segment_latencies(whole, parts, feed)
        for loaded in (whole, *parts):
            loaded.close()

    beside = _manifest_beside(path)
    out = []
    for k, (file, part, model) in enumerate(zip(files, built, parts, strict=True)):
        manifest = Manifest(
            name=f"{stem}.seg{k}",
            format=g.format,
            file=file,
            sha256=hashlib.sha256(part.data).hexdigest(),
            size=len(part.data),
            inputs=model.inputs,
            outputs=model.outputs,
            preprocessing=beside.preprocessing if beside is not None and k == 0 else None,
            labels=beside.labels if beside is not None and k == segments - 1 else [],
            description=f"Segment {k} of {segments} of {path.name}: "
            f"{'operators' if fmt == 'tflite' else 'nodes'} [{part.start}, {part.end}).",
        )
        out.append(
            Segment(
                manifest=manifest,
                ops=(part.start, part.end),
                latency_ms=round(seg_latency[k], 4),
                weights_bytes=part.weights,
            )
        )
    pipeline = Pipeline(
        name=name or (beside.name if beside is not None else stem),
        model=path.name,
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        format=g.format,
        segments=out,
        verification=verification,
        profile_threads=threads,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    for file, part in zip(files, built, strict=True):
        (out_dir / file).write_bytes(part.data)
    (out_dir / f"{stem}.pipeline.json").write_text(pipeline.model_dump_json(indent=2) + "\n")
    return pipeline


def _check_request(
    segments: int,
    max_segment_mb: float | None,
    max_crossing: int,
    threads: int,
    at: Sequence[int] | None,
) -> None:
    if segments < 2:
        raise SplitError(f"segments: expected 2 or more, got {segments}")
    if max_crossing < 1:
        raise SplitError(
            f"max crossing: expected 1 or more tensors allowed to cross a cut, got {max_crossing}"
        )
    if threads < 1:
        raise SplitError(f"threads: expected 1 or more, got {threads}")
    if max_segment_mb is not None and not max_segment_mb > 0:
        raise SplitError(f"max segment size: expected a size in MB > 0, got {max_segment_mb}")
    if at is not None and len(at) != segments - 1:
        raise SplitError(
            f"{segments} segments need {segments - 1} cut position(s), {len(at)} were given"
        )


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
        if shared:
            raise SplitError(
                f"{model}: cannot cut at both {a} and {b}: {g.describe(sorted(shared))} would "
                f"pass through segment [{a}, {b})"
            )


def _check_fits(
    model: str, g: _Graph, cuts: _Cuts, costs: _Costs, segments: int, cap: float
) -> None:
    """Refuse before measuring anything when no plan keeps the estimated sizes under the cap."""
    positions = [0, *cuts.valid(g.n), g.n]

    def fits(a: int, b: int) -> bool:  # with a margin: the estimate is good to a few %
        return cuts.chainable(a, b) and costs.size_estimate(a, b) <= cap * 1.05

    if _plan(positions, segments, costs.size_estimate, fits) is None:
        raise SplitError(f"{model}: {_no_plan(g, costs, positions, segments, cap)}")


def _prefix_latencies(
    g: _Graph,
    cuts: _Cuts,
    backend: Backend,
    whole: Model,
    feed: list[np.ndarray],
    threads: int,
    work: Path,
) -> dict[int, float]:
    """L(c): run time of the prefix [0, c) for every valid cut, L(0) = 0, L(n) the whole
    model. Each prefix is measured as a fraction of the whole model (`paired_ratio`), the
    fractions made non-decreasing (`_isotonic`, with 0 and 1 held at the ends) and scaled by
    the whole model's fastest median."""
    valid = cuts.valid(g.n)
    whole_ms = [median_ms(whole, feed)]
    ratios = []
    for c in valid:
        prefix = work / f"prefix{c}{SUFFIXES[g.format]}"
        prefix.write_bytes(g.build(0, c, g.inputs, cuts.order[c]))
        model = _load(backend, prefix, threads)
        ratio, took = paired_ratio(model, whole, feed)
        ratios.append(ratio)
        whole_ms.append(took)
        model.close()
        prefix.unlink()
    held = float(len(valid) + 1)  # weight that keeps the ends where they are
    fitted = _isotonic([0.0, *ratios, 1.0], [held, *([1.0] * len(ratios)), held])
    scale = min(whole_ms)
    return {c: r * scale for c, r in zip([0, *valid, g.n], fitted, strict=True)}


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


def _check_tensors(
    g: _Graph, cuts: _Cuts, plan: list[int], whole: Model, parts: Sequence[Model]
) -> None:
    """The runtime must list every segment's inputs and outputs as they were built."""
    for k, (model, a, b) in enumerate(zip(parts, plan, plan[1:], strict=False)):
        for what, got, keys in (
            ("inputs", model.inputs, cuts.order[a]),
            ("outputs", model.outputs, cuts.order[b]),
        ):
            want = [g.names[t] for t in keys]
            if [spec.name for spec in got] != want:
                raise SplitError(
                    f"segment {k} {what} are {[s.name for s in got]}, expected {want}: "
                    "tensor names must be unique to be matched between segments"
                )
    if [s.name for s in parts[0].inputs] != [s.name for s in whole.inputs] or [
        s.name for s in parts[-1].outputs
    ] != [s.name for s in whole.outputs]:
        raise SplitError("the segments' model inputs and outputs do not match the whole model's")


def _segment_latencies(whole: Model, parts: Sequence[Model], feed: list[np.ndarray]) -> list[float]:
    values = {spec.name: array for spec, array in zip(whole.inputs, feed, strict=True)}
    result = []
    for k, model in enumerate(parts):
        part_feed = [values[spec.name] for spec in model.inputs]
        result.append(median_ms(model, part_feed))
        outs = _run(model, part_feed, f"segment {k}")
        values.update((spec.name, array) for spec, array in zip(model.outputs, outs, strict=True))
    return result


def _manifest_beside(path: Path) -> Manifest | None:
    """The whole model's manifest (same name, .json), when it describes this file."""
    candidate = path.with_name(path.name.rsplit(".", 1)[0] + ".json")
    try:
        manifest = Manifest.model_validate_json(candidate.read_text())
    except (OSError, ValueError):
        return None
    return manifest if manifest.file == path.name else None


@contextlib.contextmanager
def split_temporarily(
    path: str | Path, segments: int, **options: Any
) -> Iterator[tuple[Pipeline, Path]]:
    """`split_model` into a temporary directory, removed on leaving the context:
    ``with split_temporarily(model, 2) as (pipeline, directory): ...``."""
    with tempfile.TemporaryDirectory(prefix="mqinfer-split-") as tmp:
        yield split_model(path, segments, tmp, **options), Path(tmp)


# ---- command line -----------------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "split",
        help="split a model into segments for a pipeline (verified)",
        description=DESCRIPTION,
    )
    _add_arguments(p)
    p.set_defaults(func=run, parser=p)


DESCRIPTION = (
    "Split a .tflite or .onnx model into segments that run one after another, possibly on "
    "different nodes. The cuts are chosen by cost: every candidate prefix of the model is "
    "timed with the real runtime, the transfer of the tensors crossing a cut is added, and "
    "the cuts that make the slowest segment fastest win. The segments are then chained and "
    "compared with the whole model (TFLite bitwise, ONNX bitwise or within a relative "
    f"{ONNX_TOLERANCE:g}); only a verified split is written: MODEL_STEM.segK.SUFFIX and "
    "MODEL_STEM.pipeline.json. Exit 2 when the model cannot be split as asked."
)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="a .tflite or .onnx model file")
    p.add_argument(
        "--segments",
        type=int,
        metavar="N",
        help="how many segments (2 or more; required unless --at gives the cuts)",
    )
    p.add_argument(
        "-o",
        "--out",
        type=Path,
        metavar="DIR",
        help="directory for the segment files and the pipeline file (default: beside the model)",
    )
    p.add_argument(
        "--max-segment-mb",
        type=float,
        metavar="X",
        help="largest segment file in MB (10^6 bytes); cuts move to respect it",
    )
    p.add_argument(
        "--max-crossing",
        type=int,
        default=1,
        metavar="K",
        help="most tensors allowed to cross a cut (default %(default)s); residual networks "
        "have more cut points with 2",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        metavar="T",
        help="runtime threads when timing (default %(default)s); use what the nodes will use",
    )
    p.add_argument(
        "--at",
        metavar="C1,C2,...",
        help="cut before these operators (ONNX: nodes) instead of choosing by cost",
    )
    p.add_argument(
        "--sample",
        action="append",
        type=Path,
        default=[],
        metavar="FILE",
        help="a real input to verify on besides random ones: PNG, JPEG, .npy, JSON or raw "
        "tensor bytes, decoded as a request to the model is; repeatable",
    )


def main(argv: list[str] | None = None) -> int:
    """`mqinfer split` on its own: parse `argv` and run."""
    p = argparse.ArgumentParser(prog="mqinfer split", description=DESCRIPTION)
    _add_arguments(p)
    args = p.parse_args(argv)
    args.parser = p
    return run(args)


def run(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.parser
    at: list[int] | None = None
    if args.at is not None:
        try:
            at = [int(text) for text in args.at.split(",")]
        except ValueError:
            parser.error(f"--at: expected operator positions like 12,30, got {args.at!r}")
    segments = args.segments
    if segments is None:
        if at is None:
            parser.error("--segments N is required (or --at with the cut positions)")
        segments = len(at) + 1
    if segments < 2:
        parser.error(f"--segments: expected 2 or more, got {segments}")
    if args.max_crossing < 1:
        parser.error(f"--max-crossing: expected 1 or more, got {args.max_crossing}")
    if args.threads < 1:
        parser.error(f"--threads: expected 1 or more, got {args.threads}")
    if args.max_segment_mb is not None and not args.max_segment_mb > 0:
        parser.error(f"--max-segment-mb: expected a size > 0, got {args.max_segment_mb}")
    model: Path = args.model
    out_dir: Path = args.out if args.out is not None else model.parent
    began = time.perf_counter()
    try:
        samples = [read_sample(model, file, args.threads) for file in args.sample]
        pipeline = split_model(
            model,
            segments,
            out_dir,
            max_segment_mb=args.max_segment_mb,
            max_crossing=args.max_crossing,
            threads=args.threads,
            samples=samples,
            at=at,
        )
    except SplitError as e:
        print(f"mqinfer split: {e}", file=sys.stderr)
        return 2
    print(report(pipeline, out_dir, time.perf_counter() - began, by_cost=at is None))
    return 0


def read_sample(model: Path, file: Path, threads: int = 1) -> list[np.ndarray]:
    """A request payload file decoded into the model's input arrays, as a node decodes it
    (with the preprocessing of the manifest beside the model)."""
    from protocol.errors import ProtocolError
    from protocol.payload import decode_request

    if not model.is_file():
        raise SplitError(f"{model}: no such model file")
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise SplitError(f"sample {file}: {exc.strerror}") from None
    loaded = _load(_backend(_format(model)), model, threads)
    beside = _manifest_beside(model)
    try:
        decoded = decode_request(
            data, loaded.inputs, beside.preprocessing if beside else None, max_bytes=len(data)
        )
    except ProtocolError as exc:
        raise SplitError(f"sample {file}: {exc}") from None
    finally:
        loaded.close()
    return decoded.arrays


def _size(nbytes: float) -> str:
    for unit, scale in (("MB", MB), ("KB", 1000)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes:.0f} B"


def _ms(ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"{ms:.2f} ms" if ms >= 0.1 else f"{ms:.3f} ms"


def _tensors(specs: Sequence[TensorInfo]) -> str:
    return "; ".join(
        f"'{s.name}' {s.dtype} [{','.join(str(d) for d in s.shape)}] "
        f"{_count(s.shape) * np.dtype(s.dtype).itemsize} B"
        for s in specs
    )


def report(pipeline: Pipeline, directory: Path, seconds: float, *, by_cost: bool = True) -> str:
    """What `mqinfer split` prints: one row per segment, the verification, the files."""
    segments = pipeline.segments
    how = (
        f"cuts chosen by latency measured with {pipeline.profile_threads} thread(s)"
        if by_cost
        else "cuts as given"
    )
    rows = [["segment", "ops", "size", "weights", "latency", "passes on"]]
    for k, seg in enumerate(segments):
        last = k == len(segments) - 1
        rows.append(
            [
                str(k),
                f"{seg.ops[0]}-{seg.ops[1]}",
                _size(seg.manifest.size),
                _size(seg.weights_bytes),
                _ms(seg.latency_ms),
                ("model outputs " if last else "") + _tensors(seg.manifest.outputs),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = [
        f"{pipeline.model}: {len(segments)} segments, {how}, in {seconds:.1f} s",
        *(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1]
            for row in rows
        ),
    ]
    v = pipeline.verification
    if v.exact:
        lines.append(f"verified on {v.inputs} inputs: outputs bitwise equal to the whole model's")
    else:
        lines.append(
            f"verified on {v.inputs} inputs: outputs within {v.tolerance:.3g} of the whole "
            f"model's (largest difference {v.max_abs_diff:.3g})"
        )
    stem = segments[0].manifest.name.rsplit(".", 1)[0]
    files = [seg.manifest.file for seg in segments] + [f"{stem}.pipeline.json"]
    lines.append("wrote " + ", ".join(str(directory / f) for f in files))
    return "\n".join(lines)
