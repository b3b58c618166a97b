"""`split_model`: a model file in, verified segment files and their pipeline manifest out."""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mqinfer.node.runtimes import candidates
from mqinfer.protocol.manifest import Manifest, Pipeline, Segment
from mqinfer.servicefile import PIPELINE_SUFFIX
from mqinfer.split.cuts import _analyse, _check_positions, _measured, _refusal, _without
from mqinfer.split.errors import SplitError
from mqinfer.split.graph import SUFFIXES, _format, _read_graph
from mqinfer.split.measure import (
    _backend,
    _load,
    _prefix_latencies,
    _segment_latencies,
    random_inputs,
)
from mqinfer.split.plan import MB, _build_plan, _check_fits, _choose, _Costs
from mqinfer.split.verification import (
    ONNX_TOLERANCE,
    RANDOM_INPUTS,
    SEED,
    _check_tensors,
    verify,
)

# Of the cuts where several tensors cross, at most this many are measured (spread over the
# model); every cut where one tensor crosses is.
MEASURED_SEVERAL = 24


def pipeline_file(model: str | Path) -> str:
    """The name of the pipeline manifest `split_model` writes for `model`:
    ``m.tflite`` -> ``m.pipeline.json``."""
    path = Path(model)
    return path.name[: -len(SUFFIXES[_format(path)])] + PIPELINE_SUFFIX


def split_model(
    path: str | Path,
    segments: int,
    out_dir: str | Path,
    *,
    max_segment_mb: float | None = None,
    max_crossing: int | None = None,
    threads: int = 1,
    samples: Sequence[Sequence[np.ndarray]] = (),
    name: str | None = None,
    at: Sequence[int] | None = None,
) -> Pipeline:
    """Split the model at `path` into `segments` pieces of about equal cost, verify them and
    write ``{stem}.seg{k}{suffix}`` and ``{stem}.pipeline.json`` into `out_dir`.

    `samples`: real inputs (one list of arrays per sample, in the model's input order) the
    split is verified on besides seeded random ones. `max_segment_mb` caps each segment
    file's size (decimal MB); `max_crossing` is the most tensors allowed to cross a cut
    (more than 1: model inputs and outputs, and tensors a later segment reads, may pass
    through a segment unused; None: automatic, up to AUTO_MAX_CROSSING, with cuts where
    one tensor crosses preferred unless the segments balance better with more);
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
    else:
        cuts = _measured(g, cuts, MEASURED_SEVERAL)
        costs = _Costs(g, cuts)
        if cap is not None:
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
            unrunnable: dict[int, str] = {}
            costs.latency = _prefix_latencies(
                g, cuts, backend, whole, feed, threads, work, unrunnable
            )
            if unrunnable:
                cuts = _without(cuts, unrunnable)
                costs.cuts = cuts
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
        runtime=candidates(backend)[0].key,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    for file, part in zip(files, built, strict=True):
        (out_dir / file).write_bytes(part.data)
    (out_dir / pipeline_file(path)).write_text(pipeline.model_dump_json(indent=2) + "\n")
    return pipeline


def _check_request(
    segments: int,
    max_segment_mb: float | None,
    max_crossing: int | None,
    threads: int,
    at: Sequence[int] | None,
) -> None:
    if segments < 2:
        raise SplitError(f"segments: expected 2 or more, got {segments}")
    if max_crossing is not None and max_crossing < 1:
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
