"""A fake cgroup2 kernel over a temporary directory.

A FAKE because this machine has no writable cgroup2 (a host-owned v1 layout; we must
never write under /sys/fs/cgroup). It mimics what the controller relies on: mkdir
populates interface files, writes are validated like the kernel does (bytes or
``max``; cpu.weight 1..10000; ``cgroup.procs`` moves a pid between groups;
``cgroup.kill`` SIGKILLs the listed pids), rmdir refuses a group with processes
or children (EBUSY), and every write is logged in order for assertions.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import shutil
from pathlib import Path

import psutil

from sandbox.cgroup import CgroupFS

INITIAL_FILES = {
    "cgroup.procs": "",
    "cgroup.controllers": "memory cpu pids",
    "cgroup.subtree_control": "",
    "cgroup.kill": "",
    "memory.current": "0",
    "memory.peak": "0",
    "memory.min": "0",
    "memory.low": "0",
    "memory.high": "max",
    "memory.max": "max",
    "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n",
    "memory.pressure": "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
    "cpu.max": "max 100000",
    "cpu.weight": "100",
    "cpu.stat": "usage_usec 0\nuser_usec 0\nsystem_usec 0\n",
    "pids.max": "max",
}
_BYTES = re.compile(r"^(max|\d+)$")


class FakeCgroupFS(CgroupFS):
    """See module docstring. ``root`` is made a cgroup2-looking directory on construction."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._populate(self.root)
        self.writes: list[tuple[str, str, str]] = []  # (group name, file, value)

    def _populate(self, group: Path) -> None:
        for name, value in INITIAL_FILES.items():
            (group / name).write_text(value)

    def mkdir(self, path: Path) -> None:
        os.mkdir(path)
        self._populate(path)

    def rmdir(self, path: Path) -> None:
        if not path.exists():
            raise FileNotFoundError(errno.ENOENT, "no such group", str(path))
        if (path / "cgroup.procs").read_text().split() or any(p.is_dir() for p in path.iterdir()):
            raise OSError(errno.EBUSY, "group busy", str(path))
        shutil.rmtree(path)

    def write(self, path: Path, value: str) -> None:
        group, name = path.parent, path.name
        if not group.exists():
            raise FileNotFoundError(errno.ENOENT, "no such group", str(group))
        if name not in INITIAL_FILES or name in ("memory.current", "memory.events", "memory.pressure", "cpu.stat"):
            raise OSError(errno.EACCES, "read-only or unknown file", str(path))
        if name.startswith("memory.") and not _BYTES.match(value):
            raise OSError(errno.EINVAL, f"bad value {value!r}", str(path))
        if name == "cpu.weight" and not 1 <= int(value) <= 10000:
            raise OSError(errno.ERANGE, "weight out of range", str(path))
        self.writes.append((group.name, name, value))
        if name == "cgroup.procs":
            pid = int(value)
            if not psutil.pid_exists(pid):
                raise OSError(errno.ESRCH, "no such process", str(path))
            for other in self.root.rglob("cgroup.procs"):
                pids = [p for p in other.read_text().split() if p != value]
                other.write_text("\n".join(pids))
            path.write_text("\n".join([*path.read_text().split(), value]))
        elif name == "cgroup.kill":
            for pid in (group / "cgroup.procs").read_text().split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            (group / "cgroup.procs").write_text("")
        else:
            path.write_text(value)

    # Test helpers: what the kernel would report.
    def set_usage(self, group: Path, current: int) -> None:
        (group / "memory.current").write_text(str(current))
        peak = int((group / "memory.peak").read_text())
        (group / "memory.peak").write_text(str(max(peak, current)))

    def writes_to(self, group: Path, name: str) -> list[str]:
        return [v for g, n, v in self.writes if g == group.name and n == name]
