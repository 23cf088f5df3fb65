"""The SWE-agent backend: command construction here; a real run only where `sweagent` is installed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from recipe.config import load_swe_agent_config
from recipe.outcome import ExitStatus
from recipe.runners.swe_agent import SWEAgentInvocation, from_swe_agent, training_config


def invocation(tmp_path: Path, **kw) -> SWEAgentInvocation:
    args = dict(
        problem_path=tmp_path / "problem.md", problem_id="r1", repo_path=tmp_path / "repo",
        output_dir=tmp_path / "out", config_path=tmp_path / "cfg.yaml", api_base="http://127.0.0.1:9/sessions/s/v1",
        api_key="k", model_name="swe-policy", step_limit=12,
    )
    args.update(kw)
    return SWEAgentInvocation(**args)


def test_command_points_sweagent_at_the_session_with_limits_off(tmp_path):
    argv = invocation(tmp_path, default_config=tmp_path / "default.yaml").argv()
    assert argv[:2] == ["sweagent", "run"]
    # Our overrides come after SWE-agent's own defaults, so they win.
    assert argv.index(f"--config={tmp_path / 'default.yaml'}") < argv.index(f"--config={tmp_path / 'cfg.yaml'}")
    assert "--agent.model.name=openai/swe-policy" in argv
    assert "--agent.model.api_base=http://127.0.0.1:9/sessions/s/v1" in argv
    for key in ("per_instance_cost_limit", "total_cost_limit", "max_input_tokens"):
        assert f"--agent.model.{key}=0" in argv  # unknown models are refused otherwise
    assert "--agent.model.per_instance_call_limit=12" in argv
    assert f"--env.repo.path={tmp_path / 'repo'}" in argv
    assert f"--problem_statement.path={tmp_path / 'problem.md'}" in argv
    assert f"--output_dir={tmp_path / 'out'}" in argv
    assert "--env.deployment.type=docker" in argv


def test_docker_image_only_for_docker_deployments(tmp_path):
    assert "--env.deployment.image=img:1" in invocation(tmp_path, image="img:1").argv()
    local = invocation(tmp_path, image="img:1", deployment="local").argv()
    assert "--env.deployment.type=local" in local
    assert not any(a.startswith("--env.deployment.image") for a in local)


def test_training_config_disables_history_processors_and_uses_function_calling():
    cfg = yaml.safe_load(yaml.safe_dump(training_config()))
    assert cfg["agent"]["history_processors"] == []
    assert cfg["agent"]["tools"]["parse_function"]["type"] == "function_calling"


def test_trajectory_path_follows_problem_id(tmp_path):
    assert invocation(tmp_path).trajectory_path() == tmp_path / "out" / "r1" / "r1.traj"


@pytest.mark.parametrize(
    ("raw", "ours"),
    [
        ("submitted", ExitStatus.SUBMITTED),
        ("submitted (exit_cost)", ExitStatus.SUBMITTED),
        ("exit_context", ExitStatus.CONTEXT_LIMIT),
        ("exit_cost", ExitStatus.STEP_LIMIT),
        ("exit_total_execution_time", ExitStatus.ROLLOUT_TIMEOUT),
        ("exit_format", ExitStatus.AGENT_ERROR),
        ("", ExitStatus.AGENT_ERROR),
    ],
)
def test_exit_statuses_map_to_closed_set(raw, ours):
    assert from_swe_agent(raw) is ours


def test_backend_is_selected_in_config():
    assert load_swe_agent_config({"agent": {"backend": "swe_agent"}}).agent.backend == "swe_agent"
    with pytest.raises(ValueError, match="backend"):
        load_swe_agent_config({"agent": {"backend": "openhands"}})
