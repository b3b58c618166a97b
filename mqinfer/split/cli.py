"""`mqinfer split` on the command line: its arguments, running it, and the report it
prints."""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mqinfer.protocol.manifest import Pipeline, TensorInfo
from mqinfer.split.cuts import AUTO_MAX_CROSSING
from mqinfer.split.errors import SplitError
from mqinfer.split.graph import _count, _format
from mqinfer.split.measure import _backend, _load
from mqinfer.split.plan import MB
from mqinfer.split.splitter import _manifest_beside, pipeline_file, split_model
from mqinfer.split.verification import ONNX_TOLERANCE


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
        type=_crossing,
        default=None,
        metavar="K",
        help="most tensors allowed to cross a cut, or 'auto' (the default): up to "
        f"{AUTO_MAX_CROSSING}, cuts where one tensor crosses preferred unless more balance "
        "the segments better. With 2 or more, a model input read late or a model output "
        "made early is passed through the segments in between; 1 allows single-tensor cuts "
        "only",
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


def _crossing(text: str) -> int | None:
    """--max-crossing: a count, or 'auto' (None)."""
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of tensors or 'auto', got {text!r}"
        ) from None


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
    if args.max_crossing is not None and args.max_crossing < 1:
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
    from mqinfer.protocol.errors import ProtocolError
    from mqinfer.protocol.payload import decode_request

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


def _bytes(specs: Sequence[TensorInfo]) -> int:
    return sum(_count(s.shape) * np.dtype(s.dtype).itemsize for s in specs)


def _crossings(pipeline: Pipeline) -> list[str]:
    """A line for each cut where several tensors cross: how many, their bytes per request
    (dynamic dimensions as 1), and those a segment passes on without using them."""
    lines = []
    segments = pipeline.segments
    for k, (before, after) in enumerate(itertools.pairwise(segments)):
        crossing = before.manifest.outputs
        if len(crossing) < 2:
            continue
        line = (
            f"cut {k + 1} (before operator {after.ops[0]}): {len(crossing)} tensors cross, "
            f"{_bytes(crossing)} B per request"
        )
        passed = [s.name for s in crossing if s.name in {i.name for i in before.manifest.inputs}]
        if passed:
            line += f"; segment {k} passes on unused: " + ", ".join(f"'{n}'" for n in passed)
        lines.append(line)
    return lines


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
    lines += _crossings(pipeline)
    v = pipeline.verification
    with_ = f" with {pipeline.runtime}" if pipeline.runtime else ""
    if v.exact:
        lines.append(
            f"verified{with_} on {v.inputs} inputs: outputs bitwise equal to the whole model's"
        )
    else:
        lines.append(
            f"verified{with_} on {v.inputs} inputs: outputs within {v.tolerance:.3g} of the "
            f"whole model's (largest difference {v.max_abs_diff:.3g})"
        )
    files = [seg.manifest.file for seg in segments] + [pipeline_file(pipeline.model)]
    lines.append("wrote " + ", ".join(str(directory / f) for f in files))
    return "\n".join(lines)
