"""The SWE-agent backend's config, command line and exit statuses (real runs: test_swe_agent_real.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from recipe.config import load_swe_agent_config
from recipe.outcome import ExitStatus
from recipe.runners.swe_agent import SWEAgentRun, from_swe_agent


def make_run(tmp_path: Path, **kw) -> SWEAgentRun:
    args = dict(
        problem_path=tmp_path / "problem.md", problem_id="r1", output_dir=tmp_path / "out",
        config_path=tmp_path / "cfg.yaml", default_config=tmp_path / "default.yaml",
        api_base="http://127.0.0.1:9/sessions/s/v1", api_key="k", model_name="swe-policy", step_limit=12,
    )
    args.update(kw)
    return SWEAgentRun(**args)


def test_config_points_sweagent_at_the_session_with_training_settings(tmp_path):
    cfg = yaml.safe_load(yaml.safe_dump(make_run(tmp_path, command_timeout_s=7, total_command_s=99).config()))
    model = cfg["agent"]["model"]
    assert model["name"] == "openai/swe-policy" and model["api_base"] == "http://127.0.0.1:9/sessions/s/v1"
    for key in ("per_instance_cost_limit", "total_cost_limit", "max_input_tokens"):
        assert model[key] == 0  # unknown models are refused otherwise
    assert model["per_instance_call_limit"] == 12
    assert cfg["agent"]["history_processors"] == []
    assert cfg["agent"]["tools"]["parse_function"]["type"] == "function_calling"
    assert cfg["agent"]["tools"]["execution_timeout"] == 7 and cfg["agent"]["tools"]["total_execution_timeout"] == 99
    # SWE-agent works on the prepared tree in place: no copy, no reset of it.
    assert cfg["env"]["repo"] == {"type": "preexisting", "repo_name": "testbed", "reset": False}
    assert cfg["problem_statement"] == {"type": "text_file", "path": str(tmp_path / "problem.md"), "id": "r1"}


def test_command_line_loads_sweagent_defaults_then_ours_and_holds_no_key(tmp_path):
    argv = make_run(tmp_path).argv()
    assert argv[argv.index("run") - 1:] == ["sweagent", "run", f"--config={tmp_path / 'default.yaml'}",
                                            f"--config={tmp_path / 'cfg.yaml'}"]
    owned = make_run(tmp_path).argv(file_owner=(200001, 200001))
    assert owned[owned.index("-c") + 2:owned.index("-c") + 4] == ["200001", "200001"]
    assert not any("k" == a.split("=")[-1] for a in argv + owned)


def test_trajectory_path_follows_problem_id(tmp_path):
    assert make_run(tmp_path).trajectory_path() == tmp_path / "out" / "r1" / "r1.traj"


@pytest.mark.parametrize(
    ("raw", "ours"),
    [
        ("submitted", ExitStatus.SUBMITTED),
        ("submitted (exit_cost)", ExitStatus.STEP_LIMIT),  # autosubmitted at the call limit
        ("exit_context", ExitStatus.CONTEXT_LIMIT),
        ("submitted (exit_context)", ExitStatus.CONTEXT_LIMIT),
        ("exit_cost", ExitStatus.STEP_LIMIT),
        ("exit_total_execution_time", ExitStatus.ROLLOUT_TIMEOUT),
        ("exit_api", ExitStatus.PROXY_ERROR),
        ("exit_environment_error", ExitStatus.SANDBOX_ERROR),
        ("exit_format", ExitStatus.AGENT_ERROR),
        ("exit_forfeit", ExitStatus.AGENT_ERROR),
        ("", ExitStatus.AGENT_ERROR),
    ],
)
def test_exit_statuses_map_to_closed_set(raw, ours):
    assert from_swe_agent(raw) is ours


def test_backend_is_selected_in_config():
    assert load_swe_agent_config({"agent": {"backend": "swe_agent"}}).agent.backend == "swe_agent"
    with pytest.raises(ValueError, match="backend"):
        load_swe_agent_config({"agent": {"backend": "openhands"}})


def test_unjailed_sweagent_is_refused_at_start_up():
    with pytest.raises(ValueError, match="isolation=none"):
        load_swe_agent_config({"agent": {"backend": "swe_agent"}, "sandbox": {"isolation": "none"}})
