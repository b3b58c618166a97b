"""Cheap reads of host facts: CPU model, memory, load, usable cores.

Standard library only. Linux is read from /proc (and /sys for board names); elsewhere the
functions fall back to `platform` and `os`. `memory_mb` and `load_average` run on every
heartbeat, so each is a single small file read or system call.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

_CPUINFO = "/proc/cpuinfo"
_MEMINFO = "/proc/meminfo"
_DEVICETREE_MODEL = "/sys/firmware/devicetree/base/model"


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _squash(text: str) -> str:
    """One line, single spaces ('Intel(R) Core(TM)  i5' -> 'Intel(R) Core(TM) i5')."""
    return " ".join(text.replace("\x00", " ").split())


def _cpuinfo_fields(text: str) -> dict[str, str]:
    """First value of each 'key : value' line in /proc/cpuinfo."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip(), _squash(value)
        if key and value and key not in fields:
            fields[key] = value
    return fields


def cpu_model() -> str | None:
    """The CPU model name, or on boards without one the board name; None when unknown.

    x86 (and 32-bit ARM) kernels give 'model name'. 64-bit ARM kernels give none, but the
    Raspberry Pi kernel adds 'Model' (the board, e.g. 'Raspberry Pi 4 Model B Rev 1.4') and
    older ones 'Hardware' (the SoC); other device-tree boards (Jetson, Coral Dev Board) name
    themselves in /sys/firmware/devicetree/base/model.
    """
    text = _read_text(_CPUINFO)
    if text is not None:
        fields = _cpuinfo_fields(text)
        for key in ("model name", "Model"):
            if key in fields:
                return fields[key]
        board = _read_text(_DEVICETREE_MODEL)
        if board and _squash(board):
            return _squash(board)
        if "Hardware" in fields:
            return fields["Hardware"]
    processor = _squash(platform.processor())
    if processor and processor.lower() != "unknown":
        return processor
    return None


def memory_mb() -> tuple[int, int]:
    """(total, available) memory in MiB; (0, 0) when it cannot be read."""
    text = _read_text(_MEMINFO)
    if text is not None:
        kib: dict[str, int] = {}
        for line in text.splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                kib[key.strip()] = int(parts[0])
        if "MemTotal" in kib:
            available = kib.get("MemAvailable")
            if available is None:  # kernels before 3.14
                available = sum(kib.get(k, 0) for k in ("MemFree", "Buffers", "Cached"))
            return kib["MemTotal"] // 1024, min(available, kib["MemTotal"]) // 1024
    return _sysconf_memory_mb()


def _sysconf_memory_mb() -> tuple[int, int]:
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total = os.sysconf("SC_PHYS_PAGES") * page
    except (AttributeError, ValueError, OSError):
        return 0, 0
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * page
    except (ValueError, OSError):
        available = 0
    mib = 1024 * 1024
    return max(total, 0) // mib, max(available, 0) // mib


def load_average() -> tuple[float, float, float]:
    """1, 5 and 15 minute load averages; zeros where the system has none."""
    try:
        one, five, fifteen = os.getloadavg()
    except (AttributeError, OSError):
        return 0.0, 0.0, 0.0
    return round(one, 2), round(five, 2), round(fifteen, 2)


def cpu_count() -> int:
    """Logical cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        try:
            return max(len(os.sched_getaffinity(0)), 1)
        except OSError:
            pass
    return os.cpu_count() or 1


def read_text(path: Path) -> str:
    """A small system file's text, stripped; '' when it cannot be read."""
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return ""


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (its type name when it has none)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
