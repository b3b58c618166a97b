"""ONNX and TFLite models on Intel's OpenVINO (`openvino`), compiled for one device.

OpenVINO reads .onnx and .tflite files directly (int8 TFLite included) and compiles them
for a device: the CPU everywhere, a GPU or NPU where `Core().available_devices` lists
one. On the CPU a model is compiled for latency with the worker's thread count and in
f32: without the hint, CPUs with bf16 instructions run float models in bf16 and answer
differently from the model file.

OpenVINO does not report a TFLite tensor's quantization, so it is read from the file
(`tflite_quantization`): a reply describes the tensors as LiteRT would.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from types import ModuleType
from typing import Any, Literal

import numpy as np

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
from mqinfer.protocol.manifest import Quantization, TensorInfo
from mqinfer.protocol.messages import Accelerator

# Device families a model can be compiled for, preferred first when a measurement ties.
DEVICES = ("CPU", "GPU", "NPU")
KINDS: dict[str, Literal["gpu", "npu"]] = {"GPU": "gpu", "NPU": "npu"}  # accelerator kinds
FORMATS = ("tflite", "onnx")
SETTINGS = ("INFERENCE_NUM_THREADS", "INFERENCE_PRECISION_HINT", "PERFORMANCE_HINT")
# numpy dtypes a tensor may have; others (bf16, f8, strings) are refused at load.
DTYPES = frozenset(
    {
        "float32",
        "float16",
        "float64",
        "int8",
        "uint8",
        "int16",
        "uint16",
        "int32",
        "uint32",
        "int64",
        "uint64",
        "bool",
    }
)


def message(exc: BaseException) -> str:
    """OpenVINO's error without the source locations it puts in front ('Exception from
    src/inference/src/cpp/core.cpp:84:', "Check '...' failed at ...:"), on one line."""
    lines = [
        line.strip()
        for line in str(exc).splitlines()
        if line.strip() and not line.lstrip().startswith(("Exception from ", "Check '"))
    ]
    return " ".join(" ".join(lines).split()) or one_line(exc)


def devices(module: ModuleType, core: Any = None) -> list[tuple[str, str]]:
    """(device, full name) of each device OpenVINO can compile for here: 'CPU', and
    'GPU', 'GPU.1', 'NPU' only where the plugin found the hardware."""
    core = core if core is not None else module.Core()
    found: list[tuple[str, str]] = []
    for device in core.available_devices:
        try:
            name = str(core.get_property(device, "FULL_DEVICE_NAME"))
        except Exception:  # a plugin that lists a device it cannot describe
            name = str(device)
        found.append((str(device), name))
    return found


def memory_mb(core: Any, device: str) -> int | None:
    """The memory a GPU has for models (GPU_DEVICE_TOTAL_MEM_SIZE, bytes), in MB; None for
    a device without the property."""
    try:
        size = int(core.get_property(device, "GPU_DEVICE_TOTAL_MEM_SIZE"))
    except Exception:
        return None
    return size // 2**20 if size > 0 else None


# ---- TFLite quantization, read from the file's flatbuffer -----------------------------


def _table_field(buf: bytes, table: int, index: int) -> int | None:
    """Position of field `index` of the flatbuffer table at `table`, None when absent."""
    vtable = table - struct.unpack_from("<i", buf, table)[0]
    size = struct.unpack_from("<H", buf, vtable)[0]
    slot = 4 + 2 * index
    if slot + 2 > size:
        return None
    offset = struct.unpack_from("<H", buf, vtable + slot)[0]
    return table + offset if offset else None


def _deref(buf: bytes, pos: int) -> int:
    offset: int = struct.unpack_from("<I", buf, pos)[0]
    return pos + offset


def _vector(buf: bytes, table: int, index: int) -> tuple[int, int]:
    """(position of the first element, length) of a vector field; (0, 0) when absent."""
    pos = _table_field(buf, table, index)
    if pos is None:
        return 0, 0
    vec = _deref(buf, pos)
    return vec + 4, struct.unpack_from("<I", buf, vec)[0]


def _tables(buf: bytes, table: int, index: int) -> list[int]:
    start, length = _vector(buf, table, index)
    return [_deref(buf, start + 4 * i) for i in range(length)]


def _numbers(buf: bytes, table: int, index: int, fmt: str) -> list[Any]:
    start, length = _vector(buf, table, index)
    return list(struct.unpack_from(f"<{length}{fmt}", buf, start)) if length else []


def _string(buf: bytes, table: int, index: int) -> str:
    pos = _table_field(buf, table, index)
    if pos is None:
        return ""
    text = _deref(buf, pos)
    length = struct.unpack_from("<I", buf, text)[0]
    return buf[text + 4 : text + 4 + length].decode("utf-8", "replace")


# TFLite schema field numbers: Model.subgraphs; SubGraph.tensors/inputs/outputs;
# Tensor.name/quantization; QuantizationParameters.scale/zero_point.
_SUBGRAPHS, _TENSORS, _INPUTS, _OUTPUTS, _NAME, _QUANT, _SCALE, _ZERO = 2, 0, 1, 2, 3, 4, 2, 3


def tflite_quantization(data: bytes) -> dict[str, Quantization]:
    """The per-tensor quantization of the main subgraph's inputs and outputs, by tensor
    name, as LiteRT reports it (per-channel parameters are not reported). Empty when the
    file cannot be read: OpenVINO has refused such a file before this is asked."""
    found: dict[str, Quantization] = {}
    try:
        if data[4:8] != b"TFL3":
            return found
        model = _deref(data, 0)
        subgraphs = _tables(data, model, _SUBGRAPHS)
        if not subgraphs:
            return found
        tensors = _tables(data, subgraphs[0], _TENSORS)
        ends = _numbers(data, subgraphs[0], _INPUTS, "i") + _numbers(
            data, subgraphs[0], _OUTPUTS, "i"
        )
        for index in ends:
            if not 0 <= index < len(tensors):
                continue
            tensor = tensors[index]
            quant = _table_field(data, tensor, _QUANT)
            if quant is None:
                continue
            params = _deref(data, quant)
            scales = _numbers(data, params, _SCALE, "f")
            zeros = _numbers(data, params, _ZERO, "q")
            if len(scales) == 1 and scales[0]:
                zero = int(zeros[0]) if zeros else 0
                found[_string(data, tensor, _NAME)] = Quantization(
                    scale=float(scales[0]), zero_point=zero
                )
    except (struct.error, IndexError, ValueError):
        return {}
    return found


# ---- the model ------------------------------------------------------------------------


def tensor_info(
    port: Any, position: int, kind: str, quantized: dict[str, Quantization]
) -> TensorInfo:
    """A TensorInfo from an input or output port of a compiled model; an unnamed tensor
    is called 'input_0', 'output_1', ... by its position."""
    names = sorted(str(n) for n in port.get_names())
    name = str(port.get_any_name()) if names else f"{kind}_{position}"
    element = port.get_element_type()
    try:
        dtype = np.dtype(element.to_dtype()).name
    except Exception:
        dtype = str(element)
    if dtype not in DTYPES:
        raise RuntimeFailure(
            f"tensor '{name}' has type {element}; supported are {', '.join(sorted(DTYPES))}"
        )
    shape = [int(dim.get_length()) if dim.is_static else -1 for dim in port.get_partial_shape()]
    quantization = quantized.get(name) if np.dtype(dtype).kind in "iu" else None
    return TensorInfo(name=name, dtype=dtype, shape=shape, quantization=quantization)


class OpenVinoModel:
    """One compiled model and its infer request. Used from one worker thread at a time."""

    def __init__(
        self,
        module: ModuleType,
        compiled: Any,
        path: str,
        device: str,
        quantized: dict[str, Quantization],
    ) -> None:
        self._tensor: Any = module.Tensor
        self._compiled: Any = compiled
        self._request: Any = compiled.create_infer_request()
        self._path = path
        self.device = device
        self.inputs = [tensor_info(p, i, "input", quantized) for i, p in enumerate(compiled.inputs)]
        self.outputs = [
            tensor_info(p, i, "output", quantized) for i, p in enumerate(compiled.outputs)
        ]
        self._dtypes = [np.dtype(spec.dtype) for spec in self.inputs]
        # what the device compiled it with, read back: threads, precision, hint
        self.settings: dict[str, str] = {}
        for name in SETTINGS:
            try:
                value = compiled.get_property(name)
            except Exception:  # a device without the property
                continue
            # an element type reads 'f32', as it was asked for, not "<Type: 'float32'>"
            type_name = getattr(value, "get_type_name", None)
            self.settings[name] = str(type_name() if callable(type_name) else value)

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        request = self._request
        if request is None:
            raise RuntimeFailure(f"{self._path} is closed")
        check_inputs(inputs, self.inputs, self._dtypes)
        try:
            # The request reads the arrays in place (shared_memory) and is given them one by
            # one: about half the time of `infer(inputs)` on a small model.
            for position, array in enumerate(inputs):
                tensor = self._tensor(np.ascontiguousarray(array), shared_memory=True)
                request.set_input_tensor(position, tensor)
            request.infer()
            # copies: the request's output buffers are overwritten by the next run
            return [
                np.array(request.get_output_tensor(i).data, copy=True)
                for i in range(len(self.outputs))
            ]
        except Exception as exc:
            raise RuntimeFailure(
                f"OpenVINO ({self.device}) failed running {self._path}: {message(exc)}"
            ) from exc

    def close(self) -> None:
        self._request = None
        self._compiled = None


class OpenVinoBackend:
    """.onnx and .tflite files compiled for one OpenVINO device ('CPU' unless told)."""

    key = "openvino"
    formats: tuple[str, ...] = FORMATS

    def __init__(
        self,
        module: ModuleType,
        device: str = CPU,
        core: Any = None,
        devices: tuple[str, ...] | None = None,
    ) -> None:
        self.device = device
        self.devices = devices if devices is not None else (device,)
        # the runtime a replica reports: 'openvino' on the CPU, 'openvino GPU' elsewhere
        self.label = device_label(self.key, device)
        self._module = module
        self._core: Any = core if core is not None else module.Core()

    def config(self, threads: int, device: str | None = None) -> dict[str, Any]:
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if (device or self.device).partition(".")[0] == CPU:
            config["INFERENCE_NUM_THREADS"] = max(1, threads)
            config["INFERENCE_PRECISION_HINT"] = "f32"
        return config

    def load(self, path: str, threads: int, device: str | None = None) -> OpenVinoModel:
        chosen = pick_device("OpenVINO", device, self.device, self.devices)
        where = f"OpenVINO ({chosen})"
        try:
            model = self._core.read_model(path)
            compiled = self._core.compile_model(model, chosen, self.config(threads, chosen))
        except Exception as exc:
            raise RuntimeFailure(f"{where} cannot load {path}: {message(exc)}") from exc
        quantized: dict[str, Quantization] = {}
        if path.endswith(".tflite"):
            try:
                with open(path, "rb") as file:
                    quantized = tflite_quantization(file.read())
            except OSError:
                quantized = {}
        try:
            return OpenVinoModel(self._module, compiled, path, chosen, quantized)
        except RuntimeFailure as exc:
            raise RuntimeFailure(f"cannot serve {path}: {exc}") from None
        except Exception as exc:
            raise RuntimeFailure(f"{where} cannot load {path}: {message(exc)}") from exc


# ---- the registry's entry ---------------------------------------------------------------


def _failure(exc: BaseException) -> str:
    if isinstance(exc, ImportError):
        return one_line(exc)
    return f"{type(exc).__name__}: {one_line(exc)}"


def probe(module: ModuleType, earlier: Mapping[str, Found]) -> Found:
    """The devices `Core().available_devices` lists that a model compiles for, CPU first;
    a GPU or NPU among them is an accelerator (the CPU is the node's cpu), a GPU with the
    memory it reports."""
    try:
        core = module.Core()
        listed = devices(module, core)
    except Exception as exc:  # the runtime imports but its plugins do not load
        return Found(why_none=f"openvino lists no device: {_failure(exc)}")
    if not listed:
        return Found(why_none="openvino imports but lists no device (Core().available_devices)")
    order = {family: i for i, family in enumerate(DEVICES)}
    usable = [(d, n) for d, n in listed if d.partition(".")[0] in order]
    usable.sort(key=lambda pair: order[pair[0].partition(".")[0]])
    found: list[Device] = []
    for device, name in usable:
        kind = KINDS.get(device.partition(".")[0])
        accelerators: tuple[Accelerator, ...] = ()
        if kind is not None:
            memory = memory_mb(core, device) if kind == "gpu" else None
            accelerators = (
                Accelerator(
                    kind=kind,
                    name=name,
                    runtime="openvino",
                    detail={"device": device},
                    memory_mb=memory,
                ),
            )
        found.append(Device(device, FORMATS, accelerators))
    names = tuple(d for d, _ in listed)
    why = "" if found else f"openvino lists no device a model compiles for ({', '.join(names)})"
    return Found(tuple(found), providers=names, why_none=why, handle=core)


def backend(module: ModuleType, device: Device, found: Found) -> Backend:
    return OpenVinoBackend(module, device.name, found.handle, found.names)


ENTRIES = (
    RuntimeEntry(
        key="openvino",
        module="openvino",
        packages=("openvino",),
        formats=FORMATS,
        preference=40,
        probe=probe,
        backend=backend,
    ),
)
