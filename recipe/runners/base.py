"""What every agent runner shares: spawning the agent process, its environment, its limits,
and turning its exit into an ``AgentRun``.

An agent is a thin adapter (``AgentAdapter``): the files it needs written, its command
line, its own environment variables, and how to read its result. ``run_agent`` does the
rest the same way for every agent: the process runs in its own process group with the
runner directory as its working directory and an allowlisted environment, is killed at
``rollout_timeout_s`` (status ``rollout_timeout``) or on cancellation, and a process that
exits without a result is ``agent_error`` with the tail of its log.

Where the resource shim's ``wrap_argv`` goes is the adapter's ``wrap_scope``: in front of
every tool command (``"command"``: the agent harness stays outside the rollout's cgroup,
see docs/resource_shim.md) when the agent runs commands through our jail, or in front of
the whole agent (``"agent"``) when the agent runs them itself.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from core.process import kill_process_group
from recipe.config import AgentSettings
from recipe.outcome import ExitStatus
from recipe.runners.warm_start import PLACEHOLDER_MARKER, AgentForkServer, WarmProcess, WarmStartError, WarmStartPool
from sandbox.jail import clean_env
from sandbox.local import ROLLOUT_MARKER_ENV, LocalSandbox

logger = logging.getLogger(__name__)

LOG_TAIL_CHARS = 4000

# Every agent process gets these besides the sandbox's allowlist: unbuffered logs, no .pyc
# files written next to the runner's code, and litellm's bundled cost map (no network fetch).
RUNNER_ENV = {
    "PYTHONUNBUFFERED": "1",
    "PYTHONDONTWRITEBYTECODE": "1",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
}

WrapArgv = Callable[[list[str]], list[str]]


@dataclass
class AgentRun:
    """What one agent subprocess did.

    Attributes:
        exit_status: our closed-set status.
        raw_exit_status: the agent's own status string (or ``killed``/``crashed``).
        n_calls: LLM calls the agent made.
        duration_s: wall-clock seconds from spawn to exit.
        error: error text when the agent crashed or was killed, else None.
        log_tail: the end of the subprocess's stdout/stderr.
        messages: the agent's own message history (its format).
        limits_hit: the sandbox limits the agent's commands ran into (``RunnerResult.limits_hit``).
    """

    exit_status: ExitStatus
    raw_exit_status: str
    n_calls: int
    duration_s: float
    error: str | None = None
    log_tail: str = ""
    messages: list[dict[str, Any]] = field(default_factory=list)
    limits_hit: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class AgentRequest:
    """What every agent is asked to do: the task, and the proxy session it talks to.

    Attributes:
        task_text: the problem statement.
        api_base: the session's OpenAI base URL (``.../sessions/<id>/v1``).
        api_key: the session's bearer key.
        model_name: the model name the proxy answers to.
    """

    task_text: str
    api_base: str
    api_key: str
    model_name: str


class AgentAdapter(abc.ABC):
    """One agent's side of a run (see module docstring)."""

    name: ClassVar[str]
    wrap_scope: ClassVar[Literal["command", "agent"]]

    @abc.abstractmethod
    def log_path(self, sandbox: LocalSandbox) -> Path:
        """Where the process's stdout and stderr go."""

    @abc.abstractmethod
    def environment(self, sandbox: LocalSandbox, settings: AgentSettings) -> dict[str, str]:
        """The agent's own variables (added to ``RUNNER_ENV`` and the sandbox's allowlist)."""

    @abc.abstractmethod
    async def prepare(self, sandbox: LocalSandbox, settings: AgentSettings, wrap_command: WrapArgv | None) -> list[str]:
        """Write what the agent reads and return its command line; ``wrap_command`` is the
        shim's wrap when ``wrap_scope == "command"``, else None."""

    def warm_environment(self, settings: AgentSettings, home: Path) -> dict[str, str] | None:
        """The agent's own variables (as ``environment``) for a warm-start server whose private
        directory is ``home``, or None when this agent always starts cold (the default)."""
        return None

    @abc.abstractmethod
    async def read_result(self, sandbox: LocalSandbox, exit_code: int | None, duration_s: float,
                          log_tail: str) -> AgentRun | None:
        """The run's outcome from what the agent left, or None when it left no result."""


def agent_environment(sandbox: LocalSandbox, variables: dict[str, str]) -> dict[str, str]:
    """An agent process's environment: the sandbox's allowlist (``LocalSandbox.runner_env``: no
    trainer secret), ``RUNNER_ENV`` and the agent's ``variables``. Its commands get
    ``sandbox.command_env`` instead."""
    return sandbox.runner_env({**RUNNER_ENV, **variables})


def warm_server_environment(home: Path, variables: dict[str, str]) -> dict[str, str]:
    """A warm-start server's environment: what ``agent_environment`` gives a rollout, with ``home`` for
    the rollout's directory and the placeholder rollout id (``recipe.runners.warm_start``)."""
    return clean_env(path_first=os.path.dirname(sys.executable), home=str(home),
                     extra={ROLLOUT_MARKER_ENV: PLACEHOLDER_MARKER, **RUNNER_ENV, **variables})


async def run_agent(
    adapter: AgentAdapter, sandbox: LocalSandbox, settings: AgentSettings, *, wrap_argv: WrapArgv | None = None,
    warm: WarmStartPool | None = None,
) -> AgentRun:
    """Run one agent in ``sandbox`` until it exits or ``settings.rollout_timeout_s`` seconds.

    With ``warm`` (and an adapter that has a ``warm_environment``, no whole-agent wrap), the agent
    process is forked from the worker's pre-imported server instead of started cold; everything
    else is the same.

    Raises:
        asyncio.CancelledError: after the agent's process group is killed (the sandbox's
            teardown kills what its commands left running).
        OSError: the agent's files cannot be written or its command cannot start.
    """
    argv = await adapter.prepare(sandbox, settings, wrap_argv if adapter.wrap_scope == "command" else None)
    log_path = adapter.log_path(sandbox)
    agent_wrap = wrap_argv if adapter.wrap_scope == "agent" else None
    server = None
    module = _module_argv(argv)
    # warm_environment None: this agent always starts cold.
    if (warm is not None and agent_wrap is None and module is not None
            and adapter.warm_environment(settings, Path()) is not None):
        server = await warm.server(
            module[0], lambda home: warm_server_environment(home, adapter.warm_environment(settings, home) or {}))
    exit_code, timed_out, duration = await spawn_agent(
        sandbox, argv, env=agent_environment(sandbox, adapter.environment(sandbox, settings)), log_path=log_path,
        timeout_s=settings.rollout_timeout_s, wrap_argv=agent_wrap, warm=server,
    )
    log_tail = await asyncio.to_thread(_tail, log_path)
    if timed_out:
        return AgentRun(ExitStatus.ROLLOUT_TIMEOUT, "killed", 0, duration, log_tail=log_tail,
                        error=f"{adapter.name} killed after rollout_timeout_s={settings.rollout_timeout_s}")
    result = await adapter.read_result(sandbox, exit_code, duration, log_tail)
    if result is None:
        return AgentRun(ExitStatus.AGENT_ERROR, "crashed", 0, duration, log_tail=log_tail,
                        error=f"{adapter.name} exited with code {exit_code} without a result")
    return result


async def spawn_agent(
    sandbox: LocalSandbox,
    argv: list[str],
    *,
    env: dict[str, str],
    log_path: Path,
    timeout_s: float,
    wrap_argv: WrapArgv | None = None,
    warm: AgentForkServer | None = None,
) -> tuple[int | None, bool, float]:
    """Run an agent process in its own process group until it exits.

    Its working directory is ``sandbox.runner_dir``, never the work tree: a host-side process must not
    find the policy's files on its import path (``python -m`` puts the working directory first).

    stdout and stderr go to ``log_path``. At ``timeout_s`` seconds, or on
    cancellation, the whole group is SIGKILLed (cancellation then propagates).

    With ``warm`` (a fork server for ``argv``'s module; ``argv`` is ``[python, -P, -m, module, *args]``
    and ``wrap_argv`` None) the process is that server's forked child; if the server cannot fork it,
    it starts cold.

    Returns:
        (exit code or None, whether it was killed at the timeout, wall-clock seconds).
    """
    start = time.monotonic()
    module_argv = _module_argv(argv)
    if warm is not None and wrap_argv is None and module_argv is not None and module_argv[0] == warm.module:
        try:
            child = await warm.spawn(module_argv[1], env=env, cwd=str(sandbox.runner_dir), log_path=str(log_path),
                                     marker=sandbox.rollout_id)
        except WarmStartError as exc:
            logger.warning("warm start failed, starting cold: %s", exc)
        else:
            return await _wait_warm(sandbox, child, timeout_s, start)
    with open(log_path, "wb") as log:
        proc = await asyncio.create_subprocess_exec(
            *(wrap_argv(argv) if wrap_argv else argv),
            cwd=str(sandbox.runner_dir),
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
    sandbox.track_process_group(proc.pid)
    timed_out = False
    try:
        await asyncio.wait_for(proc.wait(), timeout=timeout_s)
    except asyncio.TimeoutError:
        timed_out = True
        kill_process_group(proc.pid)
        await proc.wait()
    except BaseException:
        kill_process_group(proc.pid)
        raise
    return proc.returncode, timed_out, time.monotonic() - start


async def _wait_warm(sandbox: LocalSandbox, child: WarmProcess, timeout_s: float,
                     start: float) -> tuple[int | None, bool, float]:
    sandbox.track_process_group(child.pid)
    timed_out = False
    try:
        code = await asyncio.wait_for(child.wait(), timeout=timeout_s)
    except asyncio.TimeoutError:
        timed_out = True
        kill_process_group(child.pid)
        code = await child.wait()
    except BaseException:
        kill_process_group(child.pid)
        child.close()
        raise
    return code, timed_out, time.monotonic() - start


def _module_argv(argv: list[str]) -> tuple[str, list[str]] | None:
    """(module, args) of ``[this python, -P, -m, module, *args]``; None for any other command line."""
    if len(argv) >= 4 and argv[0] == sys.executable and argv[1:3] == ["-P", "-m"]:
        return argv[3], list(argv[4:])
    return None


def _tail(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-LOG_TAIL_CHARS:].decode("utf-8", errors="replace")
