"""Service spec files (YAML or JSON) and model files with their manifests.

    name: digits                 # service name: 1-64 of A-Z a-z 0-9 _ - .
    model: digits_int8.tflite    # relative to this file; .tflite, _edgetpu.tflite or .onnx
    replicas: 2
    constraints:                 # optional
      accelerator: cpu           # only nodes with this accelerator kind
      labels: {zone: lab}        # only nodes whose labels include these
    deadline_ms: 10000           # optional: every request is answered within this
    workers: 1                   # optional: interpreters (threads) per replica
    threads: 1                   # optional: runtime threads per interpreter
    queue: 128                   # optional: waiting requests per replica before 'busy'
    segments: 2                  # optional: split the model into a pipeline of 2-8 stages
    max_segment_mb: 4            # optional (with segments): largest segment file

`model` may also name a pipeline manifest written by `mqinfer split`
(``m.pipeline.json``): its segments are deployed as they are.

A manifest with the model's name and `.json` instead of `.tflite` / `.onnx` beside the
model is picked up by itself (m_edgetpu.tflite -> m_edgetpu.json).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import orjson
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mqinfer.protocol import messages as m
from mqinfer.protocol.manifest import Manifest, Pipeline, format_of
from mqinfer.protocol.topics import check_id


class SpecFileError(ValueError):
    """A spec or model file that cannot be deployed, with what to fix."""


class ServiceFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Service name")
    model: str = Field(description="Model file, relative to the spec file")
    replicas: int = Field(1, ge=0, description="Replicas to run")
    constraints: m.Constraints = Field(default_factory=m.Constraints)
    deadline_ms: int = Field(10_000, gt=0, description="Answer every request within this")
    workers: int = Field(1, ge=1, le=64, description="Interpreters per replica")
    threads: int = Field(1, ge=1, le=64, description="Runtime threads per interpreter")
    queue: int = Field(
        128, ge=1, le=100_000, description="Waiting requests per replica before 'busy'"
    )
    segments: int = Field(
        0, ge=0, le=8, description="Split into this many pipeline stages (0 or 1: whole model)"
    )
    max_segment_mb: float | None = Field(None, gt=0, description="Largest segment file")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_id(value, "service name")


@dataclass(frozen=True)
class ModelFile:
    path: Path
    data: bytes
    sha256: str
    format: str
    manifest: Manifest | None


def model_format(path: Path) -> str:
    try:
        return format_of(str(path))
    except ValueError:
        raise SpecFileError(
            f"{path}: not a model file; expected .tflite, _edgetpu.tflite or .onnx"
        ) from None


def read_model(path: Path) -> ModelFile:
    fmt = model_format(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SpecFileError(f"{path}: {e.strerror}") from None
    sha = hashlib.sha256(data).hexdigest()
    manifest = None
    sidecar = path.with_suffix(".json")  # m.tflite -> m.json, m_edgetpu.tflite -> m_edgetpu.json
    if sidecar.is_file():
        try:
            manifest = Manifest.model_validate(orjson.loads(sidecar.read_bytes()))
        except (orjson.JSONDecodeError, ValidationError) as e:
            raise SpecFileError(f"{sidecar}: not a valid manifest: {e}") from None
        if manifest.sha256 != sha:
            raise SpecFileError(
                f"{sidecar}: manifest sha256 {manifest.sha256[:12]} does not match "
                f"{path.name} ({sha[:12]}); rebuild the manifest or remove it"
            )
    return ModelFile(path, data, sha, fmt, manifest)


PIPELINE_SUFFIX = ".pipeline.json"


@dataclass(frozen=True)
class PipelineFiles:
    """A split model as `mqinfer split` wrote it: the manifest and each segment file."""

    path: Path
    pipeline: Pipeline
    segments: list[ModelFile]


def is_pipeline(path: Path) -> bool:
    return path.name.endswith(PIPELINE_SUFFIX)


def read_pipeline(path: Path) -> PipelineFiles:
    """Read a pipeline manifest and its segment files, checking every hash."""
    try:
        pipeline = Pipeline.model_validate(orjson.loads(path.read_bytes()))
    except OSError as e:
        raise SpecFileError(f"{path}: {e.strerror}") from None
    except (orjson.JSONDecodeError, ValidationError) as e:
        raise SpecFileError(f"{path}: not a valid pipeline manifest: {e}") from None
    segments = []
    for seg in pipeline.segments:
        file = path.parent / seg.manifest.file
        try:
            data = file.read_bytes()
        except OSError as e:
            raise SpecFileError(f"{file}: {e.strerror} (a segment of {path.name})") from None
        sha = hashlib.sha256(data).hexdigest()
        if sha != seg.manifest.sha256:
            raise SpecFileError(
                f"{file}: sha256 {sha[:12]} does not match {path.name} "
                f"({seg.manifest.sha256[:12]}); split the model again"
            )
        segments.append(ModelFile(file, data, sha, seg.manifest.format, seg.manifest))
    return PipelineFiles(path, pipeline, segments)


def whole_model(files: PipelineFiles) -> ModelFile:
    """The model a pipeline was split from, when it lies beside the manifest (for its
    manifest: preprocessing and labels); else a stand-in with the pipeline's own facts."""
    beside = files.path.parent / files.pipeline.model
    if beside.is_file():
        model = read_model(beside)
        if model.sha256 == files.pipeline.sha256:
            return model
    return ModelFile(beside, b"", files.pipeline.sha256, files.pipeline.format, None)


def read_spec_file(path: Path) -> tuple[ServiceFile, Path]:
    """The spec and the path of the model (or pipeline manifest) it names."""
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecFileError(f"{path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecFileError(f"{path}: not YAML or JSON: {e}") from None
    if not isinstance(data, dict):
        raise SpecFileError(f"{path}: expected a mapping with name, model, replicas")
    try:
        spec = ServiceFile.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(file)"
        raise SpecFileError(f"{path}: field '{where}': {first['msg']}") from None
    return spec, (path.parent / spec.model).resolve()


def load_spec_file(path: Path) -> tuple[ServiceFile, ModelFile]:
    spec, model = read_spec_file(path)
    if is_pipeline(model):
        return spec, whole_model(read_pipeline(model))
    return spec, read_model(model)


def service_spec(
    spec: ServiceFile, model: ModelFile, revision: str, pipeline: Pipeline | None = None
) -> m.ServiceSpec:
    size = sum(s.manifest.size for s in pipeline.segments) if pipeline else len(model.data)
    return m.ServiceSpec(
        name=spec.name,
        model=model.path.name,
        artifact=model.sha256,
        format=model.format,
        size=size,
        pipeline=pipeline,
        replicas=spec.replicas,
        constraints=spec.constraints,
        deadline_ms=spec.deadline_ms,
        workers=spec.workers,
        threads=spec.threads,
        queue=spec.queue,
        manifest=model.manifest,
        revision=revision,
    )
