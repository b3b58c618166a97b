"""Service spec files and the model files they name."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from mqinfer.servicefile import SpecFileError, load_spec_file, model_format, service_spec

REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO / "models" / "digits"
MODEL = DIGITS / "digits_int8.tflite"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def with_model(tmp_path: Path, name: str = "digits_int8.tflite") -> Path:
    """A copy of the digits model, without its manifest."""
    return Path(shutil.copy(MODEL, tmp_path / name))


def test_the_digits_service_file() -> None:
    spec, model = load_spec_file(DIGITS / "service.yaml")
    assert (spec.name, spec.model, spec.replicas) == ("digits", "digits_int8.tflite", 2)
    assert (spec.deadline_ms, spec.workers, spec.threads, spec.queue) == (10_000, 1, 1, 128)
    assert model.path == MODEL.resolve()
    assert model.format == "tflite"
    assert model.data == MODEL.read_bytes()
    assert model.sha256 == hashlib.sha256(MODEL.read_bytes()).hexdigest()
    assert model.manifest is not None
    assert model.manifest.sha256 == model.sha256
    assert model.manifest.file == "digits_int8.tflite"


def test_service_spec_fills_in_the_artifact() -> None:
    spec, model = load_spec_file(DIGITS / "service.yaml")
    wire = service_spec(spec, model, revision="rev-7")
    assert wire.name == "digits"
    assert wire.model == "digits_int8.tflite"
    assert wire.artifact == hashlib.sha256(MODEL.read_bytes()).hexdigest()
    assert wire.format == "tflite"
    assert wire.size == MODEL.stat().st_size
    assert wire.revision == "rev-7"
    assert wire.replicas == 2
    assert wire.manifest == model.manifest


def test_optional_fields_and_constraints(tmp_path: Path) -> None:
    with_model(tmp_path)
    path = write(
        tmp_path / "svc.yaml",
        "name: d.v2\nmodel: digits_int8.tflite\nreplicas: 0\ndeadline_ms: 500\n"
        "workers: 2\nthreads: 3\nqueue: 7\n"
        "constraints: {accelerator: cpu, labels: {zone: lab}}\n",
    )
    spec, model = load_spec_file(path)
    assert model.manifest is None  # no manifest beside this copy
    wire = service_spec(spec, model, "r")
    assert (wire.name, wire.replicas, wire.deadline_ms) == ("d.v2", 0, 500)
    assert (wire.workers, wire.threads, wire.queue) == (2, 3, 7)
    assert wire.constraints.accelerator == "cpu"
    assert wire.constraints.labels == {"zone": "lab"}


def test_json_is_read_too(tmp_path: Path) -> None:
    with_model(tmp_path)
    path = write(tmp_path / "svc.json", '{"name": "digits", "model": "digits_int8.tflite"}')
    spec, _ = load_spec_file(path)
    assert (spec.name, spec.replicas) == ("digits", 1)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: digits\nmodel: digits_int8.tflite\nreplica: 2\n", "field 'replica': Extra"),
        ("name: bad name\nmodel: digits_int8.tflite\n", "field 'name'"),
        ("name: bad/name\nmodel: digits_int8.tflite\n", "invalid service name 'bad/name'"),
        ("model: digits_int8.tflite\n", "field 'name': Field required"),
        ("name: d\nmodel: digits_int8.tflite\nreplicas: -1\n", "field 'replicas'"),
        (
            "name: d\nmodel: digits_int8.tflite\nconstraints: {accelerator: tpu}\n",
            "field 'constraints.accelerator'",
        ),
        ("- name: digits\n- model: x\n", "expected a mapping with name, model, replicas"),
        ("just a string\n", "expected a mapping"),
        ("", "expected a mapping"),
        ("name: [unclosed\n", "not YAML or JSON"),
    ],
)
def test_spec_errors_name_the_problem(tmp_path: Path, text: str, expected: str) -> None:
    with_model(tmp_path)
    path = write(tmp_path / "svc.yaml", text)
    with pytest.raises(SpecFileError) as info:
        load_spec_file(path)
    assert expected in str(info.value)
    assert str(path) in str(info.value)


def test_missing_spec_file(tmp_path: Path) -> None:
    with pytest.raises(SpecFileError, match="No such file"):
        load_spec_file(tmp_path / "nope.yaml")


def test_missing_model_file(tmp_path: Path) -> None:
    path = write(tmp_path / "svc.yaml", "name: digits\nmodel: gone.tflite\n")
    with pytest.raises(SpecFileError) as info:
        load_spec_file(path)
    assert "gone.tflite" in str(info.value)
    assert "No such file" in str(info.value)


def test_a_file_that_is_not_a_model(tmp_path: Path) -> None:
    write(tmp_path / "weights.bin", "x")
    path = write(tmp_path / "svc.yaml", "name: digits\nmodel: weights.bin\n")
    with pytest.raises(SpecFileError, match=r"weights\.bin: not a model file"):
        load_spec_file(path)


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("m.tflite", "tflite"),
        ("M.TFLITE", "tflite"),
        ("m_edgetpu.tflite", "edgetpu_tflite"),
        ("m.onnx", "onnx"),
    ],
)
def test_model_format_from_the_suffix(name: str, fmt: str) -> None:
    assert model_format(Path(name)) == fmt


def test_a_manifest_for_other_bytes_is_refused(tmp_path: Path) -> None:
    with_model(tmp_path)
    manifest = json.loads((DIGITS / "digits_int8.json").read_text())
    manifest["sha256"] = "00" * 32
    write(tmp_path / "digits_int8.json", json.dumps(manifest))
    path = write(tmp_path / "svc.yaml", "name: digits\nmodel: digits_int8.tflite\n")
    with pytest.raises(SpecFileError) as info:
        load_spec_file(path)
    message = str(info.value)
    assert "digits_int8.json" in message
    assert "manifest sha256 000000000000 does not match digits_int8.tflite" in message


def test_a_model_changed_after_its_manifest_is_refused(tmp_path: Path) -> None:
    model = with_model(tmp_path)
    shutil.copy(DIGITS / "digits_int8.json", tmp_path / "digits_int8.json")
    model.write_bytes(model.read_bytes() + b"\0")
    path = write(tmp_path / "svc.yaml", "name: digits\nmodel: digits_int8.tflite\n")
    with pytest.raises(SpecFileError, match="does not match"):
        load_spec_file(path)


def test_a_manifest_that_is_not_json(tmp_path: Path) -> None:
    with_model(tmp_path)
    write(tmp_path / "digits_int8.json", "{not json")
    path = write(tmp_path / "svc.yaml", "name: digits\nmodel: digits_int8.tflite\n")
    with pytest.raises(SpecFileError, match="not a valid manifest"):
        load_spec_file(path)


def test_an_edgetpu_model_beside_its_cpu_model_and_manifest(tmp_path: Path) -> None:
    # The usual layout: m.tflite with its manifest m.json, and the compiled m_edgetpu.tflite.
    shutil.copy(MODEL, tmp_path / "m.tflite")
    shutil.copy(DIGITS / "digits_int8.json", tmp_path / "m.json")
    edgetpu = tmp_path / "m_edgetpu.tflite"
    edgetpu.write_bytes(MODEL.read_bytes() + b"compiled")
    path = write(tmp_path / "svc.yaml", "name: m\nmodel: m_edgetpu.tflite\n")
    _, model = load_spec_file(path)
    assert model.format == "edgetpu_tflite"
    assert model.manifest is None
