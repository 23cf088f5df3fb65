"""Per-step rollout metrics from a trajectory directory (training or ``recipe.rollout`` output).

    python -m recipe.metrics TRAJECTORY_DIR [--out metrics.jsonl]
    python -m recipe.metrics --trainer-log METRICS.jsonl   # verl's `file` logger output of a training run

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


# (header, verl metric key, format) of the per-step training table.
_TRAINER_COLUMNS = (
    ("reward", "swe/reward", "{:.3f}"),
    ("resolved", "swe/resolved", "{:.3f}"),
    ("masked", "swe/masked", "{:.2f}"),
    ("resp_tok", "response_length/mean", "{:.0f}"),
    ("prompt_tok", "prompt_length/mean", "{:.0f}"),
    ("gen_s", "timing_s/gen", "{:.1f}"),
    ("tool_s/rollout", "swe/tool_s", "{:.1f}"),
    ("logprob_s", "timing_s/old_log_prob", "{:.1f}"),
    ("ref_s", "timing_s/ref", "{:.1f}"),
    ("update_s", "timing_s/update_actor", "{:.1f}"),
    ("step_s", "timing_s/step", "{:.1f}"),
)


def read_trainer_log(path: Path) -> dict[int, dict]:
    """``{step: metrics}`` from verl's ``file`` logger at ``path`` and a resumed run's earlier files
    (``recipe.train.keep_previous_log`` moves them to ``metrics.1.jsonl``, ``.2``...), oldest first;
    lines of one step are merged. A missing file reads as no steps."""
    earlier = [p for p in path.parent.glob(f"{path.stem}.*{path.suffix}") if p.suffixes[-2][1:].isdigit()]
    earlier.sort(key=lambda p: int(p.suffixes[-2][1:]))
    by_step: dict[int, dict] = {}
    for file in [*earlier, path]:
        for line in file.read_text().splitlines() if file.is_file() else []:
            if line.strip():
                entry = json.loads(line)
                by_step.setdefault(int(entry["step"]), {}).update(entry["data"])
    return by_step


def trainer_table(path: Path) -> str:
    """A per-step table of a training run from verl's ``file`` logger (``VERL_FILE_LOGGER_PATH``).

    Columns: mean reward, resolved and masked fractions (``swe/*``, written by the
    ``swe_sync`` trainer mode), exit statuses (counts), mean response and prompt
    tokens, seconds in generation (the whole rollout phase), tools (per rollout),
    log-prob recomputation, reference, actor update and the whole step.
    """
    by_step = read_trainer_log(path)
    rows = []
    for step, data in sorted(by_step.items()):
        if "timing_s/step" not in data:
            continue  # a validation-only line
        n = data.get("swe/trajectories", 0.0)
        exits = ", ".join(
            f"{key.removeprefix('swe/exit_')} {round(value * n)}"
            for key, value in sorted(data.items()) if key.startswith("swe/exit_") and value > 0
        )
        cells = [str(step)]
        for _, key, fmt in _TRAINER_COLUMNS:
            cells.append(fmt.format(data[key]) if key in data else "-")
        rows.append(cells + [exits])
    headers = ["step", *(h for h, _, _ in _TRAINER_COLUMNS), "exit statuses"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    fmt_row = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt_row(headers), *(fmt_row(r) for r in rows)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trajectory_dir", type=Path, nargs="?")
    parser.add_argument("--out", type=Path, help="write one JSON line per step here")
    parser.add_argument("--trainer-log", type=Path, help="print the per-step table of a training run's metrics file")
    args = parser.parse_args(argv)
    if args.trainer_log is not None:
        print(trainer_table(args.trainer_log))
        return 0
    if args.trajectory_dir is None:
        parser.error("give TRAJECTORY_DIR or --trainer-log")
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
