"""Entry point of the mini-swe-agent subprocess (``python -m recipe.runners.mini_swe_agent_entry SPEC``).

Runs mini-swe-agent as a library (``DefaultAgent`` + ``LitellmModel`` +
``LocalEnvironment``) with the builtin ``mini.yaml``/``mini_textbased.yaml``
templates, unattended, against the ModelProxy session given in the spec, and
writes a ``RunnerResult`` JSON next to the agent's own trajectory file.

Kept free of project imports other than the spec model so it starts fast.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path


def keep_failed_turns(model):
    """Make a mini-swe-agent model keep the assistant turn that caused a FormatError.

    mini-swe-agent 2.x appends only the format-error user message and drops the
    response that caused it, so its next request would rewrite the history the
    proxy recorded (not append-only). Re-inserting that response (which
    ``LitellmModel.query`` keeps in the error's ``extra.response``) before the
    error message keeps the history append-only: the policy is trained on exactly
    the context it was conditioned on, and a format error earns its reward
    instead of being masked as a proxy failure.
    """
    from minisweagent.exceptions import FormatError

    query = model.query

    def query_keeping_failed_turns(messages, **kwargs):
        try:
            return query(messages, **kwargs)
        except FormatError as error:
            response = error.messages[0].get("extra", {}).get("response")
            if isinstance(response, dict):
                failed = dict(response["choices"][0]["message"], extra={"format_error": True})
                error.messages = (failed, *error.messages)
            raise

    model.query = query_keeping_failed_turns
    return model


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux ``PR_SET_PDEATHSIG``).

    A SIGKILLed rollout command cannot kill its agents; without this they would
    run on (they live in their own sessions) until the next start-up reaper.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import os
    import signal

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the prctl
        os._exit(1)


def isolated_environment(base_cls, command_prefix: list[str]):
    """A mini-swe-agent environment class whose commands run under ``command_prefix`` (bwrap).

    The command string goes through ``shlex.join`` so the shell that mini-swe-agent's
    ``LocalEnvironment`` starts passes it to ``bwrap ... bash -c`` verbatim.
    """
    import shlex

    class IsolatedEnvironment(base_cls):
        def execute(self, action: dict, cwd: str = "", *, timeout: int | None = None):
            if command_prefix:
                action = {**action, "command": shlex.join([*command_prefix, "bash", "-c", action.get("command", "")])}
            return super().execute(action, cwd, timeout=timeout)

    return IsolatedEnvironment


def main(spec_path: str) -> int:
    from recipe.runners.spec import RunnerResult, RunnerSpec

    die_with_parent()
    spec = RunnerSpec.model_validate_json(Path(spec_path).read_text())
    result = RunnerResult(exit_status="AgentNotStarted")
    try:
        import yaml
        from minisweagent.agents.default import DefaultAgent
        from minisweagent.config import builtin_config_dir
        from minisweagent.environments.local import LocalEnvironment
        from minisweagent.models import get_model

        builtin = "mini.yaml" if spec.mode == "tool_call" else "mini_textbased.yaml"
        defaults = yaml.safe_load((builtin_config_dir / builtin).read_text())
        model_cfg = dict(defaults.get("model", {}))
        model_cfg.update(
            model_name=f"openai/{spec.model_name}",
            model_class="litellm" if spec.mode == "tool_call" else "litellm_textbased",
            cost_tracking="ignore_errors",
            model_kwargs={
                **model_cfg.get("model_kwargs", {}),
                "api_base": spec.api_base,
                "api_key": spec.api_key,
                "timeout": spec.turn_timeout_s,
                "num_retries": 0,
            },
        )
        model = keep_failed_turns(get_model(config=model_cfg))
        env_cfg = dict(defaults.get("environment", {}))
        env_cls = isolated_environment(LocalEnvironment, spec.command_prefix) if spec.command_prefix else LocalEnvironment
        env = env_cls(cwd=spec.workdir, env=env_cfg.get("env", {}), timeout=spec.command_timeout_s)
        agent_cfg = dict(defaults["agent"])
        agent_cfg.update(
            step_limit=spec.step_limit,
            cost_limit=0,
            output_path=Path(spec.trajectory_path) if spec.trajectory_path else None,
        )
        agent = DefaultAgent(model, env, **agent_cfg)
        try:
            info = agent.run(spec.task)
            result.exit_status = info.get("exit_status", "") or "Unknown"
            result.submission = info.get("submission", "") or ""
        except Exception as exc:  # the agent already recorded an "exit" message
            result.exit_status = type(exc).__name__
            result.error = f"{type(exc).__name__}: {exc}"[-4000:]
        result.n_calls = agent.n_calls
        result.messages = agent.messages
    except Exception as exc:
        result.exit_status = type(exc).__name__
        result.error = traceback.format_exc()[-4000:]
    Path(spec.result_path).write_text(result.model_dump_json())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
