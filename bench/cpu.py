"""Processes held to a share of one core by the kernel's CFS bandwidth control, each group in
a cgroup of its own: a slow edge device emulated on a fast machine.

    with CpuQuota(0.125) as slow:
        proc = slow.popen([sys.executable, "-m", "bench.handwritten", ...])
        ...

    python -m bench.cpu --share 0.5 -- python -c "while True: pass"

Works on both kinds of cgroup hierarchy, as root:
- v2 (/sys/fs/cgroup/cgroup.controllers exists): /sys/fs/cgroup/<name>/cpu.max holds
  "<quota_us> <period_us>"; the cpu controller is enabled in the root's subtree_control if
  it is not already.
- v1 (the cpu controller at /sys/fs/cgroup/cpu): /sys/fs/cgroup/cpu/<name>/ with
  cpu.cfs_period_us and cpu.cfs_quota_us.
A process joins by its pid being written to the group's cgroup.procs (all its threads go,
and the children it starts later stay). Names are `mqinfer-cpu-<pid>-<n>`: a later run
removes the groups of a run whose pid is gone (`python -m bench.cpu --clean`).

The kernel enforces the quota per period: at 12.5 % of a 100 ms period a busy process runs
12.5 ms, then waits 87.5 ms. Pass a shorter period for smoother slowness (the quota may not
go below 1 ms).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import itertools
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

CGROUP = Path("/sys/fs/cgroup")
V1_CPU = CGROUP / "cpu"
NAME_PREFIX = "mqinfer-cpu-"
_SERIAL = itertools.count()
DEFAULT_PERIOD_US = 100_000  # the kernel's default CFS period
MIN_QUOTA_US = 1000


class CpuQuotaError(RuntimeError):
    """The cgroup could not be made or used; the message says what was tried."""


def cgroup_version() -> int:
    """2 on a unified hierarchy, 1 where the v1 cpu controller is mounted; else an error."""
    if (CGROUP / "cgroup.controllers").exists():
        return 2
    if (V1_CPU / "cpu.cfs_quota_us").exists():
        return 1
    raise CpuQuotaError(
        f"no cgroup cpu controller: neither {CGROUP}/cgroup.controllers nor {V1_CPU}"
    )


def _root(version: int) -> Path:
    return CGROUP if version == 2 else V1_CPU


def _pids(group: Path) -> list[int]:
    try:
        return [int(p) for p in (group / "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(group: Path, version: int) -> None:
    """Move any process left in the group to the hierarchy's root, then remove the group
    (retrying while exiting tasks still hold it)."""
    root_procs = _root(version) / "cgroup.procs"
    deadline = time.monotonic() + 5
    while True:
        for pid in _pids(group):
            with contextlib.suppress(OSError):  # it exited meanwhile
                root_procs.write_text(str(pid))
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                raise CpuQuotaError(f"cannot remove {group}: {e}") from e
            time.sleep(0.02)


def clean_leftovers() -> list[str]:
    """Remove the groups of runs whose process is gone (their processes, if any, move to the
    root, uncapped). The paths removed."""
    try:
        version = cgroup_version()
    except CpuQuotaError:
        return []
    pattern = re.compile(rf"^{re.escape(NAME_PREFIX)}(\d+)-\d+$")
    removed = []
    for group in _root(version).iterdir():
        m = pattern.match(group.name)
        if m and group.is_dir() and not _alive(int(m.group(1))):
            _remove(group, version)
            removed.append(str(group))
    return removed


def process_cpu_seconds(pid: int) -> float:
    """CPU time a process has used so far (all its threads): from /proc/PID/schedstat (ns)
    where the kernel keeps it, else /proc/PID/stat (clock ticks)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Throttling:
    """The kernel's account of a group: periods seen, periods in which it ran out of quota,
    and the time its processes waited for the next period."""

    periods: int
    throttled: int
    throttled_s: float


class CpuQuota:
    """A cgroup that holds its processes together to `share` of one core (0.5: half a core;
    above 1: more than one core). A context manager: on leaving, processes it started are
    ended, others are moved back to the root, and the group is removed."""

    def __init__(
        self, share: float, period_us: int = DEFAULT_PERIOD_US, name: str | None = None
    ) -> None:
        if share <= 0:
            raise ValueError(f"share must be above 0, not {share}")
        self.share = share
        self.period_us = period_us
        self.quota_us = round(share * period_us)
        if self.quota_us < MIN_QUOTA_US:
            raise ValueError(
                f"{share:.1%} of a {period_us} us period is {self.quota_us} us; the kernel "
                f"takes at least {MIN_QUOTA_US} us: use a longer period"
            )
        self.name = name or f"{NAME_PREFIX}{os.getpid()}-{next(_SERIAL)}"
        self.version = 0
        self.path = Path()
        self.procs: list[subprocess.Popen[bytes]] = []
        self._made = False

    def __enter__(self) -> CpuQuota:
        clean_leftovers()
        self.version = cgroup_version()
        self.path = _root(self.version) / self.name
        try:
            self._make()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _make(self) -> None:
        if self.version == 2:
            if "cpu" not in (CGROUP / "cgroup.controllers").read_text().split():
                raise CpuQuotaError(
                    f"the cgroup v2 hierarchy at {CGROUP} has no cpu controller (a v1 "
                    "hierarchy may hold it)"
                )
            control = CGROUP / "cgroup.subtree_control"
            if "cpu" not in control.read_text().split():
                try:
                    control.write_text("+cpu")
                except OSError as e:
                    raise CpuQuotaError(
                        f"cannot enable the cpu controller in {control} ({e}); it is refused "
                        "where the root cgroup holds processes, as in some containers"
                    ) from e
        try:
            self.path.mkdir()
        except OSError as e:
            raise CpuQuotaError(f"cannot make {self.path} (root needed): {e}") from e
        self._made = True
        if self.version == 2:
            (self.path / "cpu.max").write_text(f"{self.quota_us} {self.period_us}")
        else:
            (self.path / "cpu.cfs_period_us").write_text(str(self.period_us))
            (self.path / "cpu.cfs_quota_us").write_text(str(self.quota_us))

    def add(self, pid: int) -> None:
        """Move a running process (all its threads) into the group."""
        if not self._made:
            raise CpuQuotaError("the quota is not in force: use it as a context manager")
        try:
            (self.path / "cgroup.procs").write_text(str(pid))
        except OSError as e:
            raise CpuQuotaError(f"cannot move pid {pid} into {self.path}: {e}") from e

    def popen(self, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start `args` inside the group from its first instruction (a shell writes its own
        pid to cgroup.procs, then execs the command: the Popen's pid is the command's)."""
        if not self._made:
            raise CpuQuotaError("the quota is not in force: use it as a context manager")
        procs = str(self.path / "cgroup.procs")
        wrapper = ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', procs, *args]
        proc: subprocess.Popen[bytes] = subprocess.Popen(wrapper, **kwargs)
        self.procs.append(proc)
        return proc

    def pids(self) -> list[int]:
        """The processes in the group now."""
        return _pids(self.path)

    def throttling(self) -> Throttling:
        """The group's CFS statistics so far."""
        stat: dict[str, int] = {}
        for line in (self.path / "cpu.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            stat[key] = int(value)
        waited = stat["throttled_usec"] / 1e6 if self.version == 2 else stat["throttled_time"] / 1e9
        return Throttling(stat["nr_periods"], stat["nr_throttled"], waited)

    def close(self) -> None:
        """End the processes started here, move the rest out, remove the group. Safe to
        call more than once."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
        if self._made:
            _remove(self.path, self.version)
            self._made = False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cpu", description=__doc__)
    p.add_argument("--share", type=float, help="of one core, e.g. 0.5 or 0.125")
    p.add_argument("--period-us", type=int, default=DEFAULT_PERIOD_US)
    p.add_argument("--clean", action="store_true", help="remove groups crashed runs left")
    p.add_argument("command", nargs="*", help="the command to run under the quota (after --)")
    args = p.parse_args(argv)
    if args.clean:
        for path in clean_leftovers():
            print(f"removed {path}")
        return 0
    if args.share is None or not args.command:
        p.error("give --share and a command")
    with CpuQuota(args.share, args.period_us) as quota:
        proc = quota.popen(args.command)
        try:
            return proc.wait()
        except KeyboardInterrupt:
            return 130


if __name__ == "__main__":
    sys.exit(main())
