"""Reward throughput on a GRPO-like batch, with and without the grade cache, in one run.

Usage (from the repository root):

    python bench/reward_throughput.py [--num-tasks 4] [--rollouts 8] [--concurrency 2]
        [--repeat-fraction 0.5] [--tasks-dir DIR]

Builds ``--num-tasks`` tasks with ``prepare/prepare_data.py --mode simple`` in a
temporary directory (or reads ``DIR/tasks.jsonl``) and, per task, a group of
``--rollouts`` patches of which ``--repeat-fraction`` are duplicates of another
rollout's patch or empty (half of those empty), the rest distinct (the
reference fix, and the fix plus a distinct new notes file). The batch is graded
twice, ``--concurrency`` grades in flight both times:

- uncached: ``reward.grading.grade_patch`` per rollout, every patch (empty ones
  too) run through the hidden tests, as a grader without a cache does;
- cached: one ``reward.grader.Grader`` for the batch (identical normalised
  patches graded once, empty patches scored without running anything).

Each mode is timed ``--repeats`` times in alternating order (the machine may be
shared); prints the median wall times, the speedup, and checks that both give every rollout
the same reward. With a repeat fraction f, the cache can remove at most a
fraction f of the test runs, so the speedup is bounded by 1 / (1 - f): 2x at
f = 0.5, 4x at f = 0.75.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from prepare.task import SWETask, load_tasks  # noqa: E402
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


def group_patches(task: SWETask, rollouts: int, repeat_fraction: float, rng: random.Random) -> list[str]:
    """One GRPO group: distinct fixes, then duplicates of them and empty patches, shuffled."""
    repeats = round(rollouts * repeat_fraction)
    distinct = [task.patch] + [task.patch + _notes_patch(k) for k in range(1, rollouts - repeats)]
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


async def grade_cached(batch: list[tuple[SWETask, str]], concurrency: int) -> tuple[list[float], float, Grader]:
    semaphore = asyncio.Semaphore(concurrency)
    grader = Grader(config=RewardConfig())
    grader.network.effective

    async def one(task: SWETask, patch: str) -> float:
        async with semaphore:
            return (await grader.grade(task, patch, skip_empty=True)).reward

    start = time.perf_counter()
    rewards = await asyncio.gather(*(one(t, p) for t, p in batch))
    return list(rewards), time.perf_counter() - start, grader


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-tasks", type=int, default=4)
    parser.add_argument("--rollouts", type=int, default=8, help="rollouts per task (GRPO group size)")
    parser.add_argument("--concurrency", type=int, default=2, help="grades in flight at once")
    parser.add_argument("--repeat-fraction", type=float, default=0.5, help="share of duplicate or empty patches")
    parser.add_argument("--tasks-dir", default=None, help="use DIR/tasks.jsonl instead of generating tasks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs of each mode, alternating order; the median is reported")
    args = parser.parse_args(argv)
    if not 0 <= args.repeat_fraction < 1:
        parser.error("--repeat-fraction must be in [0, 1)")

    with tempfile.TemporaryDirectory(prefix="reward-bench-") as tmp:
        tasks_dir = Path(args.tasks_dir) if args.tasks_dir else Path(tmp) / "simple"
        if not args.tasks_dir:
            subprocess.run(
                [sys.executable, str(ROOT / "prepare" / "prepare_data.py"), "--mode", "simple", "--out", str(tasks_dir),
                 "--num-tasks", str(args.num_tasks), "--seed", str(args.seed), "--no-progress"],
                check=True, cwd=ROOT, capture_output=True,
            )
        tasks = load_tasks(str(tasks_dir / "tasks.jsonl"))[: args.num_tasks]
        rng = random.Random(args.seed)
        batch = [(task, patch) for task in tasks for patch in group_patches(task, args.rollouts, args.repeat_fraction, rng)]
        n_empty = sum(1 for _, p in batch if not p)
        n_unique = len({(t.instance_id, p) for t, p in batch if p})
        print(f"batch: {len(tasks)} tasks x {args.rollouts} rollouts = {len(batch)} patches "
              f"({n_unique} distinct non-empty, {len(batch) - n_unique - n_empty} duplicates, {n_empty} empty); "
              f"concurrency {args.concurrency}")

        uncached_times, cached_times = [], []
        for i in range(max(1, args.repeats)):
            # Alternate which mode goes first, so machine noise and warm caches hit both alike.
            order = ("uncached", "cached") if i % 2 == 0 else ("cached", "uncached")
            for mode in order:
                if mode == "uncached":
                    uncached_rewards, seconds = asyncio.run(grade_uncached(batch, args.concurrency))
                    uncached_times.append(seconds)
                else:
                    cached_rewards, seconds, grader = asyncio.run(grade_cached(batch, args.concurrency))
                    cached_times.append(seconds)
            if uncached_rewards != cached_rewards:
                print("ERROR: rewards differ between the cached and uncached runs", file=sys.stderr)
                return 1
        uncached_s, cached_s = statistics.median(uncached_times), statistics.median(cached_times)
        stats = grader.cache.stats
        print(f"timed runs per mode: {len(uncached_times)} (median reported); "
              f"uncached {[round(t, 2) for t in uncached_times]} s, cached {[round(t, 2) for t in cached_times]} s")
        print(f"uncached: {uncached_s:.2f} s ({len(batch)} test runs, {len(batch) / uncached_s:.2f} rollouts/s)")
        print(f"cached:   {cached_s:.2f} s ({stats.misses} test runs, {stats.hits + stats.joins} shared, "
              f"{n_empty} empty scored without a run; {len(batch) / cached_s:.2f} rollouts/s)")
        print(f"speedup: {uncached_s / cached_s:.2f}x (bound for this batch: {len(batch) / max(stats.misses, 1):.2f}x); "
              f"mean reward {sum(cached_rewards) / len(cached_rewards):.3f} in both runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
