"""TFLite models on LiteRT (`ai_edge_litert`), or on the older `tflite_runtime`.

Both packages expose the same `Interpreter`, so one backend serves either; it is given
the interpreter module that imported. Both run on the CPU, and on an Edge TPU where the
delegate loads (`node.edgetpu`, tried once per process): the Edge TPU backend reuses
`LiteRTModel` with the delegate attached. Only the first of them that loads the delegate
carries the Edge TPU.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import numpy as np

from mqinfer.node import edgetpu as edgetpu_probe
from mqinfer.node.runtimes.base import (
    CPU,
    Backend,
    Device,
    Found,
    RuntimeEntry,
    RuntimeFailure,
    check_arity,
    describe,
    fits,
    pick_device,
)
from mqinfer.node.sysinfo import one_line
from mqinfer.protocol.manifest import Quantization, TensorInfo

RUNTIME_NAMES = {"litert": "LiteRT", "tflite_runtime": "tflite_runtime"}

# What the TFLite C++ library writes to stderr (fd 2, not through Python) when the first
# interpreter of a process is created. TF_CPP_MIN_LOG_LEVEL does not reach this logger.
NATIVE_NOISE = (b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.",)
_STDERR = threading.RLock()  # fd 2 is the process's: one redirection at a time (may nest)


@contextmanager
def without_native_noise() -> Iterator[None]:
    """Hold fd 2 in a file while the block runs, then write back all but NATIVE_NOISE.

    fd 2 is shared by every thread, so what others write meanwhile (log lines, say) is
    kept and comes out when the block ends, in order; only the noise is dropped."""
    with _STDERR:
        try:
            held = tempfile.TemporaryFile()  # noqa: SIM115 - entered just below
        except OSError:  # nowhere to hold it: let the noise through rather than fail
            yield
            return
        with held:
            try:
                saved = os.dup(2)
            except OSError:  # no stderr at all: nothing to keep clean
                yield
                return
            _flush_stderr()
            os.dup2(held.fileno(), 2)
            try:
                yield
            finally:
                _flush_stderr()
                os.dup2(saved, 2)
                os.close(saved)
                held.seek(0)
                kept = b"".join(
                    line
                    for line in held.read().splitlines(keepends=True)
                    if line.rstrip() not in NATIVE_NOISE
                )
                while kept:
                    kept = kept[os.write(2, kept) :]


def _flush_stderr() -> None:
    if sys.stderr is not None:
        sys.stderr.flush()


def tensor_info(detail: dict[str, Any]) -> TensorInfo:
    """A TensorInfo from one entry of get_input_details() / get_output_details()."""
    signature = detail.get("shape_signature")
    shape = signature if signature is not None and len(signature) else detail["shape"]
    scale, zero_point = detail.get("quantization", (0.0, 0))
    quantization = None
    if scale:
        quantization = Quantization(scale=float(scale), zero_point=int(zero_point))
    return TensorInfo(
        name=str(detail["name"]),
        dtype=np.dtype(detail["dtype"]).name,
        shape=[int(d) for d in shape],
        quantization=quantization,
    )


class LiteRTModel:
    """One TFLite interpreter. Not thread-safe."""

    def __init__(self, interpreter: Any, path: str, runtime: str) -> None:
        self._interpreter: Any = interpreter
        self._path = path
        self._runtime = runtime
        inputs = interpreter.get_input_details()
        outputs = interpreter.get_output_details()
        self.inputs = [tensor_info(d) for d in inputs]
        self.outputs = [tensor_info(d) for d in outputs]
        self._input_index = [int(d["index"]) for d in inputs]
        self._output_index = [int(d["index"]) for d in outputs]
        self._allocated = [tuple(int(x) for x in d["shape"]) for d in inputs]
        self._dtypes = [np.dtype(spec.dtype) for spec in self.inputs]

    def _resize(self, position: int, shape: tuple[int, ...]) -> None:
        """Resize an input whose new shape differs only in dynamic dimensions."""
        spec = self.inputs[position]
        if not fits(shape, spec.shape):
            got = ",".join(str(d) for d in shape)
            raise RuntimeFailure(f"input {describe(spec)} cannot take an array of shape [{got}]")
        self._interpreter.resize_tensor_input(self._input_index[position], list(shape), strict=True)
        self._allocated[position] = shape

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        interpreter = self._interpreter
        if interpreter is None:
            raise RuntimeFailure(f"{self._path} is closed")
        check_arity(inputs, self.inputs)
        resized = False
        for position, array in enumerate(inputs):
            if array.dtype != self._dtypes[position]:
                spec = describe(self.inputs[position])
                raise RuntimeFailure(f"input {spec} cannot take a {array.dtype.name} array")
            if array.shape != self._allocated[position]:
                self._resize(position, array.shape)
                resized = True
        try:
            if resized:
                interpreter.allocate_tensors()
            for index, array in zip(self._input_index, inputs, strict=True):
                interpreter.set_tensor(index, array)
            interpreter.invoke()
            # get_tensor returns a copy, never a view of the interpreter's buffers
            return [interpreter.get_tensor(index) for index in self._output_index]
        except Exception as exc:
            raise RuntimeFailure(
                f"{self._runtime} failed running {self._path}: {one_line(exc)}"
            ) from exc

    def close(self) -> None:
        self._interpreter = None


def open_interpreter(
    module: ModuleType,
    runtime: str,
    path: str,
    threads: int,
    delegates: list[Any] | None = None,
) -> LiteRTModel:
    """Create and allocate an interpreter for the model file, or raise RuntimeFailure."""
    try:
        with without_native_noise():
            interpreter = module.Interpreter(
                model_path=path, num_threads=max(1, threads), experimental_delegates=delegates
            )
            interpreter.allocate_tensors()
        return LiteRTModel(interpreter, path, runtime)
    except Exception as exc:
        raise RuntimeFailure(f"{runtime} cannot load {path}: {one_line(exc)}") from exc


class LiteRTBackend:
    """Plain .tflite models on the CPU (XNNPACK)."""

    formats: tuple[str, ...] = ("tflite",)
    device = CPU

    def __init__(self, module: ModuleType, key: str = "litert") -> None:
        self.key = key
        self.label = key
        self._module = module

    def load(self, path: str, threads: int, device: str | None = None) -> LiteRTModel:
        name = RUNTIME_NAMES.get(self.key, self.key)
        pick_device(name, device, CPU, (CPU,))
        return open_interpreter(self._module, name, path, threads)


# ---- the registry's entries -------------------------------------------------------------

EDGETPU = "edgetpu"  # the device name of the Edge TPU


def _probe(key: str) -> Callable[[ModuleType, Mapping[str, Found]], Found]:
    def probe(module: ModuleType, earlier: Mapping[str, Found]) -> Found:
        devices = [Device(CPU, ("tflite",))]
        if any(d.name == EDGETPU for found in earlier.values() for d in found.devices):
            return Found(tuple(devices))  # a TFLite runtime before this one carries it
        tpus, _, why = edgetpu_probe.probe({key: module})
        if not tpus:
            return Found(tuple(devices), absent={"edgetpu": why})
        devices.append(Device(EDGETPU, ("edgetpu_tflite",), tuple(tpus)))
        return Found(tuple(devices), providers=("edgetpu",))

    return probe


def _backend(key: str) -> Callable[[ModuleType, Device, Found], Backend]:
    def make(module: ModuleType, device: Device, found: Found) -> Backend:
        if device.name != EDGETPU:
            return LiteRTBackend(module, key)
        from mqinfer.node.runtimes.edgetpu import EdgeTpuBackend  # it builds on this module

        # each Edge TPU by the name load_delegate's 'device' option takes ('usb:0')
        named = [str(a.detail["device"]) for a in device.accelerators if "device" in a.detail]
        return EdgeTpuBackend(module, key, devices=(EDGETPU, *named))

    return make


ENTRIES = (
    RuntimeEntry(
        key="litert",
        module="ai_edge_litert.interpreter",
        packages=("ai-edge-litert",),
        formats=("tflite",),
        preference=10,
        probe=_probe("litert"),
        backend=_backend("litert"),
        explains=("edgetpu",),
        unexplained=edgetpu_probe.without_runtime,
    ),
    RuntimeEntry(
        key="tflite_runtime",
        module="tflite_runtime.interpreter",
        packages=("tflite-runtime",),
        formats=("tflite",),
        preference=20,
        probe=_probe("tflite_runtime"),
        backend=_backend("tflite_runtime"),
        explains=("edgetpu",),
        unexplained=edgetpu_probe.without_runtime,
    ),
)
