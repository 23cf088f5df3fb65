"""Reward throughput on a GRPO-like batch, with and without the grade cache, in one run.

Usage (from the repository root):

    python bench/reward_throughput.py [--num-tasks 4] [--rollouts 8] [--concurrency 2]
        [--repeat-fraction 0.5] [--tasks-dir DIR]

Builds ``--num-tasks`` tasks with ``prepare/prepare_data.py --mode simple`` in a
temporary directory (or reads ``DIR/tasks.jsonl``) and, per task, a group of
``--rollouts`` patches of which ``--repeat-fraction`` are duplicates of another
rollout's patch or empty (half of those empty), the rest distinct: a share
``--resolving-fraction`` of them (at least one) resolve (the reference fix, or
the fix plus a distinct notes file), the others do not (a distinct scratch
script and no fix, what a weak policy often submits). The batch is graded in
three modes, ``--concurrency`` grades in flight in each:

- uncached: ``reward.grading.grade_patch`` per rollout, every patch (empty ones
  too) run through the hidden tests, a fresh clone per grade;
- cache: one ``reward.grader.Grader`` (identical normalised patches graded once,
  empty patches scored without a run), still a fresh clone per grade and every test run;
- cache+fast: the same plus prepared pristine trees copied per grade
  (``core.pristine``) and ``RewardConfig.fail_fast`` (the run stops once the
  reward is decided), as training grades.

Each mode is timed ``--repeats`` times in rotating order (the machine may be
shared); prints the median wall times, both speedups over uncached, and checks
that every mode gives every rollout the same reward.

``--compare-rev REV`` instead times the training mode (cache+fast) of this checkout
against the same bench of git revision REV (checked out in a temporary worktree and run
with this interpreter), alternating ``--repeats`` times on the same tasks and batch, and
prints the per-rollout grading time of each and their ratio: what a change to the
grader costs, measured in one run. With a repeat fraction f,
the cache alone removes at most a fraction f of the test runs (bound 1 / (1 - f),
2x at f = 0.5); the rest must come from cheaper unique grades.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from core.task import SWETask, load_tasks  # noqa: E402
from reward.config import RewardConfig  # noqa: E402
from reward.grader import Grader  # noqa: E402
from reward.grading import grade_patch  # noqa: E402
from reward.isolation import NetworkPolicy  # noqa: E402


def _notes_patch(k: int) -> str:
    """A new file ``NOTES_<k>.txt``: makes an otherwise identical fix a distinct patch."""
    return (
        f"diff --git a/NOTES_{k}.txt b/NOTES_{k}.txt\nnew file mode 100644\n--- /dev/null\n+++ b/NOTES_{k}.txt\n"
        f"@@ -0,0 +1 @@\n+attempt {k}\n"
    )


def _scratch_patch(k: int) -> str:
    """A new top-level ``scratch_<k>.py`` (a reproduction script) and no fix: does not resolve."""
    return (
        f"diff --git a/scratch_{k}.py b/scratch_{k}.py\nnew file mode 100644\n--- /dev/null\n+++ b/scratch_{k}.py\n"
        f"@@ -0,0 +1 @@\n+print('attempt {k}')\n"
    )


def group_patches(
    task: SWETask, rollouts: int, repeat_fraction: float, rng: random.Random, resolving_fraction: float = 0.25
) -> list[str]:
    """One GRPO group: distinct patches (some resolve, most not), then duplicates of them and empty patches, shuffled."""
    repeats = round(rollouts * repeat_fraction)
    n_distinct = rollouts - repeats
    n_resolving = max(1, round(n_distinct * resolving_fraction))
    distinct = [task.patch] + [task.patch + _notes_patch(k) for k in range(1, n_resolving)]
    distinct += [_scratch_patch(k) for k in range(n_distinct - n_resolving)]
    empties = repeats // 2
    duplicates = [distinct[i % len(distinct)] for i in range(repeats - empties)]
    group = distinct + duplicates + [""] * empties
    rng.shuffle(group)
    return group


async def grade_uncached(batch: list[tuple[SWETask, str]], concurrency: int) -> tuple[list[float], float]:
    semaphore = asyncio.Semaphore(concurrency)
    network = NetworkPolicy("auto")
    network.effective  # probe once, outside the timed region's first grade

    async def one(task: SWETask, patch: str) -> float:
        async with semaphore:
            return (await grade_patch(task, patch, network=network, skip_empty=False)).reward

    start = time.perf_counter()
    rewards = await asyncio.gather(*(one(t, p) for t, p in batch))
    return list(rewards), time.perf_counter() - start


async def grade_cached(
    batch: list[tuple[SWETask, str]], concurrency: int, fast: bool
) -> tuple[list[float], float, Grader]:
    semaphore = asyncio.Semaphore(concurrency)
    grader = Grader(config=RewardConfig(fail_fast=fast), use_pristine=fast)
    grader.network.effective

    async def one(task: SWETask, patch: str) -> float:
        async with semaphore:
            return (await grader.grade(task, patch, skip_empty=True)).reward

    start = time.perf_counter()
    try:
        rewards = await asyncio.gather(*(one(t, p) for t, p in batch))
    finally:
        grader.close()
    return list(rewards), time.perf_counter() - start, grader


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-tasks", type=int, default=4)
    parser.add_argument("--rollouts", type=int, default=8, help="rollouts per task (GRPO group size)")
    parser.add_argument("--concurrency", type=int, default=2, help="grades in flight at once")
    parser.add_argument("--repeat-fraction", type=float, default=0.5, help="share of duplicate or empty patches")
    parser.add_argument("--resolving-fraction", type=float, default=0.25,
                        help="share of the distinct patches that resolve (at least one per group)")
    parser.add_argument("--tasks-dir", default=None, help="use DIR/tasks.jsonl instead of generating tasks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs of each mode, rotating order; the median is reported")
    parser.add_argument("--compare-rev", default=None, help="time cache+fast against this git revision's grader")
    parser.add_argument("--only-fast", action="store_true", help=argparse.SUPPRESS)  # one cache+fast run (compare)
    args = parser.parse_args(argv)
    if args.compare_rev:
        return compare_revision(args)
    if not 0 <= args.repeat_fraction < 1 or not 0 <= args.resolving_fraction <= 1:
        parser.error("--repeat-fraction must be in [0, 1) and --resolving-fraction in [0, 1]")

    with tempfile.TemporaryDirectory(prefix="reward-bench-") as tmp:
        tasks_dir = bench_tasks(args, Path(tmp))
        all_tasks = load_tasks(str(tasks_dir / "tasks.jsonl"))
        # One task per repo first (a stratified pick on multi-package sets such as smith).
        firsts = list({t.repo: t for t in reversed(all_tasks)}.values())[::-1]
        tasks = (firsts + [t for t in all_tasks if t not in firsts])[: args.num_tasks]
        rng = random.Random(args.seed)
        batch = [(task, patch) for task in tasks
                 for patch in group_patches(task, args.rollouts, args.repeat_fraction, rng, args.resolving_fraction)]
        n_empty = sum(1 for _, p in batch if not p)
        n_unique = len({(t.instance_id, p) for t, p in batch if p})
        print(f"batch: {len(tasks)} tasks x {args.rollouts} rollouts = {len(batch)} patches "
              f"({n_unique} distinct non-empty, {len(batch) - n_unique - n_empty} duplicates, {n_empty} empty); "
              f"concurrency {args.concurrency}")

        if args.only_fast:
            _, seconds, _ = asyncio.run(grade_cached(batch, args.concurrency, fast=True))
            print(f"cache+fast-seconds {seconds:.4f} rollouts {len(batch)}")
            return 0
        modes = ("uncached", "cache", "cache+fast")
        times: dict[str, list[float]] = {m: [] for m in modes}
        rewards: dict[str, list[float]] = {}
        graders: dict[str, Grader] = {}
        for i in range(max(1, args.repeats)):
            # Rotate which mode goes first, so machine noise and warm caches hit all alike.
            for mode in modes[i % 3:] + modes[: i % 3]:
                if mode == "uncached":
                    rewards[mode], seconds = asyncio.run(grade_uncached(batch, args.concurrency))
                else:
                    rewards[mode], seconds, graders[mode] = asyncio.run(
                        grade_cached(batch, args.concurrency, fast=mode == "cache+fast"))
                times[mode].append(seconds)
            if not rewards["uncached"] == rewards["cache"] == rewards["cache+fast"]:
                print("ERROR: rewards differ between modes", file=sys.stderr)
                return 1
        median = {m: statistics.median(times[m]) for m in modes}
        stats = graders["cache"].cache.stats
        print(f"timed runs per mode: {args.repeats} (median reported); "
              + "; ".join(f"{m} {[round(t, 2) for t in times[m]]} s" for m in modes))
        print(f"uncached:   {median['uncached']:.2f} s ({len(batch)} test runs, "
              f"{len(batch) / median['uncached']:.2f} rollouts/s)")
        print(f"cache:      {median['cache']:.2f} s ({stats.misses} grades, {stats.hits + stats.joins} shared, "
              f"{n_empty} empty scored without a run) -> speedup {median['uncached'] / median['cache']:.2f}x "
              f"(cache-only bound {len(batch) / max(stats.misses, 1):.2f}x)")
        print(f"cache+fast: {median['cache+fast']:.2f} s (pristine copies + fail-fast) -> speedup "
              f"{median['uncached'] / median['cache+fast']:.2f}x")
        resolved = sum(1 for r in rewards["cache"] if r == 1.0)
        print(f"rewards identical in all modes; {resolved}/{len(batch)} rollouts resolve, "
              f"mean reward {sum(rewards['cache']) / len(batch):.3f}")
    return 0


def bench_tasks(args: argparse.Namespace, tmp: Path) -> Path:
    """``--tasks-dir``, or ``--num-tasks`` simple tasks generated under ``tmp`` (seed ``--seed``)."""
    if args.tasks_dir:
        return Path(args.tasks_dir)
    tasks_dir = tmp / "simple"
    subprocess.run(
        [sys.executable, str(ROOT / "prepare" / "prepare_data.py"), "--mode", "simple", "--out", str(tasks_dir),
         "--num-tasks", str(args.num_tasks), "--seed", str(args.seed), "--no-progress"],
        check=True, cwd=ROOT, capture_output=True)
    return tasks_dir


def compare_revision(args: argparse.Namespace) -> int:
    """Alternate this checkout's cache+fast grading with ``args.compare_rev``'s (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="reward-compare-") as tmp:
        tasks_dir = bench_tasks(args, Path(tmp))
        old = Path(tmp) / "old"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(old), args.compare_rev],
                       check=True, capture_output=True)
        common = ["--num-tasks", str(args.num_tasks), "--rollouts", str(args.rollouts), "--concurrency",
                  str(args.concurrency), "--repeat-fraction", str(args.repeat_fraction), "--resolving-fraction",
                  str(args.resolving_fraction), "--seed", str(args.seed), "--tasks-dir", str(tasks_dir)]
        times: dict[str, list[float]] = {"this": [], args.compare_rev: []}
        try:
            for i in range(max(1, args.repeats)):
                for label in (list(times) if i % 2 == 0 else list(times)[::-1]):
                    root = ROOT if label == "this" else old
                    if label == "this":
                        argv = [sys.executable, str(root / "bench" / "reward_throughput.py"), *common, "--only-fast"]
                    else:  # the old bench has no --only-fast: time its whole run's cache+fast line
                        argv = [sys.executable, str(root / "bench" / "reward_throughput.py"), *common, "--repeats", "1"]
                    out = subprocess.run(argv, cwd=root, capture_output=True, text=True, check=True,
                                         env={**os.environ, "PYTHONPATH": str(root)}).stdout
                    found = re.search(r"cache\+fast-seconds ([0-9.]+)", out) or re.search(
                        r"^cache\+fast:\s+([0-9.]+) s", out, re.MULTILINE)
                    times[label].append(float(found.group(1)))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], capture_output=True)
        rollouts = args.num_tasks * args.rollouts
        this, base = statistics.median(times["this"]), statistics.median(times[args.compare_rev])
        print(f"cache+fast grading of {rollouts} rollouts, median of {args.repeats} alternating runs: "
              f"this checkout {this:.2f} s ({1000 * this / rollouts:.0f} ms/rollout) {[round(t, 2) for t in times['this']]}, "
              f"{args.compare_rev} {base:.2f} s ({1000 * base / rollouts:.0f} ms/rollout) "
              f"{[round(t, 2) for t in times[args.compare_rev]]} -> ratio {this / base:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
