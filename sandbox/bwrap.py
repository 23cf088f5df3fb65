"""Bubblewrap (``bwrap``) isolation for the local sandbox's commands.

A wrapped command sees: the host file system read-only (``--ro-bind / /``), no
network (``--unshare-all`` = new net, pid, ipc, uts, user, cgroup namespaces; only
a loopback device without routes), its own /proc and /dev, a private /tmp
(tmpfs), and exactly two writable places: the rollout's work tree and its
private home. Other rollouts' sandboxes (the sandbox parent directory), the
task data directory and the hidden tests are covered by empty tmpfs mounts.
``--die-with-parent`` and the pid namespace make every process of the command
die with it (no leaks from a killed command).

Debian/Ubuntu: ``apt-get install -y bubblewrap``. Needs unprivileged user
namespaces or root; ``probe_bwrap()`` runs a trial command and says why not.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# Seconds allowed for the one-off availability probe.
PROBE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class BwrapProbe:
    """Whether bubblewrap works here; ``reason`` says why not (for logs and skipped tests)."""

    available: bool
    executable: str | None
    reason: str


def probe_bwrap(executable: str | None = None) -> BwrapProbe:
    """Run ``bwrap --unshare-all --ro-bind / / true`` once and report the result.

    Blocking (a short subprocess); call once at start-up.
    """
    exe = executable or shutil.which("bwrap")
    if not exe:
        return BwrapProbe(False, None, "bwrap not found on PATH (apt-get install -y bubblewrap)")
    try:
        proc = subprocess.run(
            [exe, "--unshare-all", "--die-with-parent", "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev", "true"],
            capture_output=True, text=True, timeout=PROBE_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return BwrapProbe(False, exe, f"bwrap probe failed: {exc}")
    if proc.returncode != 0:
        return BwrapProbe(False, exe, f"bwrap cannot create namespaces here: {proc.stderr.strip()[:300]}")
    return BwrapProbe(True, exe, "ok")


def _covers(hidden: Path, needed: Path) -> bool:
    return needed == hidden or hidden in needed.parents


def bwrap_argv(
    executable: str,
    *,
    writable: Iterable[str | os.PathLike[str]],
    hide: Iterable[str | os.PathLike[str]] = (),
    keep_visible: Iterable[str | os.PathLike[str]] = (),
    chdir: str | os.PathLike[str] | None = None,
    share_net: bool = False,
) -> list[str]:
    """The ``bwrap ...`` prefix for one sandbox's commands (append ``bash -c CMD``).

    Args:
        writable: directories bound read-write at the same path (work tree, home).
        hide: directories covered by an empty tmpfs (other sandboxes, task data,
            hidden tests); files are covered by /dev/null. A path that would hide
            one of ``keep_visible`` or ``writable`` (e.g. the interpreter) is refused.
        keep_visible: paths the command needs (interpreter, task env); default adds
            this Python's prefix.
        chdir: working directory inside.
        share_net: keep the host network (tests of the network block use False).

    Raises:
        ValueError: a hidden path would hide a needed one (the message names both).
    """
    writable = [Path(w).resolve() for w in writable]
    needed = [Path(p).resolve() for p in keep_visible] + [Path(sys.prefix).resolve(), *writable]
    argv = [executable, "--die-with-parent", "--new-session"]
    argv += ["--unshare-all", "--share-net"] if share_net else ["--unshare-all"]
    argv += ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
    for h in hide:
        hp = Path(h).resolve()
        if not hp.exists():
            continue
        for n in needed:
            if _covers(hp, n) and n not in writable:
                raise ValueError(f"hiding {hp} would hide {n}, which sandboxed commands need")
        if hp.is_dir():
            argv += ["--tmpfs", str(hp)]
        else:
            argv += ["--ro-bind", "/dev/null", str(hp)]
    # Writable binds come last so they reappear inside hidden parents (e.g. /tmp).
    for w in writable:
        argv += ["--bind", str(w), str(w)]
    if chdir is not None:
        argv += ["--chdir", str(Path(chdir).resolve())]
    return argv
