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
    queue: 32                    # optional: queued requests per replica before 'busy'

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

from protocol import messages as m
from protocol.manifest import Manifest, format_of
from protocol.topics import check_id


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
    queue: int = Field(32, ge=1, le=100_000, description="Queued requests per replica")

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


def load_spec_file(path: Path) -> tuple[ServiceFile, ModelFile]:
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
    return spec, read_model((path.parent / spec.model).resolve())


def service_spec(spec: ServiceFile, model: ModelFile, revision: str) -> m.ServiceSpec:
    return m.ServiceSpec(
        name=spec.name,
        model=model.path.name,
        artifact=model.sha256,
        format=model.format,
        size=len(model.data),
        replicas=spec.replicas,
        constraints=spec.constraints,
        deadline_ms=spec.deadline_ms,
        workers=spec.workers,
        threads=spec.threads,
        queue=spec.queue,
        manifest=model.manifest,
        revision=revision,
    )
