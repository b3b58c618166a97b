"""ONNX models on ONNX Runtime, with the execution providers the build has (CPU last)."""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np

from mqinfer.node.runtimes.base import RuntimeFailure, check_inputs
from mqinfer.node.sysinfo import one_line
from mqinfer.protocol.manifest import TensorInfo

CPU_PROVIDER = "CPUExecutionProvider"
# Listed by some builds without being a local device: it calls remote endpoints.
_NOT_LOCAL = frozenset({"AzureExecutionProvider"})

# ONNX Runtime's type strings -> numpy dtype names
DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int16)": "int16",
    "tensor(uint16)": "uint16",
    "tensor(int32)": "int32",
    "tensor(uint32)": "uint32",
    "tensor(int64)": "int64",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
}


def tensor_info(arg: Any) -> TensorInfo:
    """A TensorInfo from a session's NodeArg; dynamic dimensions (names, None) become -1."""
    dtype = DTYPES.get(str(arg.type))
    if dtype is None:
        raise RuntimeFailure(
            f"tensor '{arg.name}' has type {arg.type}; supported are {', '.join(DTYPES)}"
        )
    shape = [dim if isinstance(dim, int) and dim >= 0 else -1 for dim in arg.shape]
    return TensorInfo(name=str(arg.name), dtype=dtype, shape=shape)


def providers_in_order(available: Sequence[str]) -> list[str]:
    """The build's providers in its order of preference, CPU last, remote ones left out."""
    local = [p for p in available if p != CPU_PROVIDER and p not in _NOT_LOCAL]
    return [*local, CPU_PROVIDER]


class OnnxModel:
    """One InferenceSession. Used from one worker thread at a time."""

    def __init__(self, session: Any, path: str) -> None:
        self._session: Any = session
        self._path = path
        self.inputs = [tensor_info(arg) for arg in session.get_inputs()]
        self.outputs = [tensor_info(arg) for arg in session.get_outputs()]
        self._input_names = [spec.name for spec in self.inputs]
        self._output_names = [spec.name for spec in self.outputs]
        self._dtypes = [np.dtype(spec.dtype) for spec in self.inputs]
        self.providers: list[str] = list(session.get_providers())

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        session = self._session
        if session is None:
            raise RuntimeFailure(f"{self._path} is closed")
        check_inputs(inputs, self.inputs, self._dtypes)
        try:
            results = session.run(
                self._output_names, dict(zip(self._input_names, inputs, strict=True))
            )
        except Exception as exc:
            raise RuntimeFailure(
                f"ONNX Runtime failed running {self._path}: {one_line(exc)}"
            ) from exc
        return [np.asarray(r) for r in results]

    def close(self) -> None:
        self._session = None


class OnnxBackend:
    key = "onnxruntime"
    formats: tuple[str, ...] = ("onnx",)

    def __init__(self, module: ModuleType) -> None:
        self._module = module
        self.providers = providers_in_order([str(p) for p in module.get_available_providers()])

    def load(self, path: str, threads: int) -> OnnxModel:
        ort = self._module
        try:
            options = ort.SessionOptions()
            options.intra_op_num_threads = max(1, threads)
            options.inter_op_num_threads = 1
            session = ort.InferenceSession(path, sess_options=options, providers=self.providers)
            return OnnxModel(session, path)
        except RuntimeFailure as exc:
            raise RuntimeFailure(f"cannot serve {path}: {exc}") from None
        except Exception as exc:
            raise RuntimeFailure(f"ONNX Runtime cannot load {path}: {one_line(exc)}") from exc
