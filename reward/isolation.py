"""The environment and sandboxing of the grading test run.

The test run is the patched code running, so it gets the agent's kind of jail
(``sandbox.jail``): bubblewrap's deny-by-default file system view (the system read-only,
the task's interpreter read-only, the grade's own copy writable, nothing else: no
task data, no checkpoints, no ``/root``), new PID/network/IPC/UTS namespaces (every
process it starts dies with it; no route out), an unprivileged uid with no
capabilities when the grader is root (``RewardConfig.run_as_uid``), rlimits on
processes, memory and file size, and an allowlist environment (no trainer secrets).

``RewardConfig.network`` picks the network isolation:

- ``unshare`` (and ``auto`` where namespaces work): an empty network namespace holding
  only a loopback device, from bubblewrap (or ``unshare --net`` without it). No route
  leaves it: connects fail with ENETUNREACH.
- ``env``: proxy variables point at a closed local port and pip is offline. This stops
  proxy-aware clients (pip, requests, urllib, httpx) only; a raw socket still connects.
  It is the fallback when namespaces are unavailable.
"""

from __future__ import annotations

import os
import shlex
import threading
from dataclasses import dataclass, field

from core.task import SWETask
from reward.config import RewardConfig
from sandbox.jail import JailSpec, bwrap_available, clean_env, interpreter_paths, jail_argv, unshare_available

# Port 9 (discard) on loopback: nothing listens there, so proxied requests fail fast.
_DEAD_PROXY = "http://127.0.0.1:9"


@dataclass
class NetworkPolicy:
    """Resolves a ``RewardConfig.network`` mode and wraps test commands in the grading jail.

    Args:
        mode: ``auto``, ``unshare`` or ``env`` (see the module docstring).
        spec: the jail's uid and limits (``grading_spec``).

    ``effective`` is the mode actually used (``unshare`` or ``env``); for ``auto`` it is
    decided by one namespace probe per process (``sandbox.jail``; blocking, guarded by a
    lock, so call it from a thread when on an event loop).
    """

    mode: str = "auto"
    spec: JailSpec = field(default_factory=JailSpec)
    _effective: str | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def effective(self) -> str:
        with self._lock:
            if self._effective is None:
                if self.mode == "env":
                    self._effective = "env"
                elif self.mode == "unshare":
                    self._effective = "unshare"
                else:
                    self._effective = "unshare" if (bwrap_available() or unshare_available()) else "env"
            return self._effective

    def wrap(self, command: str, *, writable: list[str] = (), readable: list[str] = (),  # type: ignore[assignment]
             chdir: str | None = None, spec: JailSpec | None = None) -> list[str]:
        """argv running the shell ``command`` in the grading jail (blocking: may probe).

        ``spec``: this grade's jail with its leased uid (``sandbox.jail.lease_uid(self.spec).spec``).
        """
        spec = spec or self.spec
        if self.effective == "env":
            spec = JailSpec(**{**spec.__dict__, "network": True})
        return jail_argv(spec, ["bash", "-c", command], writable=list(writable), readable=list(readable),
                         chdir=chdir)


def grading_policy(config: RewardConfig) -> NetworkPolicy:
    """The network mode and jail (uid, limits) of ``config``'s test runs."""
    spec = JailSpec(uid=config.run_as_uid, gid=config.run_as_uid, uid_pool_size=config.uid_pool_size,
                    max_processes=config.max_processes,
                    max_address_space_bytes=config.max_memory_bytes, max_file_bytes=config.max_file_bytes)
    return NetworkPolicy(config.network, spec)


def task_interpreter(task: SWETask) -> str:
    """The interpreter the task's ``python`` resolves to (``task.env_bin``, else this one)."""
    return task.host_python


def grading_readable(task: SWETask) -> list[str]:
    """What the test run reads besides the system: the task's interpreter and its installation."""
    return interpreter_paths(task_interpreter(task))


def grading_env(task: SWETask, home: str) -> dict[str, str]:
    """The test run's environment: an allowlist (``sandbox.jail.clean_env``), nothing inherited.

    The task's Python first on PATH; no bytecode files (the copy stays pristine), no
    colour (the log stays readable), user site-packages off (a ``.pth`` or
    ``usercustomize`` in a user site directory would run at start-up), proxies pointed
    at a dead port and pip offline.
    """
    env = clean_env(path_first=os.path.dirname(task_interpreter(task)), home=home, extra={
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONNOUSERSITE": "1",
        "PY_COLORS": "0",
        "NO_COLOR": "1",
        "PIP_NO_INDEX": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        # Loopback stays direct: tests may run a local server.
        "no_proxy": "localhost,127.0.0.1,::1",
        "NO_PROXY": "localhost,127.0.0.1,::1",
    })
    for key in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        env[key] = _DEAD_PROXY
    return env


def shell_join(command: str, names: list[str]) -> str:
    """``command`` followed by each of ``names`` shell-quoted."""
    return " ".join([command, *(shlex.quote(name) for name in names)])
