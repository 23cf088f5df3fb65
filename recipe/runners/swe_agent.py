"""SWE-agent 1.x (``sweagent run``) as the agent subprocess of a rollout.

SWE-agent is not on PyPI (the ``sweagent`` 0.0.1 there is a 2024 placeholder):
users install it from source, and this backend is used when the ``sweagent``
command exists. Facts from SWE-agent's code and docs that shape the command:

- it calls models through litellm, so ``openai/<name>`` + ``api_base`` reaches
  the proxy session; unknown models need both cost limits at 0 and
  ``max_input_tokens=0`` or it refuses to run;
- its default history processors rewrite old observations; for training the
  history must be append-only, so they are switched off (``history_processors: []``);
- function calling is the tool interface (``parse_function.type: function_calling``);
- ``--problem_statement.path`` / ``.id`` name the task and the trajectory file
  ``<output_dir>/<id>/<id>.traj``; the ``local`` deployment writes outside the
  repo (``/root``, ``/<repo name>``), so it is not safe for concurrent rollouts:
  ``docker`` is the default deployment.

The patch is always taken from the sandbox by the loop, never from SWE-agent's
own ``.patch`` file.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from recipe.config import AgentSettings
from recipe.outcome import ExitStatus
from recipe.runners.base import AgentAdapter, AgentRequest, AgentRun, WrapArgv
from sandbox.local import LocalSandbox

SWEAGENT_COMMAND = "sweagent"


def sweagent_available() -> bool:
    """Whether the ``sweagent`` command is installed."""
    return shutil.which(SWEAGENT_COMMAND) is not None


def from_swe_agent(exit_status: str) -> ExitStatus:
    """Map SWE-agent's ``info.exit_status`` (``submitted``, ``exit_context``...) to ours."""
    status = (exit_status or "").strip()
    if status.startswith("submitted"):
        return ExitStatus.SUBMITTED
    if "exit_context" in status:
        return ExitStatus.CONTEXT_LIMIT
    if "exit_cost" in status or "exit_step" in status or "exit_call" in status:
        return ExitStatus.STEP_LIMIT
    if "exit_total_execution_time" in status:
        return ExitStatus.ROLLOUT_TIMEOUT
    if "exit_api" in status:
        return ExitStatus.PROXY_ERROR
    return ExitStatus.AGENT_ERROR


@dataclass
class SWEAgentInvocation:
    """Everything one ``sweagent run`` needs; ``argv()`` builds the command."""

    problem_path: Path
    problem_id: str
    repo_path: Path
    output_dir: Path
    config_path: Path
    api_base: str
    api_key: str
    model_name: str
    deployment: str = "docker"
    image: str | None = None
    step_limit: int = 30
    default_config: Path | None = None

    def argv(self) -> list[str]:
        """The ``sweagent run`` command line (list form: nothing goes through a shell)."""
        argv = [SWEAGENT_COMMAND, "run"]
        # Later --config files override earlier ones: SWE-agent's defaults, then ours.
        if self.default_config is not None:
            argv.append(f"--config={self.default_config}")
        argv += [
            f"--config={self.config_path}",
            f"--agent.model.name=openai/{self.model_name}",
            f"--agent.model.api_base={self.api_base}",
            f"--agent.model.api_key={self.api_key}",
            "--agent.model.per_instance_cost_limit=0",
            "--agent.model.total_cost_limit=0",
            "--agent.model.max_input_tokens=0",
            f"--agent.model.per_instance_call_limit={self.step_limit}",
            f"--env.deployment.type={self.deployment}",
            f"--env.repo.path={self.repo_path}",
            f"--problem_statement.path={self.problem_path}",
            f"--problem_statement.id={self.problem_id}",
            f"--output_dir={self.output_dir}",
        ]
        if self.deployment == "docker" and self.image:
            argv.append(f"--env.deployment.image={self.image}")
        return argv

    def trajectory_path(self) -> Path:
        """Where SWE-agent writes the trajectory (``info.exit_status`` inside)."""
        return self.output_dir / self.problem_id / f"{self.problem_id}.traj"


def training_config() -> dict:
    """SWE-agent config overrides for RL: append-only history, function calling."""
    return {"agent": {"history_processors": [], "tools": {"parse_function": {"type": "function_calling"}}}}


def default_config_path() -> Path | None:
    """SWE-agent's own ``config/default.yaml`` when SWE-agent is importable, else None."""
    try:
        from sweagent import CONFIG_DIR  # type: ignore[import-not-found]
    except ImportError:
        return None
    path = Path(CONFIG_DIR) / "default.yaml"
    return path if path.is_file() else None


@dataclass
class SWEAgent(AgentAdapter):
    """``sweagent run``: SWE-agent executes its commands itself (in its deployment), so the
    shim wraps the whole process (``wrap_scope="agent"``)."""

    invocation: SWEAgentInvocation
    task_text: str

    name = "sweagent"
    wrap_scope = "agent"

    def log_path(self, sandbox: LocalSandbox) -> Path:
        return sandbox.home / "sweagent.log"

    def environment(self, sandbox: LocalSandbox, settings: AgentSettings) -> dict[str, str]:
        return {}

    async def prepare(self, sandbox: LocalSandbox, settings: AgentSettings, wrap_command: WrapArgv | None) -> list[str]:
        await asyncio.to_thread(self.invocation.problem_path.write_text, self.task_text)
        await asyncio.to_thread(self.invocation.config_path.write_text, yaml.safe_dump(training_config()))
        return self.invocation.argv()

    async def read_result(self, sandbox: LocalSandbox, exit_code: int | None, duration_s: float,
                          log_tail: str) -> AgentRun | None:
        try:
            info = json.loads(await asyncio.to_thread(self.invocation.trajectory_path().read_text)).get("info", {})
        except (OSError, ValueError):
            return None
        raw = str(info.get("exit_status", ""))
        calls = int(info.get("model_stats", {}).get("api_calls", 0) or 0)
        return AgentRun(from_swe_agent(raw), raw, calls, duration_s, log_tail=log_tail)


def swe_agent_for(sandbox: LocalSandbox, request: AgentRequest, settings: AgentSettings,
                  image: str | None = None) -> SWEAgent:
    """The ``sweagent run`` adapter for one rollout (run it with ``recipe.runners.base.run_agent``).

    Raises:
        FileNotFoundError: the ``sweagent`` command is not installed.
    """
    if not sweagent_available():
        raise FileNotFoundError("the `sweagent` command is not installed (SWE-agent 1.x is installed from source)")
    invocation = SWEAgentInvocation(
        problem_path=sandbox.home / "problem_statement.md",
        problem_id=sandbox.rollout_id,
        repo_path=sandbox.workdir,
        output_dir=sandbox.home / "sweagent_output",
        config_path=sandbox.home / "sweagent_training.yaml",
        api_base=request.api_base,
        api_key=request.api_key,
        model_name=request.model_name,
        deployment=settings.sweagent_deployment,
        image=image,
        step_limit=settings.step_limit,
        default_config=default_config_path(),
    )
    return SWEAgent(invocation, task_text=request.task_text)
