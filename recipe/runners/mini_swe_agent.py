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
from dataclasses import dataclass
from pathlib import Path

from recipe.config import AgentSettings
from recipe.outcome import from_mini_swe_agent
from recipe.runners.base import AgentAdapter, AgentRequest, AgentRun, WrapArgv
from recipe.runners.spec import RunnerResult, RunnerSpec
from sandbox.local import LocalSandbox

__all__ = ["AgentRun", "MiniSweAgent"]


@dataclass
class MiniSweAgent(AgentAdapter):
    """mini-swe-agent through ``recipe.runners.mini_swe_agent_entry`` (run it with
    ``recipe.runners.base.run_agent``).

    Its bash commands go through the sandbox's jail: the sandbox's ``command_prefix``
    (bubblewrap) wraps each of them and the shim's wrap goes in front of it
    (``wrap_scope="command"``), so each command starts inside the rollout's cgroup. The group
    holds the sandbox's tool processes, not the agent harness, whose ~200 MiB is a flat
    per-rollout cost that would hide the tool bursts the shim's limits follow (in Docker
    deployments it lives outside the container too). See docs/resource_shim.md.

    Attributes:
        request: the task and the proxy session.
        trajectory_path: where mini-swe-agent writes its own trajectory file; None = nowhere.
    """

    request: AgentRequest
    trajectory_path: str | None = None

    name = "mini-swe-agent"
    wrap_scope = "command"

    def log_path(self, sandbox: LocalSandbox) -> Path:
        return sandbox.runner_dir / "runner.log"

    def environment(self, sandbox: LocalSandbox, settings: AgentSettings) -> dict[str, str]:
        return self._variables(sandbox.runner_dir, settings)

    def warm_environment(self, settings: AgentSettings, home: Path) -> dict[str, str]:
        # The same variables: mini-swe-agent reads MSWEA_COST_TRACKING and MSWEA_SILENT_STARTUP at
        # import time; the entry re-reads MSWEA_GLOBAL_CONFIG_DIR in the child (follow_environment).
        return self._variables(home, settings)

    @staticmethod
    def _variables(home: Path, settings: AgentSettings) -> dict[str, str]:
        return {
            "MSWEA_CONFIGURED": "true",
            "MSWEA_SILENT_STARTUP": "1",
            "MSWEA_GLOBAL_CONFIG_DIR": str(home / "mini-swe-agent"),
            "MSWEA_COST_TRACKING": "ignore_errors",
            "MSWEA_MODEL_RETRY_STOP_AFTER_ATTEMPT": str(max(1, settings.llm_retry_attempts)),
        }

    async def prepare(self, sandbox: LocalSandbox, settings: AgentSettings, wrap_command: WrapArgv | None) -> list[str]:
        # The runner's files live where the agent's commands cannot reach (no link can be planted there).
        spec_path = sandbox.runner_dir / "runner_spec.json"
        spec = RunnerSpec(
            task=self.request.task_text,
            workdir=str(sandbox.workdir),
            api_base=self.request.api_base,
            api_key=self.request.api_key,
            model_name=self.request.model_name,
            mode=settings.mode,  # type: ignore[arg-type]
            step_limit=settings.step_limit,
            command_timeout_s=settings.command_timeout_s,
            turn_timeout_s=settings.turn_timeout_s,
            trajectory_path=self.trajectory_path,
            result_path=str(self._result_path(sandbox)),
            command_prefix=wrap_command(list(sandbox.command_prefix)) if wrap_command else list(sandbox.command_prefix),
            command_env=sandbox.env(),
            max_output_bytes=settings.max_output_bytes,
            max_workdir_bytes=settings.max_workdir_bytes,
        )
        await asyncio.to_thread(spec_path.write_text, spec.model_dump_json())
        # -P and the runner directory as working directory: nothing in the work tree is importable by this
        # host-side process (litellm imports optional packages lazily, after the agent's commands ran).
        return [sys.executable, "-P", "-m", "recipe.runners.mini_swe_agent_entry", str(spec_path)]

    async def read_result(self, sandbox: LocalSandbox, exit_code: int | None, duration_s: float,
                          log_tail: str) -> AgentRun | None:
        try:
            result = RunnerResult.model_validate_json(await asyncio.to_thread(self._result_path(sandbox).read_text))
        except (OSError, ValueError):
            return None
        return AgentRun(
            exit_status=from_mini_swe_agent(result.exit_status),
            raw_exit_status=result.exit_status,
            n_calls=result.n_calls,
            duration_s=duration_s,
            error=result.error,
            log_tail=log_tail,
            messages=result.messages,
            limits_hit=result.limits_hit,
        )

    @staticmethod
    def _result_path(sandbox: LocalSandbox) -> Path:
        return sandbox.runner_dir / "runner_result.json"
