"""Expert trajectories -> verl's multi-turn SFT dataset (the warm start's data).

    python -m recipe.learn.expert --data data/simple/train.parquet,data/smith/train.parquet \
        --out outputs/learn/expert [--model-path outputs/smollm2] [--set swe_agent.agent.step_limit=12]

Runs the scripted ``expert`` policy (``model_proxy.backends.scripted.expert_steps``: list the
files, run the suite, read the code, a ``str_replace`` edit per hunk, rerun, diff, submit)
through the real agent, proxy, sandboxes and grader (``recipe.rollout``), then keeps the
conversations the hidden tests graded resolved (rejection sampling, as SWE-Gym and SWE-smith
build their SFT sets) and writes them as ``<out>/sft.parquet``: one row per trajectory, a
``messages`` column of ``{"role", "content"}`` turns exactly as the agent sent them to the
proxy plus its last reply, the format of verl's ``MultiTurnSFTDataset``
(``verl/utils/dataset/multiturn_sft_dataset.py``: each turn rendered with the tokenizer's chat
template, loss on assistant turns only). The rollouts (``<out>/rollouts``) stay for inspection.
Re-running with an existing ``sft.parquet`` does nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import dataclass
from pathlib import Path

from recipe.trajectory import TrajectoryRecord, load_records

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class SFTSelection:
    """Which expert trajectories became SFT rows, and why the others did not."""

    rows: list[dict]
    kept: int
    unresolved: list[str]  # instance ids the hidden tests did not pass
    malformed: list[str]  # instance ids without an assistant turn or with another role

    def report(self) -> str:
        lines = [f"kept {self.kept} resolved expert trajectories"]
        if self.unresolved:
            lines.append(f"dropped {len(self.unresolved)} unresolved: {', '.join(sorted(self.unresolved))}")
        if self.malformed:
            lines.append(f"dropped {len(self.malformed)} malformed: {', '.join(sorted(self.malformed))}")
        return "\n".join(lines)


def sft_rows(records: list[TrajectoryRecord]) -> SFTSelection:
    """Resolved, unmasked trajectories as ``{"messages": [...], "instance_id", "data_source"}`` rows.

    A conversation must start with the system or user turn, hold only system/user/assistant
    turns (text mode) and end with an assistant turn; any other is reported and skipped.
    """
    rows, unresolved, malformed = [], [], []
    for record in records:
        if not record.resolved or record.masked:
            unresolved.append(record.instance_id)
            continue
        messages = [{"role": m.get("role"), "content": m.get("content") or ""} for m in record.messages]
        if (not messages or any(m["role"] not in ROLES for m in messages)
                or messages[-1]["role"] != "assistant" or messages[0]["role"] == "assistant"):
            malformed.append(record.instance_id)
            continue
        rows.append({"messages": messages, "instance_id": record.instance_id, "data_source": record.data_source})
    return SFTSelection(rows=rows, kept=len(rows), unresolved=unresolved, malformed=malformed)


def write_parquet(rows: list[dict], path: Path) -> None:
    """Rows -> parquet (pyarrow infers the nested ``messages`` list of structs)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="training parquets, comma-separated")
    parser.add_argument("--out", required=True, help="output directory (rollouts/, sft.parquet)")
    parser.add_argument("--model-path", default=None, help="the policy's HF directory (its tokenizer renders the turns)")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe.rollout overrides, e.g. swe_agent.agent.step_limit=12 (repeatable)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    target = out / "sft.parquet"
    if target.is_file():
        print(f"{target} exists; nothing to do")
        return 0
    from recipe.rollout import load_config, run_rollouts

    overrides = [f"data={args.data}", f"out_dir={out}", "policy=expert", f"concurrency={args.concurrency}",
                 "swe_agent.agent.mode=text"]
    if args.model_path:
        overrides.append(f"model_path={args.model_path}")
    cfg = load_config(overrides + list(args.set))
    if cfg.swe_agent["agent"]["mode"] != "text":
        raise SystemExit("expert SFT data is written in text mode: pass --set swe_agent.agent.mode=text")
    # A re-run after a crash starts the rollouts again: their records would otherwise count twice.
    for stale in (out / "rollouts").glob("*.jsonl"):
        stale.unlink()
    asyncio.run(run_rollouts(cfg))
    selection = sft_rows(load_records(out))
    print(selection.report())
    if not selection.rows:
        raise SystemExit("no resolved expert trajectory: nothing to train on")
    write_parquet(selection.rows, target)
    (out / "selection.json").write_text(json.dumps(
        {"kept": selection.kept, "unresolved": selection.unresolved, "malformed": selection.malformed}, indent=2))
    print(f"wrote {target} ({selection.kept} conversations)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
