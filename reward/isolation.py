"""The environment and sandboxing of the grading test run.

Two ways to keep the test run off the network (``RewardConfig.network``):

- ``unshare``: ``unshare --map-current-user --net`` puts the run in a new user
  and network namespace holding only a loopback device (brought up when the
  namespace permits it, so tests that use 127.0.0.1 still work). No route
  leaves the namespace: connects fail with ENETUNREACH. Needs unprivileged
  user namespaces (util-linux ``unshare``, kernel support); probed once per
  ``NetworkPolicy``.
- ``env``: proxy variables point at a closed local port and pip is offline.
  This stops proxy-aware clients (pip, requests, urllib, httpx) only; a raw
  socket still connects. It is the fallback when namespaces are unavailable.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import threading
from dataclasses import dataclass, field

from prepare.task import SWETask, task_path_env

# Seconds the namespace probe may take before unshare is declared unavailable.
UNSHARE_PROBE_TIMEOUT_S = 10.0
_UNSHARE = ("unshare", "--map-current-user", "--net", "--")
# Port 9 (discard) on loopback: nothing listens there, so proxied requests fail fast.
_DEAD_PROXY = "http://127.0.0.1:9"
# Variables of an outer pytest or Python setup that must not leak into the task's run.
_DROPPED_ENV = (
    "PYTEST_ADDOPTS",
    "PYTEST_PLUGINS",
    "PYTEST_CURRENT_TEST",
    "PYTHONPATH",
    "PYTHONSTARTUP",
    "PYTHONHOME",
    "PYTHONINSPECT",
    "PYTHONUSERBASE",
    "PYTHONSAFEPATH",
)


def _probe_unshare() -> bool:
    try:
        proc = subprocess.run(
            [*_UNSHARE, "true"], capture_output=True, timeout=UNSHARE_PROBE_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


@dataclass
class NetworkPolicy:
    """Resolves a ``RewardConfig.network`` mode and wraps test commands accordingly.

    Args:
        mode: ``auto``, ``unshare`` or ``env`` (see the module docstring).

    ``effective`` is the mode actually used (``unshare`` or ``env``); for
    ``auto`` it is decided by one probe run of ``unshare ... true`` (at most
    ``UNSHARE_PROBE_TIMEOUT_S`` seconds, blocking; done at most once per policy,
    guarded by a lock, so call it from a thread when on an event loop).
    """

    mode: str = "auto"
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
                    self._effective = "unshare" if _probe_unshare() else "env"
            return self._effective

    def wrap(self, command: str) -> list[str]:
        """argv running the shell ``command`` under this policy.

        With ``unshare`` the loopback device is brought up first when possible
        (``ip link set lo up``; failure is ignored: tests then see no loopback).
        """
        if self.effective == "unshare":
            script = "ip link set lo up >/dev/null 2>&1 || true\n" + command
            return [*_UNSHARE, "bash", "-c", script]
        return ["bash", "-c", command]


def grading_env(task: SWETask, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for the grading test run.

    The task's Python first on PATH (``task_path_env``); no bytecode files (the
    copy stays pristine), no colour (the log stays parseable), no outer pytest or
    Python settings, user site-packages off (a ``.pth`` or ``usercustomize`` in
    the user's site directory would otherwise run at start-up), proxies pointed
    at a dead port and pip offline.
    """
    env = task_path_env(task, dict(os.environ if base is None else base))
    for key in _DROPPED_ENV:
        env.pop(key, None)
    env.update(
        {
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONNOUSERSITE": "1",
            "PY_COLORS": "0",
            "NO_COLOR": "1",
            "PIP_NO_INDEX": "1",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            # Loopback stays direct: tests may run a local server.
            "no_proxy": "localhost,127.0.0.1,::1",
            "NO_PROXY": "localhost,127.0.0.1,::1",
        }
    )
    for key in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        env[key] = _DEAD_PROXY
    return env


def shell_join(command: str, names: list[str]) -> str:
    """``command`` followed by each of ``names`` shell-quoted."""
    return " ".join([command, *(shlex.quote(name) for name in names)])
