"""`mqinfer split`: segments of real models, chained, give exactly the whole model's outputs.

Every split here is of a committed model (or a small ONNX graph built in the test), run by
the same runtimes the node serves with. Chained outputs are compared bitwise with a direct
run of the whole model, on held-out digits or seeded random images; the manifests must
describe the segment files (sha256, size, tensors as the runtime reports them).
"""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper
import pytest

import mqinfer.cli
from mqinfer.node.runtimes import Backend, Model, RuntimeFailure, available_backends
from mqinfer.protocol.manifest import Manifest, Pipeline, format_of
from mqinfer.split import (
    RANDOM_INPUTS,
    SplitError,
    main,
    split_model,
    split_temporarily,
    verify_files,
)

MODELS = Path(__file__).resolve().parents[2] / "models"
MOBILENET = MODELS / "mobilenet_v2" / "mobilenet_v2_int8.tflite"
MOBILENET_OPS = 67
DIGITS = {
    "int8": MODELS / "digits" / "digits_int8.tflite",
    "f32": MODELS / "digits" / "digits_f32.tflite",
    "onnx": MODELS / "digits" / "digits.onnx",
}
SAMPLE_PNGS = sorted((MODELS / "digits" / "samples").glob("*.png"))

Inputs = list[list[np.ndarray]]
Splitter = Callable[[Path, int, Inputs], tuple[Pipeline, Path]]


@pytest.fixture(scope="module")
def backends() -> dict[str, Backend]:
    return available_backends()


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> Splitter:
    """split_model once per (model, segments) for the whole module."""
    done: dict[tuple[Path, int], tuple[Pipeline, Path]] = {}

    def get(model: Path, segments: int, samples: Inputs) -> tuple[Pipeline, Path]:
        if (model, segments) not in done:
            out = tmp_path_factory.mktemp(f"{model.stem}-{segments}")
            done[model, segments] = (split_model(model, segments, out, samples=samples), out)
        return done[model, segments]

    return get


def _load(backends: dict[str, Backend], path: Path) -> Model:
    return backends[format_of(path.name)].load(str(path), 1)


def _held_out(model: Path) -> Inputs:
    """The digits test set as input tensors, preprocessed as the model's manifest says."""
    manifest = Manifest.model_validate_json(model.with_suffix(".json").read_text())
    pre, spec = manifest.preprocessing, manifest.inputs[0]
    assert pre is not None and manifest.test_set is not None
    with np.load(model.parent / manifest.test_set) as data:
        images = data["images"][..., np.newaxis]  # [N, 8, 8, 1]
    if pre.layout == "NCHW":
        images = images.transpose(0, 3, 1, 2)
    value = (images.astype(np.float64) - pre.mean) / pre.std
    dtype = np.dtype(spec.dtype)
    if spec.quantization is not None:
        info = np.iinfo(dtype)
        q = np.round(value / spec.quantization.scale) + spec.quantization.zero_point
        value = np.clip(q, info.min, info.max)
    return [[x[np.newaxis].astype(dtype)] for x in value]


def _random_images(count: int) -> Inputs:
    rng = np.random.default_rng(7)
    return [[rng.integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)] for _ in range(count)]


def _chain(
    segments: Sequence[Model], whole: Model, feed: list[np.ndarray]
) -> dict[str, np.ndarray]:
    """Run the segments one after another, each fed by name; every tensor by name."""
    values = {spec.name: array for spec, array in zip(whole.inputs, feed, strict=True)}
    for segment in segments:
        out = segment.run([values[spec.name] for spec in segment.inputs])
        values.update((spec.name, a) for spec, a in zip(segment.outputs, out, strict=True))
    return values


def _check_split(
    backends: dict[str, Backend],
    model: Path,
    pipeline: Pipeline,
    directory: Path,
    inputs: Inputs,
    segments: int,
) -> list[Model]:
    """Files, manifests and tensors as promised; chained outputs bitwise equal."""
    suffix = model.suffix
    stem = model.name[: -len(suffix)]
    assert Pipeline.model_validate_json((directory / f"{stem}.pipeline.json").read_text()) == (
        pipeline
    )
    assert pipeline.model == model.name
    assert pipeline.sha256 == hashlib.sha256(model.read_bytes()).hexdigest()
    assert len(pipeline.segments) == segments
    assert pipeline.verification.exact and pipeline.verification.max_abs_diff == 0

    whole = _load(backends, model)
    loaded = []
    for k, seg in enumerate(pipeline.segments):
        manifest = seg.manifest
        assert manifest.name == f"{stem}.seg{k}"
        assert manifest.file == f"{stem}.seg{k}{suffix}"
        data = (directory / manifest.file).read_bytes()
        assert manifest.size == len(data)
        assert manifest.sha256 == hashlib.sha256(data).hexdigest()
        part = _load(backends, directory / manifest.file)
        assert (part.inputs, part.outputs) == (manifest.inputs, manifest.outputs)
        assert seg.latency_ms is not None and seg.latency_ms > 0
        loaded.append(part)
    first, last = pipeline.segments[0], pipeline.segments[-1]
    assert first.manifest.inputs == whole.inputs  # the model's order, quantization included
    assert last.manifest.outputs == whole.outputs
    assert first.ops[0] == 0
    for before, after in zip(pipeline.segments, pipeline.segments[1:], strict=False):
        assert before.ops[1] == after.ops[0] and before.ops[0] < before.ops[1]
        assert before.manifest.outputs == after.manifest.inputs  # names, dtypes, shapes

    for feed in inputs:
        want = whole.run(feed)
        got = _chain(loaded, whole, feed)
        for spec, expected in zip(whole.outputs, want, strict=True):
            assert got[spec.name].dtype == expected.dtype
            assert np.array_equal(got[spec.name], expected), spec.name
    return loaded


# ---- committed models ---------------------------------------------------------------------


@pytest.mark.parametrize("segments", [2, 3])
def test_mobilenet_segments_chain_bitwise(
    segments: int, backends: dict[str, Backend], split: Splitter
) -> None:
    images = _random_images(2)
    pipeline, directory = split(MOBILENET, segments, images)
    assert pipeline.verification.inputs == RANDOM_INPUTS + 2
    _check_split(backends, MOBILENET, pipeline, directory, images, segments)


@pytest.mark.parametrize("segments", [2, 3])
@pytest.mark.parametrize("kind", list(DIGITS))
def test_digits_segments_chain_bitwise_on_held_out_set(
    kind: str, segments: int, backends: dict[str, Backend], split: Splitter
) -> None:
    model = DIGITS[kind]
    held_out = _held_out(model)
    pipeline, directory = split(model, segments, held_out)
    assert pipeline.verification.inputs == RANDOM_INPUTS + len(held_out) == RANDOM_INPUTS + 360
    _check_split(backends, model, pipeline, directory, held_out, segments)
    # the first segment takes images as the whole model does; the last keeps the labels
    first, last = pipeline.segments[0].manifest, pipeline.segments[-1].manifest
    assert first.preprocessing is not None and last.labels == [str(d) for d in range(10)]


def test_cuts_follow_measured_cost_not_operator_count(split: Splitter) -> None:
    """MobileNetV2's run time is front-loaded (large early activations) while its weights
    are back-loaded: the latency-balanced cut comes well before the middle operator, and
    the first segment holds a small fraction of the weights."""
    pipeline, _ = split(MOBILENET, 2, _random_images(2))
    first, second = pipeline.segments
    assert first.ops[1] < MOBILENET_OPS // 2
    assert first.ops[1] - first.ops[0] < second.ops[1] - second.ops[0]
    assert first.weights_bytes * 10 < second.weights_bytes
    assert pipeline.profile_threads == 1


def test_max_segment_mb_moves_the_cut(tmp_path: Path, backends: dict[str, Backend]) -> None:
    images = _random_images(1)
    pipeline = split_model(MOBILENET, 2, tmp_path, max_segment_mb=2.5, samples=images)
    assert all(seg.manifest.size <= 2_500_000 for seg in pipeline.segments)
    # with the weights at the back, only a late cut leaves the tail under the cap
    assert pipeline.segments[0].ops[1] > MOBILENET_OPS // 2
    _check_split(backends, MOBILENET, pipeline, tmp_path, images, 2)


def test_cut_where_two_tensors_cross(tmp_path: Path, backends: dict[str, Backend]) -> None:
    """Inside a residual block the skip tensor crosses too: allowed with max_crossing=2
    (and by default), refused with 1."""
    with pytest.raises(SplitError, match="2 tensors cross it"):
        split_model(MOBILENET, 2, tmp_path, at=[16], max_crossing=1)
    pipeline = split_model(MOBILENET, 3, tmp_path, at=[16, 20], max_crossing=2)
    assert [len(seg.manifest.outputs) for seg in pipeline.segments] == [2, 2, 1]
    _check_split(backends, MOBILENET, pipeline, tmp_path, _random_images(1), 3)


@pytest.mark.parametrize(
    ("model", "segments", "options", "says"),
    [
        (MOBILENET, 40, {"max_crossing": 1}, "36 of the 66 positions between operators are valid"),
        (MOBILENET, 40, {"max_crossing": 1}, "--max-crossing 2 would allow it"),
        (MOBILENET, 2, {"max_segment_mb": 1.0}, "operator 64 (FULLY_CONNECTED) alone holds"),
        (MOBILENET, 2, {"max_segment_mb": 2.0}, "no 2 segments of at most 2 MB each"),
        (MOBILENET, 2, {"max_crossing": 0}, "expected 1 or more tensors"),
        (MOBILENET, 1, {}, "segments: expected 2 or more, got 1"),
        (MOBILENET, 3, {"at": [20, 10]}, "expected increasing positions"),
        (MOBILENET, 3, {"at": [10]}, "3 segments need 2 cut position(s), 1 were given"),
        (DIGITS["int8"], 10, {}, "has 9 operators: it cannot be cut into 10 segments"),
        (MODELS / "digits" / "missing.tflite", 2, {}, "no such model file"),
        (MODELS / "digits" / "digits.json", 2, {}, "cannot tell the model format"),
    ],
)
def test_impossible_requests_are_refused(
    model: Path, segments: int, options: dict[str, object], says: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    with pytest.raises(SplitError) as e:
        split_model(model, segments, out, **options)  # type: ignore[arg-type]
    assert says in str(e.value)
    assert not out.exists()


def test_edgetpu_model_is_refused(tmp_path: Path) -> None:
    compiled = tmp_path / "digits_int8_edgetpu.tflite"
    shutil.copy(DIGITS["int8"], compiled)
    with pytest.raises(SplitError, match=r"compiled for the Edge TPU.*Split the CPU \.tflite"):
        split_model(compiled, 2, tmp_path / "out")


# ---- verification -----------------------------------------------------------------------


def test_tampered_segment_fails_verification(tmp_path: Path, split: Splitter) -> None:
    from ai_edge_litert.tools import flatbuffer_utils

    model = DIGITS["f32"]
    held_out = _held_out(model)
    pipeline, directory = split(model, 2, held_out)
    files = [directory / seg.manifest.file for seg in pipeline.segments]
    verified = verify_files(model, files, samples=held_out[:50])
    assert verified.exact and verified.inputs == RANDOM_INPUTS + 50

    tampered = tmp_path / files[0].name
    segment = flatbuffer_utils.read_model(str(files[0]))
    heaviest = max(segment.buffers[1:], key=lambda b: 0 if b.data is None else len(b.data))
    weights = np.frombuffer(bytes(heaviest.data), np.float32).copy()
    weights[: len(weights) // 2] *= 1.5
    heaviest.data = np.frombuffer(weights.tobytes(), np.uint8)
    tampered.write_bytes(bytes(flatbuffer_utils.convert_object_to_bytearray(segment)))
    with pytest.raises(SplitError, match=r"verification failed .* expected bitwise equality"):
        verify_files(model, [tampered, files[1]], samples=held_out[:50])


# ---- ONNX graphs built here: several inputs, outputs and crossing tensors -----------------


def _onnx(
    path: Path,
    nodes: list[tuple[str, list[str], str]],
    inputs: list[str],
    outputs: list[str],
) -> Path:
    """A float32 [1, 4] graph of one-output nodes (op, inputs, output), weight 'w' = 0.5."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node(op, ins, [out]) for op, ins, out in nodes],
        "g",
        [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1, 4]) for n in inputs],
        [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1, 4]) for n in outputs],
        initializer=[onnx.helper.make_tensor("w", onnx.TensorProto.FLOAT, [1, 4], [0.5] * 4)],
    )
    model = onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8
    )
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_onnx_two_inputs_two_outputs(tmp_path: Path, backends: dict[str, Backend]) -> None:
    model = _onnx(
        tmp_path / "two.onnx",
        [
            ("Add", ["a", "b"], "s"),
            ("Mul", ["s", "w"], "m"),
            ("Relu", ["m"], "r"),
            ("Sigmoid", ["r"], "o1"),
            ("Neg", ["r"], "o2"),
        ],
        ["a", "b"],
        ["o2", "o1"],
    )
    rng = np.random.default_rng(1)
    samples = [[rng.normal(size=(1, 4)).astype(np.float32) for _ in "ab"] for _ in range(5)]
    pipeline = split_model(model, 3, tmp_path / "out", samples=samples)
    parts = _check_split(backends, model, pipeline, tmp_path / "out", samples, 3)
    assert [s.name for s in parts[0].inputs] == ["a", "b"]
    assert [s.name for s in parts[-1].outputs] == ["o2", "o1"]
    # no cut between the two outputs: o1 would have to pass through the last segment
    assert 4 not in [seg.ops[0] for seg in pipeline.segments]


def test_onnx_two_tensors_cross(tmp_path: Path, backends: dict[str, Backend]) -> None:
    model = _onnx(
        tmp_path / "skip.onnx",
        [
            ("Relu", ["a"], "x"),
            ("Sigmoid", ["x"], "y"),
            ("Add", ["x", "y"], "z"),
            ("Neg", ["z"], "o"),
        ],
        ["a"],
        ["o"],
    )
    with pytest.raises(SplitError, match=r"cannot cut at 2: 2 tensors cross it \('x', 'y'\)"):
        split_model(model, 2, tmp_path / "out", at=[2], max_crossing=1)
    pipeline = split_model(model, 2, tmp_path / "out", at=[2], max_crossing=2)
    assert [s.name for s in pipeline.segments[1].manifest.inputs] == ["x", "y"]
    rng = np.random.default_rng(2)
    _check_split(
        backends,
        model,
        pipeline,
        tmp_path / "out",
        [[rng.normal(size=(1, 4)).astype(np.float32)] for _ in range(3)],
        2,
    )


@pytest.mark.parametrize(
    ("nodes", "inputs", "outputs", "says"),
    [
        (  # b is only read by the last node: segment 0 would have to pass it through
            [("Relu", ["a"], "s"), ("Sigmoid", ["s"], "t"), ("Add", ["t", "b"], "o")],
            ["a", "b"],
            ["o"],
            "model input 'b' is still read by operator 2",
        ),
        (  # o1 is made first: the segments after it would have to pass it through
            [
                ("Relu", ["a"], "x"),
                ("Neg", ["x"], "o1"),
                ("Sigmoid", ["x"], "y"),
                ("Abs", ["y"], "o2"),
            ],
            ["a"],
            ["o1", "o2"],
            "model output 'o1' is made by operator 1",
        ),
    ],
)
def test_onnx_pass_through_is_refused_with_reason(
    nodes: list[tuple[str, list[str], str]],
    inputs: list[str],
    outputs: list[str],
    says: str,
    tmp_path: Path,
) -> None:
    model = _onnx(tmp_path / "m.onnx", nodes, inputs, outputs)
    with pytest.raises(SplitError) as e:
        split_model(model, 3, tmp_path / "out", max_crossing=1)
    assert "valid cuts" in str(e.value) and says in str(e.value)


# ---- command line and temporary splits ----------------------------------------------------


def test_cli_prints_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    samples = [arg for png in SAMPLE_PNGS[:2] for arg in ("--sample", str(png))]
    code = main([str(DIGITS["int8"]), "--segments", "2", "-o", str(tmp_path), *samples])
    out = capsys.readouterr().out
    assert code == 0
    assert "digits_int8.tflite: 2 segments, cuts chosen by latency measured with 1 thread" in out
    assert f"verified with litert on {RANDOM_INPUTS + 2} inputs: outputs bitwise equal" in out
    lines = out.splitlines()
    assert lines[1].split()[:6] == ["segment", "ops", "size", "weights", "latency", "passes"]
    assert lines[2].startswith("0 ") and " int8 [" in lines[2]
    for name in ("digits_int8.seg0.tflite", "digits_int8.seg1.tflite", "digits_int8.pipeline.json"):
        assert (tmp_path / name).is_file() and name in out


def test_cli_explicit_cuts_through_mqinfer_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = mqinfer.cli.main(["split", str(DIGITS["onnx"]), "--at", "5,10", "-o", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "digits.onnx: 3 segments, cuts as given" in out
    assert "0-5" in out and "5-10" in out and "10-13" in out
    assert "'/0/0.4/MaxPool_output_0' float32 [1,32,4,4] 2048 B" in out


def test_cli_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    compiled = tmp_path / "m_edgetpu.tflite"
    shutil.copy(DIGITS["int8"], compiled)
    assert main([str(compiled), "--segments", "2"]) == 2
    assert "mqinfer split: m_edgetpu.tflite is compiled for the Edge TPU" in capsys.readouterr().err
    assert (
        main([str(MOBILENET), "--segments", "40", "--max-crossing", "1", "-o", str(tmp_path / "o")])
        == 2
    )
    assert "39 are needed" in capsys.readouterr().err
    for argv, says in [
        ([str(MOBILENET), "--segments", "1"], "--segments: expected 2 or more, got 1"),
        ([str(MOBILENET)], "--segments N is required"),
        ([str(MOBILENET), "--at", "x"], "--at: expected operator positions"),
        ([str(MOBILENET), "--segments", "2", "--threads", "0"], "--threads: expected 1 or more"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert says in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_split_temporarily_cleans_up() -> None:
    with split_temporarily(DIGITS["onnx"], 2) as (pipeline, directory):
        files = [directory / seg.manifest.file for seg in pipeline.segments]
        assert all(f.is_file() for f in files)
        assert (directory / "digits.pipeline.json").is_file()
        assert pipeline.name == "digits-onnx"  # from the manifest beside the model
    assert not directory.exists()


def test_onnx_differences_within_tolerance_are_recorded(tmp_path: Path, split: Splitter) -> None:
    model = DIGITS["onnx"]
    held_out = _held_out(model)
    pipeline, directory = split(model, 2, held_out)
    files = [directory / seg.manifest.file for seg in pipeline.segments]
    assert pipeline.verification.exact and pipeline.verification.tolerance > 0

    def scaled(factor: float) -> Path:
        segment = onnx.load(str(files[0]))
        weight = max(segment.graph.initializer, key=lambda t: len(t.raw_data))
        values = onnx.numpy_helper.to_array(weight) * np.float32(factor)
        weight.CopyFrom(onnx.numpy_helper.from_array(values.astype(np.float32), weight.name))
        path = tmp_path / f"scaled{factor}.onnx"
        onnx.save(segment, str(path))
        return path

    close = verify_files(model, [scaled(1 + 1e-7), files[1]], samples=held_out[:50])
    assert not close.exact and 0 < close.max_abs_diff <= close.tolerance
    with pytest.raises(SplitError, match=r"differs .* by up to .*; expected at most"):
        verify_files(model, [scaled(1.01), files[1]], samples=held_out[:50])


def _with_metadata(tmp_path: Path) -> Path:
    """digits_f32.tflite with the metadata published models carry: a runtime-version entry,
    a TFLITE_METADATA entry describing the whole model, and the deprecated list of metadata
    buffers pointing past the end of the buffers, as converters often leave it."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(DIGITS["f32"]))
    entries = []
    for name, data in (("min_runtime_version", b"1.5.0"), ("TFLITE_METADATA", b"whole model")):
        buffer = schema.BufferT()
        buffer.data = np.frombuffer(data, np.uint8).copy()
        model.buffers.append(buffer)
        entry = schema.MetadataT()
        entry.name, entry.buffer = name, len(model.buffers) - 1
        entries.append(entry)
    model.metadata = entries
    model.metadataBuffer = [len(model.buffers) + 100, len(model.buffers) + 101]
    path = tmp_path / "digits_meta.tflite"
    path.write_bytes(bytes(flatbuffer_utils.convert_object_to_bytearray(model)))
    return path


def test_tflite_metadata_is_kept_alike_in_every_segment(
    tmp_path: Path, backends: dict[str, Backend]
) -> None:
    from ai_edge_litert.tools import flatbuffer_utils

    model = _with_metadata(tmp_path)
    for segments in (2, 3):
        out = tmp_path / f"out{segments}"
        pipeline = split_model(model, segments, out)
        _check_split(backends, model, pipeline, out, _random_f32(model, backends), segments)
        for seg in pipeline.segments:
            part = flatbuffer_utils.read_model(str(out / seg.manifest.file))
            kept = {
                entry.name.decode(): bytes(part.buffers[entry.buffer].data)
                for entry in part.metadata
            }
            # the runtime's requirements stay; the description of the whole model's tensors
            # would be wrong for a segment
            assert kept == {"min_runtime_version": b"1.5.0"}
            assert list(part.metadataBuffer) == [entry.buffer for entry in part.metadata]


def _random_f32(model: Path, backends: dict[str, Backend]) -> Inputs:
    whole = _load(backends, model)
    rng = np.random.default_rng(3)
    return [[rng.random(whole.inputs[0].shape, dtype=np.float32)] for _ in range(3)]


def _rank_unknown_onnx(path: Path) -> Path:
    """x -> Relu -> Reshape to a shape sliced by a data-dependent start -> Sigmoid -> Relu:
    ONNX shape inference cannot tell the rank of what Reshape makes."""
    import onnx.shape_inference

    tensor = onnx.TensorProto
    nodes = [
        onnx.helper.make_node("Relu", ["x"], ["a"]),
        onnx.helper.make_node("Shape", ["a"], ["s"]),
        onnx.helper.make_node("ArgMax", ["a"], ["am"], axis=1, keepdims=0),
        onnx.helper.make_node("Mul", ["am", "zero"], ["start"]),
        onnx.helper.make_node("Slice", ["s", "start", "two"], ["s2"]),
        onnx.helper.make_node("Reshape", ["a", "s2"], ["b"]),
        onnx.helper.make_node("Sigmoid", ["b"], ["c"]),
        onnx.helper.make_node("Relu", ["c"], ["y"]),
    ]
    graph = onnx.helper.make_graph(
        nodes,
        "rank_unknown",
        [onnx.helper.make_tensor_value_info("x", tensor.FLOAT, [1, 4])],
        [onnx.helper.make_tensor_value_info("y", tensor.FLOAT, None)],
        [
            onnx.numpy_helper.from_array(np.array([0], np.int64), "zero"),
            onnx.numpy_helper.from_array(np.array([2], np.int64), "two"),
        ],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    inferred = onnx.shape_inference.infer_shapes(model)
    made = {v.name: v for v in inferred.graph.value_info}
    assert not made["c"].type.tensor_type.HasField("shape")
    onnx.save(model, str(path))
    return path


def test_onnx_tensor_of_unknown_rank_can_cross_a_cut(
    tmp_path: Path, backends: dict[str, Backend]
) -> None:
    model = _rank_unknown_onnx(tmp_path / "rank_unknown.onnx")
    pipeline = split_model(model, 2, tmp_path / "out", at=[7])
    second = pipeline.segments[1].manifest
    assert [(t.name, t.dtype, t.shape) for t in second.inputs] == [("c", "float32", [-1, -1])]
    parts = [_load(backends, tmp_path / "out" / seg.manifest.file) for seg in pipeline.segments]
    whole = _load(backends, model)
    feed = [np.random.default_rng(5).random((1, 4), dtype=np.float32)]
    np.testing.assert_array_equal(_chain(parts, whole, feed)["y"], whole.run(feed)[0])


# ---- several tensors crossing, model inputs and outputs passed through ---------------------

LATE_INPUT = (  # b is only read by the last node; o1 is made before the end
    [
        ("Relu", ["a"], "s"),
        ("Neg", ["s"], "o1"),
        ("Sigmoid", ["s"], "t"),
        ("Abs", ["t"], "u"),
        ("Add", ["u", "b"], "o2"),
    ],
    ["a", "b"],
    ["o1", "o2"],
)


@pytest.mark.parametrize("max_crossing", [None, 3])
def test_model_input_and_output_pass_through_segments(
    tmp_path: Path, backends: dict[str, Backend], max_crossing: int | None
) -> None:
    model = _onnx(tmp_path / "late.onnx", *LATE_INPUT)
    rng = np.random.default_rng(4)
    samples = [[rng.normal(size=(1, 4)).astype(np.float32) for _ in "ab"] for _ in range(3)]
    pipeline = split_model(model, 3, tmp_path / "out", max_crossing=max_crossing)
    parts = _check_split(backends, model, pipeline, tmp_path / "out", samples, 3)
    # every segment but the last hands b on unused; o1, once made, is handed on to the end
    for part in parts[:-1]:
        assert "b" in [s.name for s in part.inputs] and "b" in [s.name for s in part.outputs]
    made_o1 = next(k for k, seg in enumerate(pipeline.segments) if seg.ops[0] <= 1 < seg.ops[1])
    for part in parts[made_o1 + 1 :]:
        assert "o1" in [s.name for s in part.inputs] and "o1" in [s.name for s in part.outputs]


def test_explicit_cuts_pass_through_with_more_crossing(
    tmp_path: Path, backends: dict[str, Backend]
) -> None:
    model = _onnx(tmp_path / "late.onnx", *LATE_INPUT)
    with pytest.raises(SplitError, match="model input 'b' is still read by operator 4"):
        split_model(model, 2, tmp_path / "out", at=[3], max_crossing=1)
    pipeline = split_model(model, 3, tmp_path / "out", at=[2, 3], max_crossing=3)
    assert [[s.name for s in seg.manifest.outputs] for seg in pipeline.segments] == [
        ["b", "s", "o1"],
        ["b", "o1", "t"],
        ["o1", "o2"],
    ]
    rng = np.random.default_rng(6)
    samples = [[rng.normal(size=(1, 4)).astype(np.float32) for _ in "ab"] for _ in range(3)]
    _check_split(backends, model, pipeline, tmp_path / "out", samples, 3)


def test_cli_auto_crossing_reports_what_crosses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _onnx(tmp_path / "late.onnx", *LATE_INPUT)
    one = ["--max-crossing", "1"]
    assert main([str(model), "--segments", "2", *one, "-o", str(tmp_path / "refused")]) == 2
    assert "model input 'b' is still read by operator 4" in capsys.readouterr().err
    code = main([str(model), "--segments", "2", "-o", str(tmp_path)])  # auto, the default
    out = capsys.readouterr().out
    assert code == 0
    said = re.search(
        r"^cut 1 \(before operator \d\): (\d) tensors cross, (\d+) B per request; "
        r"segment 0 passes on unused: (.*)$",
        out,
        re.MULTILINE,
    )
    assert said is not None, out
    crossing, nbytes, passed = int(said[1]), int(said[2]), said[3]
    assert crossing >= 2 and nbytes == crossing * 16  # float32 [1, 4] each
    assert "'b'" in passed.split(", ")
    with pytest.raises(SystemExit):
        main([str(model), "--segments", "2", "--max-crossing", "some"])
    assert "expected a number of tensors or 'auto', got 'some'" in capsys.readouterr().err


def test_auto_crossing_prefers_cuts_where_one_tensor_crosses() -> None:
    """On MobileNetV2's graph with run time proportional to the operators, a cut where one
    tensor crosses balances within BALANCE_SLACK and is kept; with the work in two operators
    inside a residual block, the cut between them, where two tensors cross, is taken."""
    from mqinfer.split.cuts import _analyse
    from mqinfer.split.graph import _read_graph
    from mqinfer.split.plan import _balanced_plan, _Costs

    g = _read_graph(MOBILENET)
    cuts = _analyse(g, None)
    costs = _Costs(g, cuts)
    positions = [0, *cuts.valid(g.n), g.n]
    several = [c for c in cuts.valid(g.n) if len(cuts.live[c]) > 1]
    assert several and len(cuts.single(g.n)) == 36

    costs.latency = {c: float(c) for c in range(g.n + 1)}
    plan = _balanced_plan(positions, 2, costs, cuts.chainable)
    assert plan is not None and len(cuts.live[plan[1]]) == 1

    inside = next(c for c in several if c - 1 in several and c + 1 in several)
    step = {c: 0.0 if c < inside else 1.0 if c == inside else 2.0 for c in positions}
    costs.latency = {c: 100.0 * v for c, v in step.items()}  # ms: far above any transfer
    assert _balanced_plan(positions, 2, costs, cuts.chainable) == [0, inside, g.n]


@pytest.mark.parametrize("model", [DIGITS["f32"], DIGITS["onnx"]])
def test_a_segment_passes_its_input_on_unchanged(
    model: Path, tmp_path: Path, backends: dict[str, Backend]
) -> None:
    """What a segment does with a tensor a later segment reads: the same tensor is among
    its inputs and its outputs, and comes out bitwise as it went in."""
    from mqinfer.split.cuts import _analyse
    from mqinfer.split.graph import _read_graph

    g = _read_graph(model)
    cuts = _analyse(g, None)
    c = cuts.single(g.n)[0]
    path = tmp_path / f"prefix{model.suffix}"
    path.write_bytes(g.build(0, c, g.inputs, [*g.inputs, *cuts.order[c]]))
    prefix, whole = _load(backends, path), _load(backends, model)
    assert prefix.outputs[0].name == whole.inputs[0].name
    x = np.random.default_rng(8).random(
        [d if d > 0 else 1 for d in whole.inputs[0].shape], dtype=np.float32
    )
    passed, made = prefix.run([x])
    np.testing.assert_array_equal(passed, x)
    assert made.shape == tuple(d if d > 0 else 1 for d in prefix.outputs[1].shape)


class _Refusing:
    """A runtime backend that cannot load the prefix cut at `position` (as LiteRT's XNNPACK
    cannot set up some graphs that pass a model input straight through)."""

    def __init__(self, inner: Backend, position: int) -> None:
        self.inner, self.position = inner, position
        self.key, self.formats, self.device = inner.key, inner.formats, inner.device

    def load(self, path: str, threads: int, device: str | None = None) -> Any:
        if Path(path).name.startswith(f"prefix{self.position}."):
            raise RuntimeFailure("failed to setup XNNPACK runtime")
        return self.inner.load(path, threads, device)


def test_a_cut_whose_prefix_the_runtime_cannot_run_is_not_chosen(
    tmp_path: Path, backends: dict[str, Backend], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the runtime refuses the model cut at a position, the split measures the
    others and cuts elsewhere, still exact."""
    first = split_model(MOBILENET, 2, tmp_path / "a")
    chosen = first.segments[0].ops[1]
    refusing = _Refusing(backends["tflite"], chosen)
    monkeypatch.setattr("mqinfer.split.splitter._backend", lambda fmt: refusing)
    pipeline = split_model(MOBILENET, 2, tmp_path / "b")
    assert pipeline.segments[0].ops[1] != chosen
    _check_split(backends, MOBILENET, pipeline, tmp_path / "b", _random_images(1), 2)
