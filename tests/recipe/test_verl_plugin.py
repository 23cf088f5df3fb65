"""The verl plugin: checked internal reaches, the cpu platform, per-trajectory grpo_masked, step metrics."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from recipe.advantage import (
    compute_grpo_masked_for_sessions,
    compute_grpo_masked_outcome_advantage,
    session_keys,
)
from recipe.verl_plugin import internals
from recipe.verl_plugin.internals import VerlInternalsChanged


def test_every_reach_matches_the_installed_verl():
    """Fails when a verl upgrade changes an internal the CPU run or the trainer depends on."""
    assert internals.check_all() == [r.name for r in internals.REACHES]


def test_a_changed_internal_stops_the_run_with_its_name(tmp_path, monkeypatch):
    # A later verl whose process-group helper builds its backend string differently.
    (tmp_path / "fake_distributed.py").write_text(
        "def initialize_global_process_group_ray(timeout_second=None, backend=None):\n"
        "    backend = backend or 'nccl'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    fake = importlib.import_module("fake_distributed")
    reach = next(r for r in internals.REACHES if r.name == "gloo_process_group")
    with pytest.raises(VerlInternalsChanged, match="gloo_process_group"):
        reach.check(fake)
    gone = types.ModuleType("fake_rollout_base")
    with pytest.raises(VerlInternalsChanged, match="hf_rollout_backend"):
        next(r for r in internals.REACHES if r.name == "hf_rollout_backend").check(gone)


def test_cpu_platform_is_never_auto_detected(monkeypatch):
    from recipe.verl_plugin.platform import PlatformCPU

    monkeypatch.delenv("VERL_PLATFORM", raising=False)
    assert not PlatformCPU().is_platform_available(use_smi_check=True)
    monkeypatch.setenv("VERL_PLATFORM", "cpu")
    platform = PlatformCPU()
    assert platform.is_platform_available()
    assert (platform.device_name, platform.communication_backend_name(), platform.ray_resource_name()) == (
        "cpu", "gloo", "GPU")
    free, total = platform.device_module.mem_get_info()
    assert 0 < free <= total
    assert torch.zeros(2).to(platform.current_device()).device.type == "cpu"


def test_hf_rollout_settings_reject_unknown_keys():
    from recipe.verl_plugin.rollout import HFRolloutSettings

    assert HFRolloutSettings.from_engine_kwargs({"hf": {"max_num_seqs": 4}}).max_num_seqs == 4
    assert HFRolloutSettings.from_engine_kwargs({"vllm": {}}) == HFRolloutSettings()
    with pytest.raises(ValueError, match="max_num_seq"):
        HFRolloutSettings.from_engine_kwargs({"hf": {"max_num_seq": 4}})


def _rows(rewards, trained, length=3):
    scores = torch.zeros(len(rewards), length)
    scores[:, -1] = torch.tensor(rewards, dtype=torch.float32)
    mask = torch.tensor([[1] * length if t else [0] * length for t in trained], dtype=torch.float32)
    return scores, mask


def test_grpo_masked_counts_a_multi_segment_trajectory_once():
    # Group "u": trajectory 0 has two segments (reward 1), trajectories 1 and 2 one each (reward 0).
    keys = ["u_0_0", "u_0_1", "u_1_0", "u_2_0"]
    rewards = [1.0, 1.0, 0.0, 0.0]
    scores, mask = _rows(rewards, [True] * 4)
    index = np.array(["u"] * 4, dtype=object)
    advantages, _ = compute_grpo_masked_for_sessions(scores, mask, index, session_keys(keys))
    # Three trajectories with rewards 1, 0, 0: mean 1/3, std sqrt(1/3).
    expected, _ = compute_grpo_masked_outcome_advantage(*_rows([1.0, 0.0, 0.0], [True] * 3), np.array(["u"] * 3))
    per_trajectory = expected[:, 0]
    assert advantages[0, 0] == pytest.approx(float(per_trajectory[0]))
    assert advantages[1, 0] == pytest.approx(float(per_trajectory[0]))  # both segments, the same value
    assert advantages[2, 0] == pytest.approx(float(per_trajectory[1]))
    # Counting rows instead would give mean 1/2: the first segment's advantage would differ.
    by_row, _ = compute_grpo_masked_outcome_advantage(scores, mask, index)
    assert by_row[0, 0] != pytest.approx(float(advantages[0, 0]))


def test_a_masked_trajectory_does_not_move_its_siblings():
    keys = ["g_0_0", "g_1_0", "g_2_0"]
    scores, mask = _rows([1.0, 0.0, 0.0], [True, True, False])
    advantages, _ = compute_grpo_masked_for_sessions(scores, mask, np.array(["g"] * 3), session_keys(keys))
    with_two, _ = compute_grpo_masked_outcome_advantage(*_rows([1.0, 0.0], [True, True]), np.array(["g"] * 2))
    assert torch.allclose(advantages[:2], with_two)
    assert torch.count_nonzero(advantages[2]) == 0


def test_session_keys_reject_other_formats():
    assert session_keys(["abc_1_0", "a_b_c_2_10"]) == ["abc_1", "a_b_c_2"]
    with pytest.raises(ValueError, match="uid_session_segment"):
        session_keys(["abc"])


def test_step_metrics_average_over_trajectories():
    from recipe.verl_plugin.trainer import swe_step_metrics

    def extra(resolved, reward):
        return {"reward": reward, "reward_extra_info": {"resolved": resolved, "exit_submitted": 1.0}}

    keys = ["a_0_0", "a_0_1", "a_1_0", "b_0_0", "b_1_0", "pad"]
    fields = [extra(0.0, 0.0), extra(1.0, 1.0), extra(0.0, 0.0), extra(0.0, 0.0), extra(0.0, 0.0), None]
    metrics = swe_step_metrics(fields, keys)
    assert metrics["swe/trajectories"] == 4  # a_0 counted once, by its final segment; padding skipped
    assert metrics["swe/resolved"] == pytest.approx(0.25)
    assert metrics["swe/reward"] == pytest.approx(0.25)
    assert metrics["swe/exit_submitted"] == 1.0
    assert metrics["swe/groups_zero_advantage"] == pytest.approx(0.5)  # group b: all 0
