"""grpo_masked: masked trajectories neither train nor move their group's baseline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage, get_adv_estimator_fn

from recipe.advantage import GRPO_MASKED, compute_grpo_masked_outcome_advantage, register


def batch(rewards, masked, length=4):
    rewards_t = torch.zeros(len(rewards), length)
    rewards_t[:, -1] = torch.tensor(rewards, dtype=torch.float32)
    mask = torch.ones(len(rewards), length)
    for i in masked:
        mask[i] = 0
    return rewards_t, mask


def test_equals_verl_grpo_when_nothing_is_masked():
    rewards, mask = batch([1, 0, 0, 1, 1, 0], masked=[])
    index = np.array(["a", "a", "a", "b", "b", "b"], dtype=object)
    ours, _ = compute_grpo_masked_outcome_advantage(rewards, mask, index)
    verl, _ = compute_grpo_outcome_advantage(rewards, mask, index)
    assert torch.allclose(ours, verl)


def test_masked_rollout_does_not_move_the_baseline():
    # Group: two resolved, one failed, one masked (its placeholder reward is 0).
    rewards, mask = batch([1, 1, 0, 0], masked=[3])
    index = np.array(["g"] * 4, dtype=object)
    ours, _ = compute_grpo_masked_outcome_advantage(rewards, mask, index)
    verl, _ = compute_grpo_outcome_advantage(rewards, mask, index)
    assert torch.all(ours[3] == 0)
    expected, _ = compute_grpo_outcome_advantage(rewards[:3], mask[:3], index[:3])
    assert torch.allclose(ours[:3], expected)
    # verl's GRPO would have lowered the mean with the masked zero and raised the resolved advantages.
    assert verl[0, -1] > ours[0, -1]


def test_fully_masked_group_gets_zero_advantage_and_dr_grpo_mode():
    rewards, mask = batch([1, 0, 1, 0], masked=[0, 1])
    index = np.array(["a", "a", "b", "b"], dtype=object)
    ours, _ = compute_grpo_masked_outcome_advantage(rewards, mask, index, norm_adv_by_std_in_grpo=False)
    assert torch.all(ours[:2] == 0)
    assert torch.allclose(ours[2:, -1], torch.tensor([0.5, -0.5]))


def test_registered_under_its_name():
    register()
    register()  # idempotent
    assert get_adv_estimator_fn(GRPO_MASKED) is compute_grpo_masked_outcome_advantage


def test_ray_workers_register_it_through_the_configured_setup_hook():
    """The trainer runs in a Ray worker: the hook configs/swe_agent_trainer.yaml names must register it there."""
    import pytest

    ray = pytest.importorskip("ray")
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).resolve().parents[2] / "configs" / "swe_agent_trainer.yaml")
    hook = cfg.ray_kwargs.ray_init.runtime_env.worker_process_setup_hook
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": hook})
    try:
        @ray.remote
        def registered() -> bool:
            from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY

            return GRPO_MASKED in ADV_ESTIMATOR_REGISTRY

        assert ray.get(registered.remote())
    finally:
        ray.shutdown()
