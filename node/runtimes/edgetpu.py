"""Edge TPU compiled models (`*_edgetpu.tflite`): a TFLite interpreter with the Edge TPU
delegate attached. Whether the delegate loads at all is decided by `node.edgetpu.probe`;
this backend exists only where it did."""

from __future__ import annotations

from types import ModuleType

from mqinfer.node.edgetpu import EDGETPU_LIBRARY, quiet_delegate_teardown
from mqinfer.node.runtimes.base import RuntimeFailure
from mqinfer.node.runtimes.litert import LiteRTModel, open_interpreter
from mqinfer.node.sysinfo import one_line


class EdgeTpuBackend:
    key = "edgetpu"
    formats: tuple[str, ...] = ("edgetpu_tflite",)

    def __init__(self, module: ModuleType, runtime: str = "litert") -> None:
        self.runtime = runtime  # the TFLite runtime that carries the delegate
        self._module = module

    def load(self, path: str, threads: int) -> LiteRTModel:
        failure = ""
        with quiet_delegate_teardown():  # a failed load leaves a half-built Delegate behind
            try:
                delegate = self._module.load_delegate(EDGETPU_LIBRARY)
            except Exception as exc:
                failure = one_line(exc)
        # raised only here: inside, the exception would keep that Delegate alive past the
        # teardown guard
        if failure:
            raise RuntimeFailure(
                f"cannot load {path}: the Edge TPU delegate {EDGETPU_LIBRARY} did not load:"
                f" {failure}"
            )
        return open_interpreter(self._module, "Edge TPU", path, threads, [delegate])
