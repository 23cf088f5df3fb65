"""GRPO advantages whose group statistics ignore masked trajectories.

verl's GRPO (``verl.trainer.ppo.core_algos.compute_grpo_outcome_advantage``)
normalises each reward by its group's mean and std over every rollout of the
prompt. A trajectory we mask (a budget ran out, or our infrastructure failed:
``recipe.outcome``) is kept out of the loss by its all-zero ``response_mask``,
but its placeholder reward 0 would still pull the group mean down and hand its
siblings an advantage they did not earn. ``grpo_masked`` computes the mean and
std over the rollouts that reach the loss (``response_mask`` has a 1) only;
masked rollouts get advantage 0. With nothing masked it equals verl's GRPO.

Registered under ``algorithm.adv_estimator=grpo_masked`` by ``register()``,
which ``configs/swe_agent_trainer.yaml`` runs in every Ray worker through
Ray's ``runtime_env.worker_process_setup_hook``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import torch

GRPO_MASKED = "grpo_masked"


def compute_grpo_masked_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
    config: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Outcome advantages, shape ``(batch, response_length)`` twice (advantages, returns).

    Args:
        token_level_rewards: ``(batch, response_length)``; a rollout's reward is the row sum.
        response_mask: ``(batch, response_length)``; a row of zeros marks a masked rollout.
        index: ``(batch,)`` GRPO group ids (verl's prompt ``uid``).
        norm_adv_by_std_in_grpo: divide by the group std (GRPO) or not (Dr. GRPO),
            read from ``config.norm_adv_by_std_in_grpo`` when a config is given.
    """
    if config is not None:
        norm_adv_by_std_in_grpo = config.get("norm_adv_by_std_in_grpo", norm_adv_by_std_in_grpo)
    scores = token_level_rewards.sum(dim=-1)
    trained = response_mask.sum(dim=-1) > 0
    groups: dict[Any, list[int]] = defaultdict(list)
    for i in range(scores.shape[0]):
        if trained[i]:
            groups[index[i]].append(i)
    advantages = torch.zeros_like(scores)
    with torch.no_grad():
        for members in groups.values():
            group = scores[members]
            # A lone trajectory has no baseline (verl: mean 0, std 1).
            mean = group.mean() if len(members) > 1 else torch.tensor(0.0)
            std = group.std() if len(members) > 1 else torch.tensor(1.0)
            centred = group - mean
            advantages[members] = centred / (std + epsilon) if norm_adv_by_std_in_grpo else centred
    advantages = advantages.unsqueeze(-1) * response_mask
    return advantages, advantages


def register() -> None:
    """Register ``grpo_masked`` with verl's advantage-estimator registry (idempotent)."""
    from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, register_adv_est

    if ADV_ESTIMATOR_REGISTRY.get(GRPO_MASKED) is not compute_grpo_masked_outcome_advantage:
        register_adv_est(GRPO_MASKED)(compute_grpo_masked_outcome_advantage)


def session_keys(batch_keys: list[str]) -> list[str]:
    """The trajectory of each row of verl's v1 batch: keys are ``{uid}_{session_id}_{segment}``.

    Raises:
        ValueError: a key not in that format.
    """
    sessions = []
    for key in batch_keys:
        parts = key.rsplit("_", 2)
        if len(parts) != 3 or not parts[2].isdigit():
            raise ValueError(f"unexpected verl batch key {key!r} (expected uid_session_segment)")
        sessions.append(f"{parts[0]}_{parts[1]}")
    return sessions


def compute_grpo_masked_for_sessions(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    sessions: list[str],
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``grpo_masked`` over trajectories when a trajectory spans several rows (token segments).

    verl's v1 trainer puts each segment of a trajectory in its own row with the
    trajectory's reward; it computes GRPO from each trajectory's final row and
    broadcasts the result (``verl.trainer.ppo.v1.utils.compute_advantage_for_multi_trajectories``),
    but hands any other estimator every row, which would count a 3-segment
    trajectory three times in its group. Here the group statistics use one entry per
    trajectory (its final row: the reward, and whether it reaches the loss), and every
    row gets its trajectory's advantage on its own mask.

    Args:
        sessions: per row, the trajectory it belongs to (``session_keys``); rows of one
            trajectory are in segment order.
        Other arguments as ``compute_grpo_masked_outcome_advantage``.

    Returns:
        (advantages, returns), each ``(rows, response_length)``.
    """
    final: dict[str, int] = {}
    for row, session in enumerate(sessions):
        final[session] = row  # the last row seen is the final segment
    rows = list(final.values())
    per_session, _ = compute_grpo_masked_outcome_advantage(
        token_level_rewards[rows], response_mask[rows], np.asarray(index)[rows], **kwargs
    )
    # One scalar per trajectory: its advantage on any trained position (0 when masked).
    trained = response_mask[rows].sum(dim=-1) > 0
    first = response_mask[rows].argmax(dim=-1)
    scalar = torch.where(trained, per_session[torch.arange(len(rows)), first], torch.zeros(len(rows)))
    position = {session: i for i, session in enumerate(final)}
    advantages = scalar[[position[s] for s in sessions]].unsqueeze(-1) * response_mask
    return advantages, advantages
