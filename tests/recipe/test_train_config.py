"""`bash example/run_qwen2.5_3b.sh --dry-run`: the composed training config, checked on CPU."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def dry_run(*overrides: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / "example" / "run_qwen2.5_3b.sh"), "--dry-run", *overrides],
        capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})},
    )


def test_dry_run_composes_our_loop_reward_and_lengths():
    proc = dry_run("trainer.total_epochs=2", "swe_agent.agent.step_limit=50", env={"N_GPUS": "4"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = yaml.safe_load(proc.stdout)
    rollout = cfg["actor_rollout_ref"]["rollout"]
    assert rollout["agent"]["default_agent_loop"] == "swe_agent"
    loop_yaml = yaml.safe_load(Path(rollout["agent"]["agent_loop_config_path"]).read_text())
    assert loop_yaml[0]["_target_"] == "recipe.swe_agent_loop.SWEAgentLoop"
    assert rollout["mode"] == "async" and rollout["name"] == "vllm" and rollout["n"] > 1
    assert rollout["prompt_length"] == cfg["data"]["max_prompt_length"] == 4096
    assert rollout["response_length"] == cfg["data"]["max_response_length"] >= 16384
    assert cfg["algorithm"]["adv_estimator"] == "grpo_masked"
    assert cfg["ray_kwargs"]["ray_init"]["runtime_env"]["worker_process_setup_hook"] == "recipe.advantage.register"
    reward_fn = cfg["reward"]["custom_reward_function"]
    assert Path(reward_fn["path"]).is_file() and reward_fn["name"] == "compute_score"
    assert cfg["trainer"]["total_epochs"] == 2 and cfg["trainer"]["n_gpus_per_node"] == 4
    assert cfg["swe_agent"]["agent"]["step_limit"] == 50
    assert cfg["swe_agent"]["proxy"]["tool_parser"] == rollout["multi_turn"]["format"]
    assert Path(cfg["data"]["train_files"]).name == "train.parquet"


def test_unknown_swe_agent_key_fails_with_its_name():
    proc = dry_run("+swe_agent.agent.step_limt=5")
    assert proc.returncode == 2
    assert "step_limt" in proc.stderr


def test_inconsistent_verl_settings_fail_before_ray_starts():
    # verl's own check: without dynamic batching, batch x n must divide over the GPUs.
    proc = dry_run("actor_rollout_ref.actor.use_dynamic_bsz=false", "data.train_batch_size=3",
                   "actor_rollout_ref.rollout.n=3", env={"N_GPUS": "8"})
    assert proc.returncode == 2
    assert "invalid configuration" in proc.stderr and "divisible" in proc.stderr
