"""The interface every runtime backend implements, and what they share.

A `Backend` loads model files of its formats into `Model`s, on one of the devices its
runtime has here ('CPU', 'GPU', 'cuda:0', 'edgetpu'). One `Model` is one interpreter or
session: it is not thread-safe, so each inference worker thread loads its own. Inputs and
outputs are described as the runtime reports them, with the `protocol.manifest.TensorInfo`
a manifest uses, so the two can be compared.

A runtime declares itself with a `RuntimeEntry` in its own module (see `registry`): its
name, the formats it runs, its probe (which devices it really reaches here) and how it
makes a backend for one of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Protocol

import numpy as np

from mqinfer.protocol.manifest import TensorInfo
from mqinfer.protocol.messages import Accelerator

CPU = "CPU"


class RuntimeFailure(Exception):
    """A runtime refused to load a model file, or raised while running one."""


class Model(Protocol):
    """One loaded model. Not thread-safe: one per worker thread."""

    inputs: list[TensorInfo]
    outputs: list[TensorInfo]

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """Arrays in the order of `inputs`; results in the order of `outputs`, as copies."""
        ...

    def close(self) -> None:
        """Release the interpreter or session; `run` fails afterwards."""
        ...


class Backend(Protocol):
    key: str  # runtime key as the capability probe names it: 'litert', 'onnxruntime', ...
    formats: tuple[str, ...]  # model formats it loads: 'tflite', 'onnx', 'edgetpu_tflite'
    device: str  # the device it loads on unless told another: 'CPU', 'GPU', 'cuda:0', ...

    def load(self, path: str, threads: int, device: str | None = None) -> Model:
        """Load the model file at `path` on `device` (None: the backend's own); raises
        RuntimeFailure when the runtime refuses the model, or does not have that device."""
        ...


def pick_device(runtime: str, device: str | None, default: str, have: Sequence[str]) -> str:
    """The device a load asked for, as the runtime spells it (case aside), `default` when
    None; RuntimeFailure naming the devices it has when it is not one of them."""
    if device is None:
        return default
    for name in have:
        if name.lower() == device.lower():
            return name
    raise RuntimeFailure(
        f"{runtime} cannot run on {device!r}: the devices it has here are {', '.join(have)}"
    )


def device_label(key: str, device: str) -> str:
    """The runtime a replica reports: the key on the CPU ('onnxruntime'), else the key and
    the device ('openvino GPU', 'onnxruntime cuda.0': a ':' is not allowed in the name)."""
    if device == CPU:
        return key
    return f"{key} {''.join(c if c.isalnum() or c in '_.-' else '.' for c in device)}"


# ---- the registry's entries -------------------------------------------------------------


@dataclass(frozen=True)
class Device:
    """One device a runtime really reaches here, and what it runs on it."""

    name: str  # as Backend.load takes it: 'CPU', 'GPU.1', 'cuda:0', 'edgetpu'
    formats: tuple[str, ...]
    # announced in the capabilities; none for the CPU (the node's one `cpu` accelerator)
    accelerators: tuple[Accelerator, ...] = ()


@dataclass(frozen=True)
class Found:
    """What a runtime's probe found: its devices (none: it can run nothing here), what the
    capabilities list as its providers, and why accelerator kinds it looked for are not
    there (kind -> reason)."""

    devices: tuple[Device, ...] = ()
    providers: tuple[str, ...] = ()
    absent: Mapping[str, str] = field(default_factory=dict)
    why_none: str = ""  # why there is no device at all
    # what the probe opened that the backends share (OpenVINO's Core)
    handle: Any = field(default=None, compare=False, repr=False)

    @property
    def names(self) -> tuple[str, ...]:
        """The devices' names, as Backend.load takes them."""
        return tuple(device.name for device in self.devices)


# probe(module, found so far by the runtimes before it) -> Found
Probe = Callable[[ModuleType, Mapping[str, Found]], Found]
# make(module, device, what the probe found) -> the backend for that device
MakeBackend = Callable[[ModuleType, Device, Found], Backend]


@dataclass(frozen=True)
class RuntimeEntry:
    """A runtime, as its module declares it; `registry` collects every module's `ENTRIES`.

    `preference` orders the runtimes (lower first): where several run a format, the
    first is preferred unless another is measured clearly faster. `explains` lists the
    accelerator kinds whose absence this runtime accounts for when it is not usable
    (the Edge TPU for the TFLite runtimes)."""

    key: str  # the name `mqinfer node --runtime` takes and the capabilities use
    module: str  # importing it proves the runtime works (it loads the native library)
    packages: tuple[str, ...]  # distributions that may provide it, preferred first
    formats: tuple[str, ...]  # model formats it runs on the CPU
    preference: int
    probe: Probe
    backend: MakeBackend
    explains: tuple[str, ...] = ()
    # how such an absence is put when no runtime that explains it is usable: given why
    # they are not ('litert does not import: ...'), the reason ('no Edge TPU seen; ...')
    unexplained: Callable[[str], str] | None = None


def concrete_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """A shape with every dynamic (-1) dimension taken as 1."""
    return tuple(1 if dim < 0 else dim for dim in shape)


def warm_up(model: Model) -> list[np.ndarray]:
    """Run the model once on zeros shaped like its inputs (dynamic dimensions as 1).

    The first run allocates and plans; doing it before a model is announced ready keeps
    that cost out of the first request.
    """
    zeros = [np.zeros(concrete_shape(spec.shape), np.dtype(spec.dtype)) for spec in model.inputs]
    return model.run(zeros)


def check_arity(inputs: Sequence[np.ndarray], specs: Sequence[TensorInfo]) -> None:
    if len(inputs) != len(specs):
        names = ", ".join(spec.name for spec in specs)
        raise RuntimeFailure(
            f"the model takes {len(specs)} input(s) ({names}), {len(inputs)} were given"
        )


def fits(shape: Sequence[int], expected: Sequence[int]) -> bool:
    """Whether an array of `shape` fits a tensor of `expected` shape (-1: any size)."""
    return len(shape) == len(expected) and all(
        want < 0 or got == want for got, want in zip(shape, expected, strict=True)
    )


def check_inputs(
    inputs: Sequence[np.ndarray], specs: Sequence[TensorInfo], dtypes: Sequence[np.dtype[Any]]
) -> None:
    """Raise RuntimeFailure naming the first input of the wrong count, dtype or shape."""
    check_arity(inputs, specs)
    for spec, dtype, array in zip(specs, dtypes, inputs, strict=True):
        if array.dtype != dtype:
            raise RuntimeFailure(f"input {describe(spec)} cannot take a {array.dtype.name} array")
        if not fits(array.shape, spec.shape):
            got = ",".join(str(d) for d in array.shape)
            raise RuntimeFailure(f"input {describe(spec)} cannot take an array of shape [{got}]")


def describe(spec: TensorInfo) -> str:
    """'images' uint8 [1,8,8,1]."""
    return f"'{spec.name}' {spec.dtype} [{','.join(str(d) for d in spec.shape)}]"
