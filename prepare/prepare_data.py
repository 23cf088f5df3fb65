"""Prepare training/evaluation data: task repositories, tasks.jsonl and verl parquet files.

Usage (from the repository root):

    python prepare/prepare_data.py --mode simple [--out data/simple] [--seed 0]
        [--num-tasks 24] [--test-fraction 0.25]
    python prepare/prepare_data.py --validate data/simple   # re-check, drop failures, rewrite

Every task is validated before it is written (``prepare.validate``); a task
that fails is reported on stderr (``DROPPED <id>: <reason>``), listed in
``OUT/dropped.jsonl`` and left out. Exit status: 0 when at least one task is
written, 1 otherwise, 2 for bad arguments.

Adding a mode: write ``async def _build_<mode>(args, out_dir) -> list[SWETask]``
returning candidate tasks (not yet validated) and add it to ``_builder``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: import from the repository root (prepare/, reward/, sandbox/)
    # instead of this directory, whose module names (task, export, ...) are generic.
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import argparse
import asyncio
import json
import shutil
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence

from prepare.export import OutputPaths, write_outputs
from prepare.repo_builder import build_task_repos
from prepare.simple_tasks import generate_specs
from prepare.task import SWETask, load_tasks
from prepare.validate import ValidationResult, report_failures, validate_tasks

MODES = ("simple",)
Builder = Callable[[argparse.Namespace, Path], Awaitable[list[SWETask]]]


async def _build_simple(args: argparse.Namespace, out_dir: Path) -> list[SWETask]:
    """Synthetic one-bug packages (``prepare.simple_tasks``) as repos under ``out_dir/repos``."""
    repos_dir = out_dir / "repos"
    # Stale repos from an earlier run (other seed or count) must not linger.
    await asyncio.to_thread(shutil.rmtree, repos_dir, ignore_errors=True)
    await asyncio.to_thread(repos_dir.mkdir, parents=True, exist_ok=True)
    specs = await asyncio.to_thread(generate_specs, args.seed, args.num_tasks)
    return await build_task_repos(specs, repos_dir, concurrency=args.concurrency)


def _builder(mode: str) -> Builder:
    if mode == "simple":
        return _build_simple
    raise ValueError(f"unknown mode: {mode}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring); exits with status 2 on bad values."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=MODES, default="simple", help="which tasks to prepare")
    parser.add_argument("--out", default="data/simple", help="output directory (default: data/simple)")
    parser.add_argument("--seed", type=int, default=0, help="seed for generation and the train/test split")
    parser.add_argument("--num-tasks", type=int, default=24, help="tasks to generate (simple mode)")
    parser.add_argument("--test-fraction", type=float, default=0.25, help="share of tasks in test.parquet")
    parser.add_argument(
        "--validate",
        metavar="DIR",
        help="validate DIR/tasks.jsonl instead of generating: failures are dropped and DIR's tasks.jsonl and "
        "parquet files rewritten (split recomputed from --seed/--test-fraction); repositories are left alone",
    )
    parser.add_argument("--concurrency", type=int, default=4, help="test runs in flight during validation")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per test run during validation")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    if args.num_tasks < 1:
        parser.error("--num-tasks must be at least 1")
    if not 0.0 <= args.test_fraction <= 1.0:
        parser.error("--test-fraction must be within [0, 1]")
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    if args.validate and not Path(args.validate, "tasks.jsonl").is_file():
        parser.error(f"--validate: no tasks.jsonl in {args.validate}")
    return args


def _write_dropped(out_dir: Path, results: Sequence[ValidationResult]) -> Path:
    path = out_dir / "dropped.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for result in results:
            if not result.ok:
                fh.write(json.dumps({"instance_id": result.instance_id, "reason": result.reason}) + "\n")
    return path


def _summary(kept: Sequence[SWETask], n_dropped: int, paths: OutputPaths) -> str:
    kinds = Counter(t.bug_kind or "unknown" for t in kept)
    kinds_text = ", ".join(f"{kind}={n}" for kind, n in sorted(kinds.items()))
    return (
        f"{len(kept)} tasks ({n_dropped} dropped; {len(kinds)} kinds: {kinds_text}) -> "
        f"{paths.tasks_jsonl}, {paths.train_parquet} ({paths.n_train}), {paths.test_parquet} ({paths.n_test})"
    )


async def run(args: argparse.Namespace) -> int:
    """Generate (or load) tasks, validate them, write the outputs; returns the exit status."""
    if args.validate:
        out_dir = Path(args.validate).resolve()
        tasks = await asyncio.to_thread(load_tasks, str(out_dir / "tasks.jsonl"))
    else:
        out_dir = Path(args.out).resolve()
        await asyncio.to_thread(out_dir.mkdir, parents=True, exist_ok=True)
        tasks = await _builder(args.mode)(args, out_dir)

    results = await validate_tasks(
        tasks, concurrency=args.concurrency, timeout_s=args.timeout, progress=not args.no_progress
    )
    n_dropped = report_failures(results)
    kept = [task for task, result in zip(tasks, results) if result.ok]
    if not args.validate:
        # Generated repos of dropped tasks are ours to remove; in --validate mode
        # repositories may live elsewhere and are left alone.
        for task, result in zip(tasks, results):
            if not result.ok and task.repo_path:
                await asyncio.to_thread(shutil.rmtree, task.repo_path, ignore_errors=True)
    await asyncio.to_thread(_write_dropped, out_dir, results)
    paths = await asyncio.to_thread(
        write_outputs, kept, out_dir, seed=args.seed, test_fraction=args.test_fraction
    )
    print(_summary(kept, n_dropped, paths))
    return 0 if kept else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse ``argv`` (default ``sys.argv[1:]``), run, return the exit status."""
    return asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
