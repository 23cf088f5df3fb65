"""Host side of a mini-swe-agent run: one unattended subprocess per rollout.

The subprocess (``recipe.runners.mini_swe_agent_entry``) runs in its own
process group, with its working directory and every bash command in the
sandbox's work tree, and talks only to the rollout's ModelProxy session. Facts
about unattended runs come from mini-swe-agent 2.x's code: ``MSWEA_CONFIGURED``
skips the first-run wizard, a private ``MSWEA_GLOBAL_CONFIG_DIR`` keeps rollouts
apart, ``MSWEA_COST_TRACKING=ignore_errors`` stops unknown model names from
raising, ``LITELLM_LOCAL_MODEL_COST_MAP`` stops litellm from fetching its cost
map over the network, and ``MSWEA_MODEL_RETRY_STOP_AFTER_ATTEMPT`` lowers its
10-attempt retry loop.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from recipe.config import AgentSettings
from recipe.outcome import ExitStatus, from_mini_swe_agent
from recipe.runners.spec import RunnerResult, RunnerSpec
from sandbox.local import LocalSandbox
from core.process import kill_process_group

_LOG_TAIL_CHARS = 4000


@dataclass
class AgentRun:
    """What one agent subprocess did.

    Attributes:
        exit_status: our closed-set status.
        raw_exit_status: mini-swe-agent's own status string (or ``killed``/``crashed``).
        n_calls: LLM calls the agent made.
        duration_s: wall-clock seconds from spawn to exit.
        error: error text when the agent crashed or was killed, else None.
        log_tail: the end of the subprocess's stdout/stderr.
        messages: the agent's own message history (mini-swe-agent format).
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


def agent_environment(sandbox: LocalSandbox, settings: AgentSettings) -> dict[str, str]:
    """The agent process's environment: an allowlist (``LocalSandbox.runner_env``: no trainer secret)
    with the unattended-run settings. Its commands get ``sandbox.command_env`` instead."""
    return sandbox.runner_env({
        "MSWEA_CONFIGURED": "true",
        "MSWEA_SILENT_STARTUP": "1",
        "MSWEA_GLOBAL_CONFIG_DIR": str(sandbox.runner_dir / "mini-swe-agent"),
        "MSWEA_COST_TRACKING": "ignore_errors",
        "MSWEA_MODEL_RETRY_STOP_AFTER_ATTEMPT": str(max(1, settings.llm_retry_attempts)),
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    })


async def run_mini_swe_agent(
    sandbox: LocalSandbox,
    *,
    task_text: str,
    api_base: str,
    api_key: str,
    model_name: str,
    settings: AgentSettings,
    trajectory_path: str | None = None,
    wrap_argv: Callable[[list[str]], list[str]] | None = None,
) -> AgentRun:
    """Run mini-swe-agent on ``task_text`` in ``sandbox`` until it exits or ``settings.rollout_timeout_s``.

    On timeout the agent's process group is killed and the status is
    ``rollout_timeout``. On cancellation the group is killed and
    ``asyncio.CancelledError`` propagates (the sandbox's teardown kills anything
    the agent's commands left running). The sandbox's ``command_prefix``
    (bubblewrap) wraps each of the agent's bash commands, and ``wrap_argv`` (the
    resource shim's) goes in front of it, so each command starts inside the
    rollout's cgroup: the group holds the sandbox's tool processes, not the agent
    harness (whose ~200 MiB is a flat per-rollout cost that would hide the tool
    bursts the shim's limits follow; in Docker deployments it lives outside the
    container too). See docs/resource_shim.md.
    """
    # The runner's files live where the agent's commands cannot reach (no link can be planted there).
    spec_path = sandbox.runner_dir / "runner_spec.json"
    result_path = sandbox.runner_dir / "runner_result.json"
    log_path = sandbox.runner_dir / "runner.log"
    spec = RunnerSpec(
        task=task_text,
        workdir=str(sandbox.workdir),
        api_base=api_base,
        api_key=api_key,
        model_name=model_name,
        mode=settings.mode,  # type: ignore[arg-type]
        step_limit=settings.step_limit,
        command_timeout_s=settings.command_timeout_s,
        turn_timeout_s=settings.turn_timeout_s,
        trajectory_path=trajectory_path,
        result_path=str(result_path),
        command_prefix=wrap_argv(list(sandbox.command_prefix)) if wrap_argv else list(sandbox.command_prefix),
        command_env=sandbox.env(),
        max_output_bytes=settings.max_output_bytes,
        max_workdir_bytes=settings.max_workdir_bytes,
    )
    await asyncio.to_thread(spec_path.write_text, spec.model_dump_json())

    # -P and the runner directory as working directory: nothing in the work tree is importable by this
    # host-side process (litellm imports optional packages lazily, after the agent's commands ran).
    argv = [sys.executable, "-P", "-m", "recipe.runners.mini_swe_agent_entry", str(spec_path)]
    exit_code, timed_out, duration = await spawn_agent(
        sandbox, argv, env=agent_environment(sandbox, settings), log_path=log_path,
        timeout_s=settings.rollout_timeout_s,
    )

    log_tail = await asyncio.to_thread(_tail, log_path)
    if timed_out:
        return AgentRun(
            exit_status=ExitStatus.ROLLOUT_TIMEOUT,
            raw_exit_status="killed",
            n_calls=0,
            duration_s=duration,
            error=f"agent killed after rollout_timeout_s={settings.rollout_timeout_s}",
            log_tail=log_tail,
        )
    try:
        result = RunnerResult.model_validate_json(await asyncio.to_thread(result_path.read_text))
    except (OSError, ValueError):
        return AgentRun(
            exit_status=ExitStatus.AGENT_ERROR,
            raw_exit_status="crashed",
            n_calls=0,
            duration_s=duration,
            error=f"agent process exited with code {exit_code} without a result",
            log_tail=log_tail,
        )
    return AgentRun(
        exit_status=from_mini_swe_agent(result.exit_status),
        raw_exit_status=result.exit_status,
        n_calls=result.n_calls,
        duration_s=duration,
        error=result.error,
        log_tail=log_tail,
        messages=result.messages,
        limits_hit=result.limits_hit,
    )


async def spawn_agent(
    sandbox: LocalSandbox,
    argv: list[str],
    *,
    env: dict[str, str],
    log_path: Path,
    timeout_s: float,
    wrap_argv: Callable[[list[str]], list[str]] | None = None,
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
    return data[-_LOG_TAIL_CHARS:].decode("utf-8", errors="replace")
