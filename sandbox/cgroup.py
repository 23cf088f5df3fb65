"""Cgroup controllers that write cgroup interface files directly (as runc and AgentCgroup do).

Three backends behind one interface (``CgroupController``):

- ``CgroupV2Controller``: one group directory per rollout under a delegated cgroup2
  directory; writes ``memory.min/low/high/max``, ``cpu.max``, ``cpu.weight``,
  ``pids.max``, ``cgroup.procs``, ``cgroup.kill``; reads ``memory.current``,
  ``memory.peak``, ``memory.events``, ``memory.pressure``, ``cpu.stat``.
  Kernel facts (Documentation/admin-guide/cgroup-v2.rst): ``memory.high``
  throttles and reclaims but never OOM-kills; ``memory.max`` OOM-kills inside the
  group; controllers are enabled for children through ``cgroup.subtree_control``
  of a group that has no processes of its own.
- ``CgroupV1Controller``: the v1 fallback, one directory per hierarchy
  (``memory/``, ``cpu/``, ``pids/``): ``memory.limit_in_bytes`` (hard),
  ``memory.soft_limit_in_bytes`` (v1 has no ``memory.high``: the soft limit only
  steers reclaim under global pressure, it does not throttle), ``cpu.cfs_quota_us``,
  ``cpu.shares``, ``pids.max``; no ``cgroup.kill`` (processes are SIGKILLed one by one).
- ``NoopController``: does nothing and reports nothing (cgroups disabled or unavailable).

All file access goes through a ``CgroupFS`` so tests can stand in a fake kernel
over a temporary directory (this machine has no writable cgroup2). Every method
is blocking (small file writes); call from a worker thread in async code if a
hot path needs it -- the writes take microseconds on a real cgroupfs.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

# Written to memory.max / pids.max / cpu.max to mean "no limit".
UNLIMITED = "max"
CPU_PERIOD_US = 100_000


class CgroupError(RuntimeError):
    """A cgroup operation failed (the message names the file and the errno)."""


class CgroupFS:
    """The kernel's cgroupfs: plain file and directory operations (the real one)."""

    def mkdir(self, path: Path) -> None:
        os.mkdir(path)

    def rmdir(self, path: Path) -> None:
        os.rmdir(path)

    def write(self, path: Path, value: str) -> None:
        # One write() per value: cgroupfs parses each write as a whole.
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)

    def read(self, path: Path) -> str:
        with open(path, encoding="ascii") as fh:
            return fh.read()

    def exists(self, path: Path) -> bool:
        return path.exists()


def _checked_write(fs: CgroupFS, path: Path, value: str) -> None:
    """``fs.write`` with the kernel's refusal turned into a CgroupError naming file and value."""
    try:
        fs.write(path, value)
    except OSError as exc:
        raise CgroupError(f"write {value!r} to {path}: {exc}") from exc


@dataclass
class MemoryLimits:
    """Memory settings of one group, bytes; None = leave unchanged, -1 = ``max`` (no limit)."""

    min: int | None = None
    low: int | None = None
    high: int | None = None
    max: int | None = None


@dataclass
class CgroupStats:
    """A snapshot of one group's counters.

    Attributes:
        memory_current: bytes charged now (None when unknown).
        memory_peak: highest bytes charged since creation (v2 ``memory.peak``, v1 ``max_usage_in_bytes``).
        events: ``memory.events`` counters (low, high, max, oom, oom_kill, ...).
        psi_some_total_us / psi_full_total_us: ``memory.pressure`` totals, microseconds.
        cpu_usage_us: CPU time used, microseconds.
    """

    memory_current: int | None = None
    memory_peak: int | None = None
    events: dict[str, int] = field(default_factory=dict)
    psi_some_total_us: int | None = None
    psi_full_total_us: int | None = None
    cpu_usage_us: int | None = None


class CgroupController(Protocol):
    """What the resource shim needs from a cgroup backend (paths are group paths it returned)."""

    kind: str

    def create(self, name: str) -> Path | None: ...
    def set_memory(self, group: Path | None, limits: MemoryLimits) -> None: ...
    def set_cpu(self, group: Path | None, *, quota_cores: float | None = None, weight: int | None = None) -> None: ...
    def set_pids(self, group: Path | None, pids_max: int | None) -> None: ...
    def add_pid(self, group: Path | None, pid: int) -> None: ...
    def procs(self, group: Path | None) -> list[int]: ...
    def procs_files(self, group: Path | None) -> list[Path]: ...
    def stats(self, group: Path | None) -> CgroupStats: ...
    def kill(self, group: Path | None) -> None: ...
    def remove(self, group: Path | None, *, timeout_s: float = 5.0) -> None: ...
    def list_groups(self) -> list[Path]: ...


def _fmt_bytes(value: int) -> str:
    return UNLIMITED if value < 0 else str(int(value))


def parse_flat_keyed(text: str) -> dict[str, int]:
    """Parse ``key value`` lines (``memory.events``, ``cpu.stat``) into ints."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def parse_pressure(text: str) -> tuple[int | None, int | None]:
    """``(some total, full total)`` in microseconds from a PSI file (``some avg10=0.00 ... total=123``)."""
    some = full = None
    for line in text.splitlines():
        fields = dict(part.split("=", 1) for part in line.split()[1:] if "=" in part)
        if "total" not in fields:
            continue
        if line.startswith("some"):
            some = int(fields["total"])
        elif line.startswith("full"):
            full = int(fields["total"])
    return some, full


class CgroupV2Controller:
    """Groups under one delegated cgroup2 directory ``root`` (see module docstring).

    ``root`` must be writable by us and have no processes of its own (cgroup v2's
    "no internal processes" rule), e.g. a systemd ``Delegate=yes`` unit's
    subgroup. ``prefix`` names our groups so a reaper can find stale ones.
    """

    kind = "v2"

    def __init__(self, root: str | os.PathLike[str], *, prefix: str = "swe-rollout-", fs: CgroupFS | None = None):
        self.root = Path(root)
        self.prefix = prefix
        self.fs = fs or CgroupFS()

    def enable_controllers(self, controllers: tuple[str, ...] = ("memory", "cpu", "pids")) -> None:
        """Enable ``controllers`` for the root's children (``+memory +cpu +pids`` into subtree_control).

        Raises:
            CgroupError: the kernel refused (controller not delegated, or root has processes).
        """
        available = set(self.fs.read(self.root / "cgroup.controllers").split())
        wanted = [c for c in controllers if c in available]
        if wanted:
            self._write(self.root / "cgroup.subtree_control", " ".join(f"+{c}" for c in wanted))

    def create(self, name: str) -> Path:
        """Make the group ``root/<prefix><name>`` (an existing one is reused)."""
        group = self.root / f"{self.prefix}{name}"
        try:
            self.fs.mkdir(group)
        except FileExistsError:
            pass
        except OSError as exc:
            raise CgroupError(f"mkdir {group}: {exc}") from exc
        return group

    def set_memory(self, group: Path | None, limits: MemoryLimits) -> None:
        """Write the given memory files (bytes; -1 = ``max``).

        When the hard limit goes up it is written before ``memory.high``, when it
        goes down after it, so the group is throttled (high) before it can hit the
        OOM limit (max) and never sees a window with max below the new high.
        """
        assert group is not None
        current_max = self._read_int(group / "memory.max")
        raising = limits.max is not None and (limits.max < 0 or current_max is None or limits.max >= current_max)
        order = ("min", "low", "max", "high") if raising else ("min", "low", "high", "max")
        for key in order:
            value = getattr(limits, key)
            if value is not None:
                self._write(group / f"memory.{key}", _fmt_bytes(value))

    def set_cpu(self, group: Path | None, *, quota_cores: float | None = None, weight: int | None = None) -> None:
        """``cpu.max`` = quota_cores x period (None leaves it; <= 0 = no limit); ``cpu.weight`` 1-10000."""
        assert group is not None
        if quota_cores is not None:
            quota = UNLIMITED if quota_cores <= 0 else str(int(quota_cores * CPU_PERIOD_US))
            self._write(group / "cpu.max", f"{quota} {CPU_PERIOD_US}")
        if weight is not None:
            if not 1 <= weight <= 10000:
                raise ValueError(f"cpu.weight must be in 1..10000, got {weight}")
            self._write(group / "cpu.weight", str(weight))

    def set_pids(self, group: Path | None, pids_max: int | None) -> None:
        assert group is not None
        if pids_max is not None:
            self._write(group / "pids.max", UNLIMITED if pids_max <= 0 else str(pids_max))

    def add_pid(self, group: Path | None, pid: int) -> None:
        """Move ``pid`` into the group (its future children follow)."""
        assert group is not None
        self._write(group / "cgroup.procs", str(pid))

    def procs_files(self, group: Path | None) -> list[Path]:
        assert group is not None
        return [group / "cgroup.procs"]

    def procs(self, group: Path | None) -> list[int]:
        assert group is not None
        try:
            return [int(x) for x in self.fs.read(group / "cgroup.procs").split()]
        except FileNotFoundError:
            return []

    def stats(self, group: Path | None) -> CgroupStats:
        assert group is not None
        stats = CgroupStats()
        stats.memory_current = self._read_int(group / "memory.current")
        stats.memory_peak = self._read_int(group / "memory.peak")
        stats.events = self._read_keyed(group / "memory.events")
        cpu = self._read_keyed(group / "cpu.stat")
        stats.cpu_usage_us = cpu.get("usage_usec")
        try:
            stats.psi_some_total_us, stats.psi_full_total_us = parse_pressure(self.fs.read(group / "memory.pressure"))
        except OSError:
            pass
        return stats

    def kill(self, group: Path | None) -> None:
        """SIGKILL every process in the group (``cgroup.kill``, Linux >= 5.14; else one by one)."""
        assert group is not None
        if self.fs.exists(group / "cgroup.kill"):
            self._write(group / "cgroup.kill", "1")
            return
        for pid in self.procs(group):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def remove(self, group: Path | None, *, timeout_s: float = 5.0) -> None:
        """Kill the group's processes and remove it; a group already gone is fine.

        Raises:
            CgroupError: still busy after ``timeout_s`` seconds.
        """
        assert group is not None
        if not self.fs.exists(group):
            return
        self.kill(group)
        _rmdir_when_empty(self.fs, group, time.monotonic() + timeout_s)

    def list_groups(self) -> list[Path]:
        """Our groups under root (for the reaper)."""
        try:
            return sorted(p for p in self.root.iterdir() if p.is_dir() and p.name.startswith(self.prefix))
        except FileNotFoundError:
            return []

    def _write(self, path: Path, value: str) -> None:
        _checked_write(self.fs, path, value)

    def _read_int(self, path: Path) -> int | None:
        try:
            text = self.fs.read(path).strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def _read_keyed(self, path: Path) -> dict[str, int]:
        try:
            return parse_flat_keyed(self.fs.read(path))
        except OSError:
            return {}


class CgroupV1Controller:
    """The v1 fallback: ``root`` is the v1 mount (``/sys/fs/cgroup``) holding ``memory/``, ``cpu/``, ``pids/``.

    A group is one directory per hierarchy, ``<root>/<hier>/<parent>/<prefix><name>``;
    the returned group path is the memory hierarchy's directory (the others are
    derived from it). ``memory.high`` maps to ``memory.soft_limit_in_bytes`` and
    ``memory.min/low`` are not available (v1 has no equivalent).
    """

    kind = "v1"
    HIERARCHIES = ("memory", "cpu", "pids")

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        parent: str = "swe-rl",
        prefix: str = "swe-rollout-",
        fs: CgroupFS | None = None,
    ):
        self.root = Path(root)
        self.parent = parent
        self.prefix = prefix
        self.fs = fs or CgroupFS()

    def _dir(self, hierarchy: str, group: Path) -> Path:
        return self.root / hierarchy / self.parent / group.name

    def create(self, name: str) -> Path:
        group_name = f"{self.prefix}{name}"
        for hier in self.HIERARCHIES:
            base = self.root / hier
            if not self.fs.exists(base):
                continue
            for path in (base / self.parent, base / self.parent / group_name):
                try:
                    self.fs.mkdir(path)
                except FileExistsError:
                    pass
                except OSError as exc:
                    raise CgroupError(f"mkdir {path}: {exc}") from exc
        return self.root / "memory" / self.parent / group_name

    def set_memory(self, group: Path | None, limits: MemoryLimits) -> None:
        assert group is not None
        d = self._dir("memory", group)
        if limits.max is not None:
            self._write(d / "memory.limit_in_bytes", "-1" if limits.max < 0 else str(limits.max))
        if limits.high is not None:
            self._write(d / "memory.soft_limit_in_bytes", "-1" if limits.high < 0 else str(limits.high))

    def set_cpu(self, group: Path | None, *, quota_cores: float | None = None, weight: int | None = None) -> None:
        assert group is not None
        d = self._dir("cpu", group)
        if quota_cores is not None:
            self._write(d / "cpu.cfs_period_us", str(CPU_PERIOD_US))
            self._write(d / "cpu.cfs_quota_us", "-1" if quota_cores <= 0 else str(int(quota_cores * CPU_PERIOD_US)))
        if weight is not None:
            # v2 weight 100 == v1 shares 1024 (the kernel's own conversion in reverse).
            self._write(d / "cpu.shares", str(max(2, int(weight * 1024 / 100))))

    def set_pids(self, group: Path | None, pids_max: int | None) -> None:
        assert group is not None
        if pids_max is not None:
            self._write(self._dir("pids", group) / "pids.max", UNLIMITED if pids_max <= 0 else str(pids_max))

    def add_pid(self, group: Path | None, pid: int) -> None:
        assert group is not None
        for hier in self.HIERARCHIES:
            d = self._dir(hier, group)
            if self.fs.exists(d):
                self._write(d / "cgroup.procs", str(pid))

    def procs_files(self, group: Path | None) -> list[Path]:
        assert group is not None
        dirs = [self._dir(h, group) for h in self.HIERARCHIES]
        return [d / "cgroup.procs" for d in dirs if self.fs.exists(d)]

    def procs(self, group: Path | None) -> list[int]:
        assert group is not None
        try:
            return [int(x) for x in self.fs.read(self._dir("memory", group) / "cgroup.procs").split()]
        except FileNotFoundError:
            return []

    def stats(self, group: Path | None) -> CgroupStats:
        assert group is not None
        d = self._dir("memory", group)
        stats = CgroupStats()
        for attr, fname in (("memory_current", "memory.usage_in_bytes"), ("memory_peak", "memory.max_usage_in_bytes")):
            try:
                setattr(stats, attr, int(self.fs.read(d / fname).strip()))
            except (OSError, ValueError):
                pass
        try:
            oom = parse_flat_keyed(self.fs.read(d / "memory.oom_control"))
            stats.events = {"oom_kill": oom.get("oom_kill", 0)}
        except OSError:
            pass
        try:
            stats.cpu_usage_us = int(self.fs.read(self._dir("cpuacct", group) / "cpuacct.usage").strip()) // 1000
        except (OSError, ValueError):
            pass
        return stats

    def kill(self, group: Path | None) -> None:
        for pid in self.procs(group):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def remove(self, group: Path | None, *, timeout_s: float = 5.0) -> None:
        assert group is not None
        self.kill(group)
        deadline = time.monotonic() + timeout_s
        for hier in self.HIERARCHIES:
            _rmdir_when_empty(self.fs, self._dir(hier, group), deadline)

    def list_groups(self) -> list[Path]:
        base = self.root / "memory" / self.parent
        try:
            return sorted(p for p in base.iterdir() if p.is_dir() and p.name.startswith(self.prefix))
        except FileNotFoundError:
            return []

    def _write(self, path: Path, value: str) -> None:
        _checked_write(self.fs, path, value)


class NoopController:
    """Cgroups disabled: groups are None, writes are ignored, stats are empty."""

    kind = "none"

    def create(self, name: str) -> None:
        return None

    def set_memory(self, group: Path | None, limits: MemoryLimits) -> None:
        pass

    def set_cpu(self, group: Path | None, *, quota_cores: float | None = None, weight: int | None = None) -> None:
        pass

    def set_pids(self, group: Path | None, pids_max: int | None) -> None:
        pass

    def add_pid(self, group: Path | None, pid: int) -> None:
        pass

    def procs(self, group: Path | None) -> list[int]:
        return []

    def procs_files(self, group: Path | None) -> list[Path]:
        return []

    def stats(self, group: Path | None) -> CgroupStats:
        return CgroupStats()

    def kill(self, group: Path | None) -> None:
        pass

    def remove(self, group: Path | None, *, timeout_s: float = 5.0) -> None:
        pass

    def list_groups(self) -> list[Path]:
        return []


def make_controller(backend: str, root: str | None, *, prefix: str = "swe-rollout-", fs: CgroupFS | None = None) -> CgroupController:
    """Pick a controller: ``backend`` is ``none``, ``v2``, ``v1`` or ``auto``.

    ``auto`` uses v2 when ``root`` is a cgroup2 directory (has ``cgroup.controllers``),
    v1 when it holds a ``memory/`` hierarchy, and the no-op backend otherwise
    (including ``root=None``: we never pick a system cgroup directory on our own).

    Raises:
        ValueError: unknown backend, or v1/v2 asked for without a root.
    """
    fs = fs or CgroupFS()
    if backend == "none":
        return NoopController()
    if backend not in ("auto", "v1", "v2"):
        raise ValueError(f"cgroup backend must be one of none/auto/v1/v2, got {backend!r}")
    if root is None:
        if backend == "auto":
            return NoopController()
        raise ValueError(f"cgroup backend {backend!r} needs a root directory (a delegated cgroup)")
    rootp = Path(root)
    if backend == "v2" or (backend == "auto" and fs.exists(rootp / "cgroup.controllers")):
        return CgroupV2Controller(rootp, prefix=prefix, fs=fs)
    if backend == "v1" or (backend == "auto" and fs.exists(rootp / "memory")):
        return CgroupV1Controller(rootp, prefix=prefix, fs=fs)
    return NoopController()


def _rmdir_when_empty(fs, group: Path, deadline: float) -> None:
    """Remove a cgroup directory, retrying while killed processes are still exiting.

    A group already gone is fine. Raises ``CgroupError`` when still busy
    (EBUSY/ENOTEMPTY) at ``deadline`` (a ``time.monotonic()`` value) or on another error.
    """
    while True:
        try:
            fs.rmdir(group)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY) or time.monotonic() > deadline:
                raise CgroupError(f"rmdir {group}: {exc}") from exc
            time.sleep(0.01)
