"""Edge TPU compiled models (`*_edgetpu.tflite`): a TFLite interpreter with the Edge TPU
delegate attached. Whether the delegate loads at all is decided once by
`node.edgetpu.probe`; this backend exists only where it did (see `litert.ENTRIES`)."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from mqinfer.node.edgetpu import EDGETPU_LIBRARY, quiet_delegate_teardown
from mqinfer.node.runtimes.base import RuntimeFailure, pick_device
from mqinfer.node.runtimes.litert import EDGETPU, LiteRTModel, open_interpreter
from mqinfer.node.sysinfo import one_line


class EdgeTpuBackend:
    key = "edgetpu"
    label = "edgetpu"
    formats: tuple[str, ...] = ("edgetpu_tflite",)
    device = EDGETPU  # the first Edge TPU the delegate finds

    def __init__(
        self,
        module: ModuleType,
        runtime: str = "litert",
        devices: tuple[str, ...] = (EDGETPU,),
    ) -> None:
        self.runtime = runtime  # the TFLite runtime that carries the delegate
        self.devices = devices  # 'edgetpu', and each one by name ('usb:0', 'pci:0') if known
        self._module = module

    def load(self, path: str, threads: int, device: str | None = None) -> LiteRTModel:
        chosen = pick_device("the Edge TPU delegate", device, self.device, self.devices)
        args: list[Any] = [EDGETPU_LIBRARY]
        if chosen != EDGETPU:
            args.append({"device": chosen})
        failure = ""
        with quiet_delegate_teardown():  # a failed load leaves a half-built Delegate behind
            try:
                delegate = self._module.load_delegate(*args)
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
