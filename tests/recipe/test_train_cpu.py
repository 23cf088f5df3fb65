"""Real GRPO training through verl's own trainer on CPU (``python -m recipe.train profile=cpu``).

Nothing is faked: verl's v1 trainer, Ray, FSDP2 over gloo, the ``hf`` rollout server
(``recipe.verl_plugin.rollout``), ``SWEAgentLoop`` with mini-swe-agent subprocesses, the
proxy, sandboxes and hidden-test rewards, on the tiny local model. The CPU platform
stands in for the GPU that cannot exist here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

WEIGHTS_LINE = re.compile(r"hf rollout weights: step (\S+) version (\d+) checksum (\S+)")


def _train(out: Path, tasks: Path, model: Path, *overrides: str, step_limit: int = 4,
           timeout: int = 900) -> subprocess.CompletedProcess:
    """``recipe.train`` with the run's checkpoints, metrics.jsonl, tensorboard/ and trajectories/ under ``out``."""
    env = dict(os.environ, RAY_DEDUP_LOGS="0")
    argv = [
        sys.executable, "-m", "recipe.train", "profile=cpu",
        f"data.train_files={tasks}/train.parquet", f"data.val_files={tasks}/test.parquet",
        f"actor_rollout_ref.model.path={model}",
        f"trainer.default_local_dir={out}",
        "trainer.val_before_train=false",
        "data.val_max_samples=2",
        f"swe_agent.agent.step_limit={step_limit}",
        *overrides,
    ]
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    (out / "train.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return proc


def _metrics(path: Path) -> dict[int, dict]:
    return {line["step"]: line["data"] for line in map(json.loads, path.read_text().splitlines())}


def _records(traj: Path, step: int) -> list[dict]:
    return [json.loads(line) for f in sorted((traj / "rollouts").glob(f"step_{step:06d}.*.jsonl"))
            for line in f.read_text().splitlines()]


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory, simple_tasks_dir, tiny_model_dir):
    """Two GRPO steps (n=2) of the tiny model, checkpointed every step, then one more step resumed
    in which every trajectory hits the step limit (all masked)."""
    out = tmp_path_factory.mktemp("train_cpu")
    common = (
        "trainer.save_freq=1",
        "trainer.test_freq=2",
        # An untrained model earns reward 0 everywhere: an entropy bonus makes every step move the weights.
        "actor_rollout_ref.actor.entropy_coeff=0.01",
        "actor_rollout_ref.actor.optim.lr=1e-3",
    )
    first = _train(out, simple_tasks_dir, tiny_model_dir, "trainer.total_training_steps=2", *common)
    metrics = _metrics(out / "metrics.jsonl")
    resumed = _train(out, simple_tasks_dir, tiny_model_dir, "trainer.total_training_steps=3",
                     "trainer.test_freq=-1", *common, step_limit=1)
    return out, first.stdout + first.stderr, metrics, resumed.stdout + resumed.stderr, _metrics(out / "metrics.jsonl")


def test_weights_change_every_step_and_reach_the_rollout_server(two_steps):
    out, log, metrics, _, _ = two_steps
    assert sorted(metrics) == [1, 2]
    for step in (1, 2):
        assert metrics[step]["actor/grad_norm"] > 0
    loads = [(s, int(v), float(c)) for s, v, c in WEIGHTS_LINE.findall(log)]
    # The initial sync (trainer step 0) and one after each step's update.
    assert [s for s, _, _ in loads] == ["0", "1", "2"]
    assert [v for _, v, _ in loads] == [1, 2, 3]
    assert len({c for _, _, c in loads}) == 3
    # Step 2 was sampled by the weights the server loaded after step 1's update.
    train2 = [r for r in _records(out / "trajectories", 2) if r["split"] == "train"]
    assert train2 and all(r["min_global_steps"] == r["max_global_steps"] == 1 for r in train2)
    assert all(r["min_global_steps"] == 0 for r in _records(out / "trajectories", 1) if r["split"] == "train")


def test_trajectories_keep_exact_tokens_through_the_trainer(two_steps):
    out, _, metrics, _, _ = two_steps
    for step in (1, 2):
        records = [r for r in _records(out / "trajectories", step) if r["split"] == "train"]
        assert len(records) == 4  # 2 tasks x n=2
        for r in records:
            assert r["response_tokens"] == r["response_mask_len"] == r["logprobs_len"]
            assert 0 < r["sampled_tokens"] <= r["response_tokens"]
        # The rollout server's logprobs equal the actor's recomputation of the same tokens
        # (a re-tokenization or a stale server would show up here).
        assert metrics[step]["training/rollout_probs_diff_mean"] < 1e-3
        assert metrics[step]["training/rollout_probs_diff_max"] < 1e-2
        assert metrics[step]["swe/trajectories"] == 4
        assert metrics[step]["swe/exit_agent_error"] + metrics[step]["swe/exit_submitted"] + metrics[step][
            "swe/exit_step_limit"] + metrics[step]["swe/exit_context_limit"] == pytest.approx(1.0)
    assert any(k.startswith("val-aux/swe_simple/exit_") for k in metrics[2])
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))


def test_a_run_resumes_from_its_checkpoint(two_steps):
    out, _, _, resumed_log, resumed = two_steps
    assert (out / "global_step_2").is_dir()
    assert "Resuming from" in resumed_log or "global_step_2" in resumed_log
    assert sorted(resumed) == [3]  # steps 1 and 2 were not run again
    train3 = [r for r in _records(out / "trajectories", 3) if r["split"] == "train"]
    assert train3 and all(r["max_global_steps"] == 2 for r in train3)
    loads = WEIGHTS_LINE.findall(resumed_log)
    assert loads[0][0] == "2"  # the restored actor's weights went to the server before sampling


def test_a_step_whose_trajectories_are_all_masked_trains_on_nothing(two_steps):
    out, _, _, _, resumed = two_steps
    step = resumed[3]
    assert step["swe/masked"] == 1.0 and step["swe/exit_step_limit"] == 1.0
    assert step["actor/grad_norm"] == 0.0  # verl would have raised in its rollout correction
    lines = (out / "trajectories" / "advantages" / "step_000003.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(x)["advantage"] == 0.0 for x in lines)


def test_masked_trajectories_do_not_move_their_group_baseline(tmp_path, simple_tasks_dir, tiny_model_dir):
    """policy=group_check: per group a reference (reward 1), an empty (0) and a stalled (masked) rollout."""
    _train(tmp_path, simple_tasks_dir, tiny_model_dir,
           "swe_agent.policy=group_check", "actor_rollout_ref.rollout.n=3", "data.train_batch_size=1",
           "actor_rollout_ref.actor.ppo_mini_batch_size=1", "trainer.total_training_steps=1",
           "trainer.test_freq=-1", "trainer.save_freq=-1",
           # The reference script sends the whole patch in one turn: no per-turn cap for scripted policies.
           "swe_agent.proxy.max_turn_tokens=null")
    lines = [json.loads(x) for x in (tmp_path / "trajectories" / "advantages" / "step_000001.jsonl").read_text().splitlines()]
    by_status = {}
    for line in lines:
        by_status.setdefault((line["exit_status"], line["reward"]), []).append(line)
    reference, = by_status[("submitted", 1.0)]
    empty, = by_status[("submitted", 0.0)]
    stalled, = by_status[("step_limit", 0.0)]
    assert stalled["masked"] and not stalled["trained"] and stalled["advantage"] == 0.0
    # Baseline over the two trained rollouts only: mean 0.5, std 0.707 -> +-0.707.
    # Counting the masked reward 0 would give (1 - 1/3) / 0.577 = 1.155 and -0.577.
    assert reference["advantage"] == pytest.approx(0.7071, abs=1e-3)
    assert empty["advantage"] == pytest.approx(-0.7071, abs=1e-3)
