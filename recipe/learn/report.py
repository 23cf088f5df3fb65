"""The learning report: held-out figures before training, after the warm start and after GRPO.

    python -m recipe.learn.report --out outputs/learn --report-dir docs

Reads ``<out>/eval_{base,sft,grpo}`` (``recipe.rollout`` outputs: one ``TrajectoryRecord`` per
rollout), ``<out>/sft_metrics.jsonl`` (verl's SFT file logger) and ``<out>/grpo/metrics.jsonl``
(verl's PPO file logger) with ``<out>/grpo/trajectories/advantages`` (what each trajectory
trained with) and ``<out>/stages.tsv`` (when each stage of each run of the script started), and writes ``<report-dir>/learning_cpu.{md,json,png}``: per stage the
number of tasks and rollouts, resolved rate, parsed-action rate, format errors, exit statuses and
mean turns; the SFT loss per step; the RL rewards, advantages and masks per step; the
wall-clock time of every stage.

Parsed action: an assistant turn holding exactly one action block of mini-swe-agent's text mode
(``LitellmTextbasedModelConfig.action_regex``, ``model_proxy.tool_format.TEXT_ACTION_FENCE``); every
other assistant turn is a format error (the agent answers it with its format-error message).
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from model_proxy.tool_format import TEXT_ACTION_FENCE
from recipe.metrics import read_trainer_log
from recipe.trajectory import TrajectoryRecord, load_records

STAGES = (("base", "base model"), ("sft", "after SFT warm start"), ("grpo", "after GRPO"))
# The stages of example/learn_cpu.sh, in order: stages.tsv names each start "k/8 <name> ...".
SCRIPT_STAGES = ("data", "base eval", "expert", "SFT", "SFT eval", "GRPO", "GRPO eval", "report")
ACTION = re.compile(rf"```{TEXT_ACTION_FENCE}\s*\n(.*?)\n```", re.DOTALL)
# The RL trainer's per-step figures shown (verl's metric names, recipe's swe/* ones).
RL_KEYS = (
    ("reward", "swe/reward"), ("resolved", "swe/resolved"), ("masked", "swe/masked"),
    ("adv mean", "critic/advantages/mean"), ("adv max", "critic/advantages/max"), ("adv min", "critic/advantages/min"),
    ("zero-adv groups", "swe/groups_zero_advantage"), ("resp len", "response_length/mean"),
    ("pg loss", "actor/pg_loss"), ("grad norm", "actor/grad_norm"),
)


@dataclass(frozen=True)
class StageFigures:
    """One evaluation's figures. Rates are fractions in [0, 1]."""

    stage: str
    tasks: int
    rollouts: int
    resolved_rate: float
    parsed_action_rate: float  # of assistant turns
    assistant_turns: int
    format_errors: int  # assistant turns without exactly one action block
    exit_status: dict[str, int]
    mean_turns: float  # assistant turns per rollout
    by_source: dict[str, dict[str, float]]


def parsed_actions(record: TrajectoryRecord) -> tuple[int, int]:
    """(assistant turns, of which parsed: exactly one action block)."""
    turns = [m.get("content") or "" for m in record.messages if m.get("role") == "assistant"]
    return len(turns), sum(1 for t in turns if len(ACTION.findall(t)) == 1)


def exit_label(record: TrajectoryRecord) -> str:
    """The rollout's exit status; an agent error also names the agent's own status
    (``agent_error (RepeatedFormatError)``: mini-swe-agent stopped after repeated format errors),
    the other statuses say all the agent's does (``recipe.outcome``)."""
    reason = record.agent_exit_status
    return f"{record.exit_status} ({reason})" if record.exit_status == "agent_error" and reason else record.exit_status


def figures(stage: str, records: list[TrajectoryRecord]) -> StageFigures:
    """Figures of one stage's rollouts.

    Raises:
        ValueError: no rollouts.
    """
    if not records:
        raise ValueError(f"stage {stage}: no rollouts")
    counts = [parsed_actions(r) for r in records]
    turns = sum(c[0] for c in counts)
    parsed = sum(c[1] for c in counts)
    by_source: dict[str, dict[str, float]] = {}
    for source in sorted({r.data_source for r in records}):
        rs = [r for r in records if r.data_source == source]
        cs = [parsed_actions(r) for r in rs]
        by_source[source] = {
            "rollouts": len(rs),
            "resolved_rate": sum(r.resolved for r in rs) / len(rs),
            "parsed_action_rate": sum(c[1] for c in cs) / max(1, sum(c[0] for c in cs)),
        }
    return StageFigures(
        stage=stage,
        tasks=len({r.instance_id for r in records}),
        rollouts=len(records),
        resolved_rate=sum(r.resolved for r in records) / len(records),
        parsed_action_rate=parsed / turns if turns else 0.0,
        assistant_turns=turns,
        format_errors=turns - parsed,
        exit_status=dict(Counter(exit_label(r) for r in records).most_common()),
        mean_turns=turns / len(records),
        by_source=by_source,
    )


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def advantage_steps(grpo_dir: Path) -> list[dict]:
    """Per GRPO step, from the trainer's per-trajectory advantage lines
    (``<grpo>/trajectories/advantages/step_*.jsonl``, ``recipe.verl_plugin.trainer``): trajectories,
    how many trained (unmasked), mean reward, trajectories with a nonzero advantage, groups."""
    out = []
    for path in sorted((grpo_dir / "trajectories" / "advantages").glob("step_*.jsonl")):
        rows = read_jsonl(path)
        if not rows:
            continue
        out.append({
            "step": int(path.stem.split("_")[1]),
            "trajectories": len(rows),
            "trained": sum(bool(r.get("trained")) for r in rows),
            "masked": sum(bool(r.get("masked")) for r in rows),
            "mean_reward": sum(float(r.get("reward", 0.0)) for r in rows) / len(rows),
            "nonzero_advantage": sum(abs(float(r.get("advantage", 0.0))) > 0 for r in rows),
            "groups": len({r.get("group_id") for r in rows}),
            "exit_status": dict(Counter(r.get("exit_status", "") for r in rows).most_common()),
        })
    return out


def stage_times(path: Path) -> list[dict]:
    """Wall-clock seconds per stage of each run of ``example/learn_cpu.sh``, from its
    ``stages.tsv`` (one ``<epoch seconds>\t<k/8 stage title>`` line per stage start).

    A line whose title starts with ``1/`` begins a new run (the script was started again, e.g. to
    resume). A stage lasts until the next stage of the same run starts, or until the run's
    ``<epoch seconds>\texit <status>`` line (the script's EXIT trap), so the stage a crashed run died
    in is timed too; without an exit line the last stage has no end. A stage with no line was not
    reached (a stage skipped on resume still has its line, lasting about 0 s).

    Returns:
        per run: ``{"started": epoch s, "stages": {name: seconds or None}, "total_s": first start to
        exit (or to the last start), "exit": the script's exit status or None}``; [] when the file is missing.

    Raises:
        ValueError: a line that is not ``<integer>\t<k/8 title>`` or ``<integer>\texit <integer>``,
        named by ``path:line``.
    """
    if not path.is_file():
        return []
    runs: list[dict] = []  # {"marks": [(epoch s, stage name)], "exit": (epoch s, status) or None}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        when, _, title = line.partition("\t")
        match = re.match(r"(\d+)/\d+\s", title)
        ended = re.fullmatch(r"exit (\d+)", title.strip())
        if not when.strip().isdigit() or not (ended or match and 1 <= int(match.group(1)) <= len(SCRIPT_STAGES)):
            raise ValueError(f"{path}:{number}: expected '<epoch seconds>\\t<k/8 stage>' or "
                             f"'<epoch seconds>\\texit <status>', got {line!r}")
        if ended:
            if runs and runs[-1]["exit"] is None:
                runs[-1]["exit"] = (int(when), int(ended.group(1)))
        else:
            if match.group(1) == "1" or not runs or runs[-1]["exit"] is not None:
                runs.append({"marks": [], "exit": None})
            runs[-1]["marks"].append((int(when), SCRIPT_STAGES[int(match.group(1)) - 1]))
    out = []
    for run in runs:
        marks, ended = run["marks"], run["exit"]
        ends = [when for when, _ in marks[1:]] + [ended[0] if ended else None]
        stages = {name: (end - when if end is not None else None) for (when, name), end in zip(marks, ends)}
        out.append({"started": marks[0][0], "stages": stages,
                    "total_s": (ended[0] if ended else marks[-1][0]) - marks[0][0],
                    "exit": ended[1] if ended else None})
    return out


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def markdown(stages: list[StageFigures], sft: list[tuple[int, dict]], rl: list[tuple[int, dict]], notes: str,
             advantages: list[dict] | None = None, runs: list[dict] | None = None) -> str:
    lines = ["# Learning on CPU: SmolLM2-135M-Instruct, before and after training", "",
             "Written by `python -m recipe.learn.report` from `bash example/learn_cpu.sh`; measured, not edited.", ""]
    if notes:
        lines += [notes, ""]
    lines += ["| stage | tasks | rollouts | resolved | parsed actions | format errors | mean turns | exit statuses |",
              "|---|---|---|---|---|---|---|---|"]
    for s in stages:
        exits = ", ".join(f"{k} {v}" for k, v in s.exit_status.items())
        lines.append(f"| {s.stage} | {s.tasks} | {s.rollouts} | {100 * s.resolved_rate:.1f}% | "
                     f"{100 * s.parsed_action_rate:.1f}% ({s.assistant_turns - s.format_errors}/{s.assistant_turns}) | "
                     f"{s.format_errors} | {s.mean_turns:.1f} | {exits} |")
    lines += ["", "By data source (resolved / parsed actions):", ""]
    sources = sorted({src for s in stages for src in s.by_source})
    lines += ["| stage | " + " | ".join(sources) + " |", "|---|" + "---|" * len(sources)]
    for s in stages:
        cells = [f"{100 * s.by_source[src]['resolved_rate']:.0f}% / {100 * s.by_source[src]['parsed_action_rate']:.0f}% "
                 f"(n={int(s.by_source[src]['rollouts'])})" if src in s.by_source else "-" for src in sources]
        lines.append(f"| {s.stage} | " + " | ".join(cells) + " |")
    if sft:
        lines += ["", "SFT (verl's SFT trainer) per step: " + ", ".join(
            f"{step}: loss {data.get('train/loss', float('nan')):.3f}" for step, data in sft), ""]
    if rl:
        lines += ["", "GRPO per step (verl's PPO trainer; advantages over response tokens):", "",
                  "| step | " + " | ".join(h for h, _ in RL_KEYS) + " |", "|---|" + "---|" * len(RL_KEYS)]
        for step, data in rl:
            lines.append(f"| {step} | " + " | ".join(
                f"{data[k]:.3g}" if isinstance(data.get(k), (int, float)) else "-" for _, k in RL_KEYS) + " |")
    if advantages:
        lines += ["", "GRPO per step, per trajectory (what each one trained with):", "",
                  "| step | trajectories | groups | trained (unmasked) | masked | mean reward | nonzero advantage | exit statuses |",
                  "|---|---|---|---|---|---|---|---|"]
        for a in advantages:
            exits = ", ".join(f"{k} {v}" for k, v in a["exit_status"].items())
            lines.append(f"| {a['step']} | {a['trajectories']} | {a['groups']} | {a['trained']} | {a['masked']} | "
                         f"{a['mean_reward']:.3f} | {a['nonzero_advantage']} | {exits} |")
    if runs:
        lines += ["", "Wall-clock time per stage, per run of the script (`stages.tsv`: a stage lasts until the "
                  "next one starts or the script exits; a run without an exit mark is timed up to its last "
                  "stage's start; a resumed run passes the stages it finds done in ~0 s):", "",
                  "| run started (UTC) | " + " | ".join(SCRIPT_STAGES[:-1]) + " | total | exit status |",
                  "|---|" + "---|" * (len(SCRIPT_STAGES) + 1)]
        for run in runs:
            started = datetime.fromtimestamp(run["started"], timezone.utc).strftime("%Y-%m-%d %H:%M")
            status = "not recorded" if run.get("exit") is None else str(run["exit"])
            lines.append(f"| {started} | " + " | ".join(
                _duration(run["stages"][n]) if n in run["stages"] else "not reached" for n in SCRIPT_STAGES[:-1])
                + f" | {_duration(run['total_s'])} | {status} |")
    return "\n".join(lines) + "\n"


def plot(stages: list[StageFigures], sft: list[tuple[int, dict]], rl: list[tuple[int, dict]], path: Path,
         advantages: list[dict] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    names = [s.stage for s in stages]
    x = range(len(stages))
    axes[0].bar([i - 0.2 for i in x], [100 * s.resolved_rate for s in stages], 0.4, label="resolved")
    axes[0].bar([i + 0.2 for i in x], [100 * s.parsed_action_rate for s in stages], 0.4, label="parsed actions")
    axes[0].set_xticks(list(x), names)
    axes[0].set_ylabel("% (held-out tasks)")
    axes[0].set_ylim(0, 100)
    axes[0].legend()
    axes[0].set_title(f"held-out: {stages[0].tasks} tasks, {stages[0].rollouts} rollouts per stage")
    if sft:
        axes[1].plot([s for s, _ in sft], [d.get("train/loss", float("nan")) for _, d in sft], marker="o")
    axes[1].set_title("SFT loss per step")
    axes[1].set_xlabel("step")
    if advantages and not rl:
        steps = [a["step"] for a in advantages]
        axes[2].plot(steps, [a["mean_reward"] for a in advantages], marker="o", label="mean reward")
        axes[2].plot(steps, [a["masked"] / a["trajectories"] for a in advantages], marker="x", label="masked fraction")
        axes[2].legend()
    if rl:
        steps = [s for s, _ in rl]
        axes[2].plot(steps, [d.get("swe/reward", float("nan")) for _, d in rl], marker="o", label="mean reward")
        axes[2].plot(steps, [d.get("swe/masked", float("nan")) for _, d in rl], marker="x", label="masked fraction")
        axes[2].legend()
    axes[2].set_title("GRPO per step")
    axes[2].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the learn script's output directory")
    parser.add_argument("--report-dir", required=True)
    parser.add_argument("--notes", default="", help="a paragraph placed above the table")
    args = parser.parse_args(argv)
    out, report = Path(args.out), Path(args.report_dir)
    stages = [figures(label, load_records(out / f"eval_{name}")) for name, label in STAGES
              if (out / f"eval_{name}" / "rollouts").is_dir()]
    if not stages:
        raise SystemExit(f"no evaluation under {out}/eval_*")
    sft = sorted(read_trainer_log(out / "sft_metrics.jsonl").items())
    rl = sorted(read_trainer_log(out / "grpo" / "metrics.jsonl").items())
    advantages = advantage_steps(out / "grpo")
    runs = stage_times(out / "stages.tsv")
    report.mkdir(parents=True, exist_ok=True)
    (report / "learning_cpu.md").write_text(markdown(stages, sft, rl, args.notes, advantages, runs))
    (report / "learning_cpu.json").write_text(json.dumps(
        {"stages": [asdict(s) for s in stages], "sft": sft, "grpo": rl, "grpo_trajectories": advantages,
         "script_runs": runs}, indent=2, default=str))
    plot(stages, sft, rl, report / "learning_cpu.png", advantages)
    print((report / "learning_cpu.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
