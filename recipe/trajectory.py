"""Trajectory records written by rollout runs, SWE-bench predictions, and the run summary."""

from __future__ import annotations

import os
import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field
from verl.experimental.agent_loop.agent_loop import AgentLoopOutput


class TrajectoryRecord(BaseModel):
    """One rollout, as one JSONL line. Times in seconds, lengths in tokens."""

    instance_id: str
    rollout_id: str
    data_source: str
    policy: str
    exit_status: str
    agent_exit_status: str
    reward: float
    resolved: bool
    masked: bool
    num_turns: int
    num_llm_calls: int
    prompt_tokens: int
    response_tokens: int
    response_mask_len: int
    sampled_tokens: int  # positions with response_mask == 1
    logprobs_len: int
    generation_s: float
    tool_s: float
    total_s: float
    patch: str
    error: str
    grade: dict[str, Any] = Field(default_factory=dict)
    messages: list[dict[str, Any]] = Field(default_factory=list)
    group_id: str = ""  # GRPO group: rollouts of the same prompt
    global_step: int = -1  # trainer step; -1 outside training
    num_segments: int = 1  # token segments (a rewritten history starts a new one)
    # Policy versions (trainer steps of the rollout server's weights) that sampled it; None = unknown.
    min_global_steps: int | None = None
    max_global_steps: int | None = None
    split: str = ""  # the task row's split (train / test)
    limits_hit: list[str] = Field(default_factory=list)  # sandbox limits the agent's commands hit
    # Seconds per phase (recipe.phases.PHASES) summing to "total"; empty in records older than them.
    phases: dict[str, float] = Field(default_factory=dict)
    # What the resource shim did (sandbox.shim.ShimRolloutSummary.to_dict); empty with the shim off.
    shim: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def from_output(
        cls, output: AgentLoopOutput | list[AgentLoopOutput], *, data_source: str, policy: str
    ) -> TrajectoryRecord:
        """Build a record from a ``SWEAgentLoop`` output (its ``extra_fields`` carry ``RolloutInfo``).

        For a multi-segment rollout (a list), token counts add up over the segments and
        the rest comes from the last one.
        """
        outputs = output if isinstance(output, list) else [output]
        output = outputs[-1]
        extra = output.extra_fields
        return cls(
            instance_id=extra["instance_id"],
            rollout_id=extra["rollout_id"],
            data_source=data_source,
            policy=policy,
            exit_status=extra["exit_status"],
            agent_exit_status=extra["agent_exit_status"],
            reward=float(output.reward_score or 0.0),
            resolved=bool(extra["resolved"]),
            masked=bool(extra["masked"]),
            num_turns=output.num_turns,
            num_llm_calls=int(extra["num_llm_calls"]),
            prompt_tokens=sum(len(o.prompt_ids) for o in outputs),
            response_tokens=sum(len(o.response_ids) for o in outputs),
            response_mask_len=sum(len(o.response_mask) for o in outputs),
            sampled_tokens=sum(sum(o.response_mask) for o in outputs),
            logprobs_len=sum(len(o.response_logprobs or []) for o in outputs),
            generation_s=float(extra["generation_s"]),
            tool_s=float(extra["tool_s"]),
            total_s=float(extra["total_s"]),
            patch=extra["model_patch"],
            error=extra["error"],
            grade=extra["grade"],
            messages=extra["messages"],
            group_id=extra.get("group_id") or extra["instance_id"],
            global_step=int(extra.get("global_step", -1)),
            num_segments=len(outputs),
            min_global_steps=extra.get("min_global_steps"),
            max_global_steps=extra.get("max_global_steps"),
            split=extra.get("split", ""),
            limits_hit=list(extra.get("limits_hit") or []),
            phases=dict(extra.get("phases") or {}),
            shim=dict(extra.get("shim") or {}),
        )

    def prediction(self, model_name: str) -> dict[str, str]:
        """This rollout as a SWE-bench prediction (``instance_id``, ``model_name_or_path``, ``model_patch``)."""
        return {"instance_id": self.instance_id, "model_name_or_path": model_name, "model_patch": self.patch}


def append_record(trajectory_dir: Path, record: TrajectoryRecord) -> Path:
    """Append ``record`` to ``trajectory_dir/rollouts/step_<global_step>.<pid>.jsonl``; returns the file.

    One file per step and process: verl runs several agent-loop workers, and
    appends from different processes to one file could interleave. Blocking:
    call it from a worker thread in async code.
    """
    folder = trajectory_dir / "rollouts"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{max(record.global_step, 0):06d}.{os.getpid()}.jsonl"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(record.model_dump_json() + "\n")
    return path


def load_records(trajectory_dir: Path) -> list[TrajectoryRecord]:
    """All records under ``trajectory_dir/rollouts`` (see ``append_record``)."""
    records = []
    for path in sorted((trajectory_dir / "rollouts").glob("step_*.jsonl")):
        with open(path, encoding="utf-8") as fh:
            records.extend(TrajectoryRecord.model_validate_json(line) for line in fh if line.strip())
    return records


class RunSummary(BaseModel):
    """Aggregates over a set of rollouts (one data source, or all). Times are means in seconds."""

    n: int
    resolved: int
    resolved_rate: float
    exit_status: dict[str, int]
    masked: int
    mean_turns: float
    mean_llm_calls: float
    mean_response_tokens: float
    mean_sampled_tokens: float
    mean_generation_s: float
    mean_tool_s: float
    mean_total_s: float
    # Mean seconds per phase over the records that have phases (recipe.phases.PHASES order).
    mean_phases_s: dict[str, float] = Field(default_factory=dict)
    # GRPO groups (rollouts sharing group_id; only groups of 2+ count): a group whose
    # rollouts all got the same reward has zero advantage and teaches nothing.
    groups: int = 0
    uniform_groups: int = 0
    uniform_resolved_groups: int = 0
    uniform_unresolved_groups: int = 0

    @classmethod
    def of(cls, records: list[TrajectoryRecord]) -> RunSummary:
        def mean(values: list[float]) -> float:
            return round(statistics.fmean(values), 4) if values else 0.0

        resolved = sum(r.resolved for r in records)
        rewards_by_group: dict[str, list[float]] = defaultdict(list)
        for r in records:
            rewards_by_group[r.group_id or r.instance_id].append(r.reward)
        groups = [rewards for rewards in rewards_by_group.values() if len(rewards) > 1]
        uniform = [rewards for rewards in groups if len(set(rewards)) == 1]
        return cls(
            n=len(records),
            resolved=resolved,
            resolved_rate=round(resolved / len(records), 4) if records else 0.0,
            exit_status=dict(Counter(r.exit_status for r in records)),
            masked=sum(r.masked for r in records),
            mean_turns=mean([r.num_turns for r in records]),
            mean_llm_calls=mean([r.num_llm_calls for r in records]),
            mean_response_tokens=mean([r.response_tokens for r in records]),
            mean_sampled_tokens=mean([r.sampled_tokens for r in records]),
            mean_generation_s=mean([r.generation_s for r in records]),
            mean_tool_s=mean([r.tool_s for r in records]),
            mean_total_s=mean([r.total_s for r in records]),
            mean_phases_s=mean_phases([r.phases for r in records if r.phases]),
            groups=len(groups),
            uniform_groups=len(uniform),
            uniform_resolved_groups=sum(rewards[0] > 0 for rewards in uniform),
            uniform_unresolved_groups=sum(rewards[0] <= 0 for rewards in uniform),
        )

    def as_metrics(self, prefix: str = "swe") -> dict[str, float]:
        """Flat scalar metrics (``swe/resolved_rate``, ``swe/exit/<status>``...) for a logger."""
        from recipe.outcome import ExitStatus

        metrics = {
            f"{prefix}/rollouts": float(self.n),
            f"{prefix}/resolved_rate": self.resolved_rate,
            f"{prefix}/masked_frac": self.masked / self.n if self.n else 0.0,
            f"{prefix}/mean_turns": self.mean_turns,
            f"{prefix}/mean_llm_calls": self.mean_llm_calls,
            f"{prefix}/mean_response_tokens": self.mean_response_tokens,
            f"{prefix}/mean_sampled_tokens": self.mean_sampled_tokens,
            f"{prefix}/mean_generation_s": self.mean_generation_s,
            f"{prefix}/mean_tool_s": self.mean_tool_s,
            f"{prefix}/mean_total_s": self.mean_total_s,
            f"{prefix}/grpo_groups": float(self.groups),
            f"{prefix}/grpo_uniform_groups": float(self.uniform_groups),
            f"{prefix}/grpo_uniform_frac": self.uniform_groups / self.groups if self.groups else 0.0,
        }
        for status in ExitStatus:
            metrics[f"{prefix}/exit/{status.value}"] = float(self.exit_status.get(status.value, 0))
        return metrics

    def lines(self, title: str) -> list[str]:
        """Human-readable summary lines."""
        statuses = ", ".join(f"{k}={v}" for k, v in sorted(self.exit_status.items()))
        return [
            f"[{title}] rollouts={self.n} resolved={self.resolved} ({100 * self.resolved_rate:.1f}%) masked={self.masked}",
            f"[{title}] exit status: {statuses}",
            f"[{title}] mean turns={self.mean_turns:.1f} llm calls={self.mean_llm_calls:.1f} "
            f"response tokens={self.mean_response_tokens:.0f} sampled tokens={self.mean_sampled_tokens:.0f}",
            f"[{title}] mean seconds: llm={self.mean_generation_s:.2f} tools={self.mean_tool_s:.2f} "
            f"total={self.mean_total_s:.2f}",
            f"[{title}] mean seconds by phase: "
            + " ".join(f"{k}={v:.2f}" for k, v in self.mean_phases_s.items()),
            f"[{title}] GRPO groups={self.groups} uniform-reward (zero advantage)={self.uniform_groups} "
            f"(all resolved {self.uniform_resolved_groups}, none resolved {self.uniform_unresolved_groups})",
        ]


def mean_phases(phases: list[dict[str, float]]) -> dict[str, float]:
    """Mean seconds per phase over ``phases`` (a phase missing from one counts 0 there), in
    ``recipe.phases.PHASES`` order with any other name after, ``total`` last."""
    from recipe.phases import PHASES

    if not phases:
        return {}
    names = [*PHASES, *sorted({k for p in phases for k in p} - set(PHASES) - {"total"}), "total"]
    return {name: round(statistics.fmean(p.get(name, 0.0) for p in phases), 4) for name in names}
