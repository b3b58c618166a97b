"""The Coral Edge TPU: hardware seen on the buses, and whether the delegate really loads.

Loading the delegate claims the device (and, for the USB Accelerator, loads its firmware),
so `probe` tries it once per process and keeps the answer.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import platform
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from mqinfer.node.sysinfo import one_line, read_text
from mqinfer.protocol.messages import Accelerator

TFLITE_KEYS = ("litert", "tflite_runtime")  # runtimes that can load the delegate, preferred first

EDGETPU_LIBRARY = {"Darwin": "libedgetpu.1.dylib", "Windows": "edgetpu.dll"}.get(
    platform.system(), "libedgetpu.so.1"
)
# A USB Accelerator shows 1a6e:089a until libedgetpu loads its firmware, then 18d1:9302.
_CORAL_USB_IDS = frozenset({("1a6e", "089a"), ("18d1", "9302")})
_CORAL_PCI_ID = ("0x1ac1", "0x089a")


def edgetpu_hardware() -> list[dict[str, str]]:
    """Coral devices visible without libedgetpu: PCIe (/dev/apex_N, or the bare PCI
    function when the gasket/apex driver is missing) and USB (by vendor:product id)."""
    seen: list[dict[str, str]] = [
        {"type": "pci", "path": str(dev)} for dev in sorted(Path("/dev").glob("apex_*"))
    ]
    if not seen:
        for dev in sorted(Path("/sys/bus/pci/devices").glob("*")):
            if (read_text(dev / "vendor"), read_text(dev / "device")) == _CORAL_PCI_ID:
                seen.append({"type": "pci", "path": str(dev), "driver": "missing"})
    for dev in sorted(Path("/sys/bus/usb/devices").glob("*")):
        ids = (read_text(dev / "idVendor"), read_text(dev / "idProduct"))
        if ids in _CORAL_USB_IDS:
            seen.append({"type": "usb", "path": str(dev), "id": ":".join(ids)})
    return seen


def _describe_hardware(seen: list[dict[str, str]]) -> str:
    parts = []
    for dev in seen:
        if dev["type"] == "usb":
            parts.append(f"USB Edge TPU ({dev['id']} at {dev['path']})")
        elif dev.get("driver") == "missing":
            parts.append(f"PCIe Edge TPU ({dev['path']}, no /dev/apex_* driver)")
        else:
            parts.append(f"PCIe Edge TPU ({dev['path']})")
    return ", ".join(parts)


def _is_delegate_teardown_noise(args: sys.UnraisableHookArgs) -> bool:
    """The AttributeError a TFLite `Delegate.__del__` raises when its __init__ failed."""
    return (
        args.exc_type is AttributeError
        and getattr(args.object, "__qualname__", None) == "Delegate.__del__"
        and "_library" in str(args.exc_value)
    )


@contextlib.contextmanager
def quiet_delegate_teardown() -> Iterator[None]:
    """Silence the 'Exception ignored in: Delegate.__del__' a failed load_delegate leaves.

    When the shared library does not load, `Delegate.__init__` raises before setting
    `_library`, and the half-built object's `__del__` then fails once the exception is
    released. Only that error is dropped; any other unraisable exception is passed on to
    the hook that was installed before.
    """
    previous = sys.unraisablehook

    def hook(args: sys.UnraisableHookArgs) -> None:
        if not _is_delegate_teardown_noise(args):
            previous(args)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        gc.collect()  # the half-built Delegate may sit in a cycle with its traceback
        sys.unraisablehook = previous


def _try_delegate(interpreter: ModuleType, library: str) -> str | None:
    """Create and release the delegate; None on success, else why it failed."""
    with quiet_delegate_teardown():
        try:
            delegate = interpreter.load_delegate(library)
        except Exception as exc:
            return one_line(exc)
        del delegate
    return None


def _pycoral_devices() -> list[dict[str, Any]] | None:
    """Coral's own device list, when Coral's pycoral build is installed.

    The PyPI project called 'pycoral' is unrelated; only `pycoral.utils.edgetpu` with
    `list_edge_tpus` is Coral's.
    """
    try:
        edgetpu = importlib.import_module("pycoral.utils.edgetpu")
        return [dict(dev) for dev in edgetpu.list_edge_tpus()]
    except Exception:
        return None


def _edgetpu_accelerators(runtime: str, seen: list[dict[str, str]]) -> list[Accelerator]:
    devices = _pycoral_devices()
    if not devices:
        kinds = {dev["type"] for dev in seen}
        suffix = {"usb": " (USB)", "pci": " (PCIe)"}.get(kinds.pop(), "") if len(kinds) == 1 else ""
        detail: dict[str, Any] = {"library": EDGETPU_LIBRARY}
        if seen:
            detail["hardware"] = seen
        return [
            Accelerator(
                kind="edgetpu", name=f"Coral Edge TPU{suffix}", runtime=runtime, detail=detail
            )
        ]
    found: list[Accelerator] = []
    per_type: dict[str, int] = {}
    for dev in devices:
        kind = str(dev.get("type", ""))
        index = per_type.get(kind, 0)
        per_type[kind] = index + 1
        label = {"usb": "USB", "pci": "PCIe"}.get(kind, kind)
        found.append(
            Accelerator(
                kind="edgetpu",
                name=f"Coral Edge TPU ({label})" if label else "Coral Edge TPU",
                runtime=runtime,
                detail={
                    "library": EDGETPU_LIBRARY,
                    "device": f"{kind}:{index}",  # load_delegate option 'device'
                    **{k: str(v) for k, v in dev.items()},
                },
            )
        )
    return found


# (runtime key, id(module)) of the runtimes tried -> (the modules, kept so that their ids
# cannot be reused while the entry lives; what the probe found)
_PROBED: dict[
    tuple[tuple[str, int], ...],
    tuple[list[ModuleType], tuple[list[Accelerator], str, str]],
] = {}
_PROBED_LOCK = threading.Lock()


def probe(modules: dict[str, ModuleType]) -> tuple[list[Accelerator], str, str]:
    """(accelerators, runtime key, reason when there are none), through the first of the
    TFLite runtimes in `modules` that loads the delegate.

    Loading the delegate claims the device, so the probe runs once per process and set of
    runtime modules: a later call returns what the first found (`forget` starts over)."""
    tflite = [key for key in TFLITE_KEYS if key in modules]
    ident = tuple((key, id(modules[key])) for key in tflite)
    with _PROBED_LOCK:
        kept = _PROBED.get(ident)
        if kept is None:
            kept = ([modules[key] for key in tflite], _probe(modules, tflite))
            _PROBED[ident] = kept
        accelerators, runtime, why = kept[1]
        return list(accelerators), runtime, why


def without_runtime(why: str) -> str:
    """Why there is no Edge TPU when no TFLite runtime is usable (`why`: why not)."""
    seen = edgetpu_hardware()
    where = f"{_describe_hardware(seen)} present but" if seen else "no Edge TPU seen;"
    return f"{where} no TFLite runtime imports to load {EDGETPU_LIBRARY} ({why})"


def forget() -> None:
    """Probe again at the next call (for tests: the first answer is kept otherwise)."""
    with _PROBED_LOCK:
        _PROBED.clear()


def _probe(modules: dict[str, ModuleType], tflite: list[str]) -> tuple[list[Accelerator], str, str]:
    seen = edgetpu_hardware()
    where = f"{_describe_hardware(seen)} present but" if seen else "no Edge TPU seen;"
    if not tflite:
        return [], "", f"{where} no TFLite runtime imports to load {EDGETPU_LIBRARY}"
    failure = ""
    for key in tflite:
        error = _try_delegate(modules[key], EDGETPU_LIBRARY)
        if error is None:
            return _edgetpu_accelerators(key, seen), key, ""
        failure = failure or error
    return [], "", f"{where} {EDGETPU_LIBRARY} not loadable: {failure}"
