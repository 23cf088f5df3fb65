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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from core.process import kill_process_group
from recipe.config import AgentSettings
from recipe.outcome import ExitStatus
from sandbox.local import LocalSandbox

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

    @abc.abstractmethod
    async def read_result(self, sandbox: LocalSandbox, exit_code: int | None, duration_s: float,
                          log_tail: str) -> AgentRun | None:
        """The run's outcome from what the agent left, or None when it left no result."""


def agent_environment(sandbox: LocalSandbox, variables: dict[str, str]) -> dict[str, str]:
    """An agent process's environment: the sandbox's allowlist (``LocalSandbox.runner_env``: no
    trainer secret), ``RUNNER_ENV`` and the agent's ``variables``. Its commands get
    ``sandbox.command_env`` instead."""
    return sandbox.runner_env({**RUNNER_ENV, **variables})


async def run_agent(
    adapter: AgentAdapter, sandbox: LocalSandbox, settings: AgentSettings, *, wrap_argv: WrapArgv | None = None
) -> AgentRun:
    """Run one agent in ``sandbox`` until it exits or ``settings.rollout_timeout_s`` seconds.

    Raises:
        asyncio.CancelledError: after the agent's process group is killed (the sandbox's
            teardown kills what its commands left running).
        OSError: the agent's files cannot be written or its command cannot start.
    """
    argv = await adapter.prepare(sandbox, settings, wrap_argv if adapter.wrap_scope == "command" else None)
    log_path = adapter.log_path(sandbox)
    exit_code, timed_out, duration = await spawn_agent(
        sandbox, argv, env=agent_environment(sandbox, adapter.environment(sandbox, settings)), log_path=log_path,
        timeout_s=settings.rollout_timeout_s, wrap_argv=wrap_argv if adapter.wrap_scope == "agent" else None,
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
) -> tuple[int | None, bool, float]:
    """Run an agent process in its own process group until it exits.

    Its working directory is ``sandbox.runner_dir``, never the work tree: a host-side process must not
    find the policy's files on its import path (``python -m`` puts the working directory first).

    stdout and stderr go to ``log_path``. At ``timeout_s`` seconds, or on
    cancellation, the whole group is SIGKILLed (cancellation then propagates).

    Returns:
        (exit code or None, whether it was killed at the timeout, wall-clock seconds).
    """
    start = time.monotonic()
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


def _tail(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-LOG_TAIL_CHARS:].decode("utf-8", errors="replace")
