"""The ``swe_sync`` trainer mode: verl's synchronous v1 trainer plus the rollouts' own metrics.

verl logs ``reward_extra_info`` (exit statuses, resolved, masked, seconds in
generation and tools...) in validation only. ``SWETrainerSync`` adds, every
training step, the mean of each key over the step's trajectories (one per
trajectory: its final segment) as ``swe/<key>``, plus ``swe/reward`` and
``swe/groups_zero_advantage`` (the fraction of GRPO groups whose trajectories all got
the same reward: they teach nothing; DAPO's dynamic sampling drops them). They go
wherever verl's metrics go (console, tensorboard, the ``file`` logger).

With ``swe_agent.trajectory_dir`` set, each step also writes
``trajectory_dir/advantages/step_<N>.jsonl``: per trajectory its rollout id, GRPO
group, reward, whether it was masked, its advantage and its segments -- what
the policy gradient saw, next to the rollout records the agent loop writes.

Registered with verl's own ``register_trainer`` and chosen by
``trainer.v1.trainer_mode=swe_sync`` (``configs/swe_agent_trainer.yaml``).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import transfer_queue as tq
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

TRAINER_MODE = "swe_sync"


def swe_step_metrics(extra_fields: list[dict[str, Any]], keys: list[str]) -> dict[str, float]:
    """Per-step means over trajectories (see module docstring).

    Args:
        extra_fields: each row's ``AgentLoopOutput.extra_fields`` (``SWEAgentLoop``'s
            ``RolloutInfo`` plus ``reward_extra_info``).
        keys: verl's batch keys of the same rows (``{uid}_{session}_{segment}``).
    """
    final: dict[str, dict[str, Any]] = {}
    for key, extra in zip(keys, extra_fields):
        parts = key.rsplit("_", 2)
        if len(parts) == 3 and isinstance(extra, dict):  # padding rows have neither
            final[f"{parts[0]}_{parts[1]}"] = extra  # rows of a trajectory come in segment order
    if not final:
        return {}
    sums: dict[str, float] = defaultdict(float)
    groups: dict[str, set[float]] = defaultdict(set)
    for session, extra in final.items():
        for name, value in (extra.get("reward_extra_info") or {}).items():
            sums[f"swe/{name}"] += float(value)
        reward = float(extra.get("reward", 0.0))
        sums["swe/reward"] += reward
        groups[session.rsplit("_", 1)[0]].add(reward)
    metrics = {name: total / len(final) for name, total in sums.items()}
    metrics["swe/trajectories"] = float(len(final))
    metrics["swe/groups_zero_advantage"] = float(np.mean([len(r) == 1 for r in groups.values()]))
    return metrics


def trajectory_advantages(
    extra_fields: list[Any], keys: list[str], advantages: list[Any], masks: list[Any]
) -> list[dict[str, Any]]:
    """One line per trajectory: the advantage it trained with (0.0 when masked) and its segments.

    ``advantages`` and ``masks`` are each row's response-length tensors (verl's nested fields).
    """
    by_session: dict[str, dict[str, Any]] = {}
    for key, extra, adv, mask in zip(keys, extra_fields, advantages, masks):
        parts = key.rsplit("_", 2)
        if len(parts) != 3 or not isinstance(extra, dict):
            continue
        line = by_session.setdefault(f"{parts[0]}_{parts[1]}", {"segments": 0, "advantage": 0.0, "trained": False})
        trained = bool(mask.sum() > 0)
        if trained:
            line["advantage"] = float(adv[mask.bool()][0])
        line.update(
            rollout_id=extra.get("rollout_id", ""),
            instance_id=extra.get("instance_id", ""),
            group_id=extra.get("group_id", parts[0]),
            reward=float(extra.get("reward", 0.0)),
            exit_status=extra.get("exit_status", ""),
            masked=bool(extra.get("masked", not trained)),
            segments=line["segments"] + 1,
            trained=line["trained"] or trained,
        )
    return list(by_session.values())


@register_trainer(TRAINER_MODE)
class SWETrainerSync(PPOTrainerSync):
    """``PPOTrainerSync`` whose step metrics include ``swe/*`` (see module docstring)."""

    def step(self, metrics: dict, timing_raw: dict) -> Any:
        batch = super().step(metrics, timing_raw)
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id,
                               select_fields=["extra_fields", "advantages", "response_mask"])
        extra_fields, keys = data.pop("extra_fields").tolist(), list(batch.keys)
        metrics.update(swe_step_metrics(extra_fields, keys))
        folder = (self.config.get("swe_agent") or {}).get("trajectory_dir")
        if folder:
            lines = trajectory_advantages(extra_fields, keys, data["advantages"].unbind(0),
                                          data["response_mask"].unbind(0))
            path = Path(folder) / "advantages" / f"step_{self.global_steps:06d}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.writelines(json.dumps(line) + "\n" for line in lines)
        return batch
