"""Prepare training/evaluation data: task repositories, tasks.jsonl and verl parquet files.

Usage (from the repository root):

    python prepare/prepare_data.py --mode simple [--out data/simple] [--seed 0]
        [--num-tasks 24] [--test-fraction 0.25]
    python prepare/prepare_data.py --mode smith [--packages a,b] [--packages-file F.yaml]
        [--out data/smith] [--jobs 2] [--max-tasks-per-package 25] [--seed 0]
        [--task-timeout 0]
    python prepare/prepare_data.py --mode swebench --input FILE.jsonl [--out data/swebench]
        [--data-source swe_bench]
    python prepare/prepare_data.py --validate data/simple   # re-check, drop failures, rewrite
    python prepare/prepare_data.py --mode smith --images    # + Docker image tasks in OUT/images

Every simple/smith task is validated before it is written (``prepare.validate``);
a task that fails is reported on stderr (``DROPPED <id>: <reason>``), listed in
``OUT/dropped.jsonl`` and left out. ``--mode smith`` validates per package as it
goes (``prepare.smith``) and resumes an interrupted run in the same ``--out``;
``--mode swebench`` converts rows without running them (they need their Docker
image). Exit status: 0 when at least one task is written, 1 otherwise, 2 for bad
arguments.

Adding a mode: write ``async def _build_<mode>(args, out_dir) -> Built`` and add
it to ``_builder``.
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
from dataclasses import dataclass

from prepare.export import OutputPaths, write_outputs
from prepare.repo_builder import build_task_repos
from prepare.simple_tasks import generate_specs
from core.task import SWETask, load_tasks
from prepare.validate import ValidationResult, format_package_table, report_failures, validate_tasks

MODES = ("simple", "smith", "swebench")
DEFAULT_OUT = {"simple": "data/simple", "smith": "data/smith", "swebench": "data/swebench"}


@dataclass
class Built:
    """A builder's tasks; ``validated`` says they need no further validation pass."""

    tasks: list[SWETask]
    validated: bool = False


Builder = Callable[[argparse.Namespace, Path], Awaitable[Built]]


async def _build_simple(args: argparse.Namespace, out_dir: Path) -> Built:
    """Synthetic one-bug packages (``prepare.simple_tasks``) as repos under ``out_dir/repos``."""
    repos_dir = out_dir / "repos"
    # Stale repos from an earlier run (other seed or count) must not linger.
    await asyncio.to_thread(shutil.rmtree, repos_dir, ignore_errors=True)
    await asyncio.to_thread(repos_dir.mkdir, parents=True, exist_ok=True)
    specs = await asyncio.to_thread(generate_specs, args.seed, args.num_tasks)
    return Built(await build_task_repos(specs, repos_dir, concurrency=args.concurrency))


async def _build_smith(args: argparse.Namespace, out_dir: Path) -> Built:
    """Bugs injected into real PyPI packages (``prepare.smith``); validated per package."""
    from prepare.smith import SmithOptions, build_smith, format_reports, write_reports
    from prepare.smith_packages import DEFAULT_PACKAGES_FILE, load_packages

    names = [n.strip() for n in args.packages.split(",") if n.strip()] if args.packages else None
    specs = load_packages(args.packages_file or DEFAULT_PACKAGES_FILE, names)
    opts = SmithOptions(
        out_dir=out_dir,
        seed=args.seed,
        max_tasks_per_package=args.max_tasks_per_package,
        max_candidates_per_package=args.max_candidates_per_package,
        jobs=args.jobs,
        task_timeout_s=args.task_timeout,
        validate_timeout_s=args.timeout,
        progress=not args.no_progress,
    )
    tasks, reports = await build_smith(specs, opts)
    await asyncio.to_thread(write_reports, reports, out_dir / "smith_report.jsonl")
    print(format_reports(reports), file=sys.stderr)
    for report in reports:
        if not report.ok:
            print(f"SKIPPED package {report.name}: {report.stage}: {report.reason}", file=sys.stderr)
    return Built(tasks, validated=True)


async def _build_swebench(args: argparse.Namespace, out_dir: Path) -> Built:
    """SWE-bench-format rows (JSONL file, or a Hugging Face dataset name) converted as they are."""
    from prepare.swebench_import import load_instances

    try:
        tasks, problems = await asyncio.to_thread(
            load_instances, args.input, data_source=args.data_source, split=args.split
        )
    except (FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    for problem in problems:
        print(f"SKIPPED {problem}", file=sys.stderr)
    return Built(tasks, validated=True)


def _builder(mode: str) -> Builder:
    builders = {"simple": _build_simple, "smith": _build_smith, "swebench": _build_swebench}
    if mode in builders:
        return builders[mode]
    raise ValueError(f"unknown mode: {mode}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring); exits with status 2 on bad values."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=MODES, default="simple", help="which tasks to prepare")
    parser.add_argument("--out", default=None, help="output directory (default: data/<mode>)")
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
    parser.add_argument("--images", action="store_true",
                        help="also build Docker images of the written tasks and write them as image tasks to "
                             "OUT/images (python -m prepare.images; needs an engine: example/docker_engine.sh start)")
    smith = parser.add_argument_group("smith mode")
    smith.add_argument("--packages", default="", help="comma-separated package names from the packages file (default: all)")
    smith.add_argument("--packages-file", default="", help="YAML list of packages (default: prepare/smith_packages.yaml)")
    smith.add_argument("--jobs", type=int, default=2, help="packages prepared in parallel")
    smith.add_argument("--max-tasks-per-package", type=int, default=25, help="stop a package after this many kept tasks")
    smith.add_argument(
        "--max-candidates-per-package", type=int, default=0, help="mutations tried per package (0 = 4x max tasks)"
    )
    smith.add_argument(
        "--task-timeout",
        type=float,
        default=0.0,
        help="seconds per mutated test run; a hang past it is dropped (0 = auto: 4x the clean suite, 15-60 s)",
    )
    swebench = parser.add_argument_group("swebench mode")
    swebench.add_argument("--input", default="", help="SWE-bench-format JSONL file or Hugging Face dataset name")
    swebench.add_argument("--split", default="test", help="dataset split when --input is a Hugging Face dataset")
    swebench.add_argument("--data-source", default="swe_bench", help="data_source written for each row")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = DEFAULT_OUT[args.mode]
    if args.mode == "swebench" and not args.validate and not args.input:
        parser.error("--mode swebench needs --input FILE.jsonl (or a dataset name)")
    if args.jobs < 1 or args.max_tasks_per_package < 1 or args.max_candidates_per_package < 0:
        parser.error("--jobs and --max-tasks-per-package must be at least 1, --max-candidates-per-package >= 0")
    if args.task_timeout < 0:
        parser.error("--task-timeout must be >= 0")
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
        built = await _builder(args.mode)(args, out_dir)
        tasks = built.tasks

    if args.validate or not built.validated:
        results = await validate_tasks(
            tasks, concurrency=args.concurrency, timeout_s=args.timeout, progress=not args.no_progress
        )
    else:
        results = [ValidationResult(task.instance_id, True) for task in tasks]
    if args.validate:
        print(format_package_table(tasks, results), file=sys.stderr)
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
    if kept and args.images:
        from prepare import images

        return await images.run(images.parse_args(
            ["--tasks-dir", str(out_dir), "--out", str(out_dir / "images"), "--seed", str(args.seed),
             "--test-fraction", str(args.test_fraction), "--concurrency", str(args.concurrency),
             "--timeout", str(args.timeout), *(["--no-progress"] if args.no_progress else [])]))
    return 0 if kept else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse ``argv`` (default ``sys.argv[1:]``), run, return the exit status."""
    return asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
