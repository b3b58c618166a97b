"""ONNX models on ONNX Runtime, one session per device: the CPU, and each device behind
an execution provider that `node.gpus` confirmed is really there ('cuda:0' for an NVIDIA
GPU with CUDAExecutionProvider, 'rocm:0', 'openvino', 'coreml', 'qnn')."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

import numpy as np

from mqinfer.node import gpus
from mqinfer.node.runtimes.base import (
    CPU,
    Backend,
    Device,
    Found,
    RuntimeEntry,
    RuntimeFailure,
    check_inputs,
    device_label,
    pick_device,
)
from mqinfer.node.sysinfo import one_line
from mqinfer.protocol.manifest import TensorInfo
from mqinfer.protocol.messages import Runtime

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


# A device's family ('cuda' of 'cuda:0') -> the providers that run on it, preferred first.
DEVICE_PROVIDERS = {
    "cuda": ("CUDAExecutionProvider",),
    "rocm": ("MIGraphXExecutionProvider", "ROCMExecutionProvider"),
    "openvino": ("OpenVINOExecutionProvider",),
    "coreml": ("CoreMLExecutionProvider",),
    "qnn": ("QNNExecutionProvider",),
}

Provider = str | tuple[str, dict[str, Any]]


def providers_for(device: str, available: Sequence[str]) -> list[Provider]:
    """The providers a session on `device` is given: the device's own (with its index as
    device_id), then the CPU for the operators they do not have."""
    family, _, index = device.partition(":")
    if family.upper() == CPU:
        return [CPU_PROVIDER]
    listed = [p for p in DEVICE_PROVIDERS.get(family.lower(), ()) if p in available]
    if not listed:
        raise RuntimeFailure(
            f"ONNX Runtime has no execution provider for {device}"
            f" (providers: {', '.join(available) or 'none'})"
        )
    own: list[Provider] = [(p, {"device_id": int(index)}) if index.isdigit() else p for p in listed]
    return [*own, CPU_PROVIDER]


def _name(provider: Provider) -> str:
    return provider if isinstance(provider, str) else provider[0]


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

    def __init__(
        self, module: ModuleType, device: str = CPU, devices: tuple[str, ...] | None = None
    ) -> None:
        self._module = module
        self.device = device
        self.devices = devices if devices is not None else (device,)
        self.label = device_label(self.key, device)
        self.available = [str(p) for p in module.get_available_providers()]
        self.providers = [_name(p) for p in providers_for(device, self.available)]

    def load(self, path: str, threads: int, device: str | None = None) -> OnnxModel:
        ort = self._module
        chosen = pick_device("ONNX Runtime", device, self.device, self.devices)
        try:
            providers = providers_for(chosen, self.available)
            options = ort.SessionOptions()
            options.intra_op_num_threads = max(1, threads)
            options.inter_op_num_threads = 1
            session = ort.InferenceSession(path, sess_options=options, providers=providers)
            model = OnnxModel(session, path)
        except RuntimeFailure as exc:
            raise RuntimeFailure(f"cannot serve {path}: {exc}") from None
        except Exception as exc:
            raise RuntimeFailure(f"ONNX Runtime cannot load {path}: {one_line(exc)}") from exc
        # ONNX Runtime falls back to the CPU, with a warning, when a device's provider
        # fails to start: a model on the CPU is not what was asked for
        wanted = _name(providers[0])
        if wanted != CPU_PROVIDER and wanted not in model.providers:
            model.close()
            raise RuntimeFailure(
                f"ONNX Runtime cannot load {path} on {chosen}: {wanted} did not start"
                f" (the session has {', '.join(model.providers)})"
            )
        return model


# ---- the registry's entry ---------------------------------------------------------------


def probe(module: ModuleType, earlier: Mapping[str, Found]) -> Found:
    """The CPU, and each accelerator behind a provider that `node.gpus` confirms."""
    providers = tuple(str(p) for p in module.get_available_providers())
    version = str(getattr(module, "__version__", "") or "unknown")
    runtime = Runtime(
        package="onnxruntime", version=version, formats=["onnx"], providers=list(providers)
    )
    found, absent = gpus.onnx_accelerators(module, runtime)
    devices = [Device(CPU, ("onnx",))]
    for acc in found:
        devices.append(Device(str(acc.detail["device"]), ("onnx",), (acc,)))
    return Found(tuple(devices), providers=providers, absent=absent)


def backend(module: ModuleType, device: Device, found: Found) -> Backend:
    return OnnxBackend(module, device.name, found.names)


ENTRIES = (
    RuntimeEntry(
        key="onnxruntime",
        module="onnxruntime",
        packages=(
            "onnxruntime",
            "onnxruntime-gpu",
            "onnxruntime-openvino",
            "onnxruntime-directml",
            "onnxruntime-qnn",
            "onnxruntime-rocm",
            "onnxruntime-silicon",
        ),
        formats=("onnx",),
        preference=30,
        probe=probe,
        backend=backend,
        explains=("gpu",),
    ),
)
