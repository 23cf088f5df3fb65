"""`bash example/run_qwen2.5_3b.sh --dry-run`: the composed training config, checked on CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
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


def test_cpu_training_in_bf16_without_bf16_matmul_units_fails_naming_the_fix():
    """verl's FSDP default (bf16 params + autocast) runs ATen's reference GEMM on an AVX2 CPU (~10x
    slower update, measured with SmolLM2); the CPU profile trains in fp32 and a bf16 override is refused."""
    from recipe.train import check_cpu_precision, compose_config

    cfg = compose_config(["profile=cpu"])
    check_cpu_precision(cfg, cpu_flags={"avx2"})  # the profile's fp32 passes
    assert cfg.actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype == "fp32"
    bf16 = compose_config(["profile=cpu", "actor_rollout_ref.ref.fsdp_config.mixed_precision.param_dtype=bf16"])
    with pytest.raises(ValueError, match=r"actor_rollout_ref\.ref\.fsdp_config\.mixed_precision"):
        check_cpu_precision(bf16, cpu_flags={"avx2"})
    check_cpu_precision(bf16, cpu_flags={"avx2", "amx_bf16"})  # a CPU with bf16 matrix units may
    proc = subprocess.run(
        [sys.executable, "-m", "recipe.train", "--dry-run", "profile=cpu",
         "~actor_rollout_ref.actor.fsdp_config.mixed_precision"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    if "avx512_bf16" not in Path("/proc/cpuinfo").read_text() and "amx_bf16" not in Path("/proc/cpuinfo").read_text():
        assert proc.returncode == 2 and "param_dtype is bf16" in proc.stderr, proc.stderr[-2000:]
