"""The interface every runtime backend implements, and what they share.

A `Backend` loads model files of its formats into `Model`s. One `Model` is one
interpreter or session: it is not thread-safe, so each inference worker thread loads its
own. Inputs and outputs are described as the runtime reports them, with the
`protocol.manifest.TensorInfo` a manifest uses, so the two can be compared.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from mqinfer.protocol.manifest import TensorInfo


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

    def load(self, path: str, threads: int) -> Model:
        """Load the model file at `path`; raises RuntimeFailure when the runtime refuses it."""
        ...


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
