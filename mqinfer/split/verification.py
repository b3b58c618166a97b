"""Verification of a split: the whole model and its chained segments run on the same inputs
must give the same outputs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mqinfer.node.runtimes import Model
from mqinfer.protocol.manifest import Verification
from mqinfer.split.cuts import _Cuts
from mqinfer.split.errors import SplitError
from mqinfer.split.graph import _format, _Graph
from mqinfer.split.measure import _backend, _load, _run, random_inputs

# ONNX segments are expected to reproduce the whole model bitwise, but ONNX Runtime may fuse
# nodes differently on either side of a cut; a difference up to this fraction of the largest
# |output| is accepted (and recorded). TFLite segments must be bitwise equal.
ONNX_TOLERANCE = 1e-5

RANDOM_INPUTS = 3  # seeded random inputs every split is verified on (besides the samples)
SEED = 0


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
