"""Per-step rollout metrics from a trajectory directory (training or ``recipe.rollout`` output).

    python -m recipe.metrics TRAJECTORY_DIR [--out metrics.jsonl]

Reads the records ``SWEAgentLoop`` appends under ``TRAJECTORY_DIR/rollouts``,
groups them by trainer step, and prints/writes one line of scalar metrics per
step: exit-status counts, resolved rate, masked fraction, mean turns and tokens,
mean seconds in generation vs tool execution, and GRPO groups whose rollouts all
got the same reward (zero advantage; verl's ``algorithm.filter_groups`` drops
them as DAPO's dynamic sampling does).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from recipe.trajectory import RunSummary, TrajectoryRecord, load_records


def step_metrics(records: list[TrajectoryRecord]) -> dict[int, dict[str, float]]:
    """``{global_step: {"swe/...": value}}`` for every step present in ``records``."""
    by_step: dict[int, list[TrajectoryRecord]] = defaultdict(list)
    for record in records:
        by_step[record.global_step].append(record)
    return {step: RunSummary.of(rs).as_metrics() for step, rs in sorted(by_step.items())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trajectory_dir", type=Path)
    parser.add_argument("--out", type=Path, help="write one JSON line per step here")
    args = parser.parse_args(argv)
    records = load_records(args.trajectory_dir)
    if not records:
        print(f"no rollout records under {args.trajectory_dir / 'rollouts'}", file=sys.stderr)
        return 1
    metrics = step_metrics(records)
    lines = [json.dumps({"step": step, **values}) for step, values in metrics.items()]
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    for step, values in metrics.items():
        shown = {k.removeprefix("swe/"): round(v, 3) for k, v in values.items() if v}
        print(f"step {step}: {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
