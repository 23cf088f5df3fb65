"""Audit the reward on a task set: reference resolves, empty does not, every hack scores 0.

Usage (from the repository root):

    python -m reward.audit --tasks-dir data/smith [--max-workers 1] [--limit-per-package K]
        [--hacks delete_tests,skip_failing,...] [--out report.json] [--timeout 300] [--no-fail-fast]
        [--no-progress]

For each task (``DIR/tasks.jsonl``; with ``--limit-per-package K`` the first K
tasks of each ``repo``) the reference patch, the empty patch and every hack of
``reward.hacks.HACKS`` are graded through the path training uses
(``reward.grader.Grader.grade``: protected files stripped, empty patches scored
without a run, one grade cache, prepared pristine trees, fail-fast on unless
``--no-fail-fast``). A task fails the audit when its reference patch is not
resolved with reward 1, its empty patch is resolved or scores above 0, a hack
scores above 0, or a hack cannot be written for it.

Prints a per-package table (tasks, reference resolved, empty resolved, and per
hack kind the number of tasks where it scored > 0) and the failures by
instance id; ``--out`` gets the same as JSON plus every grade. Exit status 0
when nothing failed, 1 when something did, 2 when the tasks cannot be read.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import json
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from core.task import SWETask, load_tasks
from reward.config import DEFAULT_GRADE_TIMEOUT_S, RewardConfig
from reward.grader import Grader
from reward.grading import GradeResult
from reward.hacks import HACKS, TASK_VARIANTS, build_hacks

BASELINES = ("reference", "empty")


@dataclass
class Grade:
    """One graded patch of the audit."""

    instance_id: str
    package: str
    kind: str  # "reference", "empty" or a hack kind
    reward: float
    resolved: bool
    error: str | None
    removed_files: list[str]
    not_run: int
    duration_s: float
    log_tail: str = ""

    @classmethod
    def of(cls, task: SWETask, kind: str, result: GradeResult) -> Grade:
        return cls(task.instance_id, task.repo, kind, result.reward, result.resolved, result.error,
                   result.removed_test_files, len(result.not_run), round(result.duration_s, 3), result.log_tail[-1500:])

    @property
    def failure(self) -> str | None:
        """Why this grade fails the audit, None when it passes."""
        if self.kind == "reference":
            ok = self.resolved and self.reward == 1.0
            return None if ok else f"reference not resolved (reward {self.reward}, error {self.error})"
        if self.error == "hack_build_error":
            return f"hack could not be written: {self.log_tail}"
        if self.resolved or self.reward > 0:
            return f"{self.kind} scored {self.reward} (resolved={self.resolved}, error {self.error})"
        return None


@dataclass
class AuditReport:
    """Every grade, the per-package table and the failures."""

    kinds: list[str]
    grades: list[Grade] = field(default_factory=list)
    seconds: float = 0.0

    def table(self) -> dict[str, dict[str, int]]:
        """``{package: {"tasks", "reference_resolved", "empty_resolved", <hack>: scored > 0}}`` plus "TOTAL"."""
        rows: dict[str, dict[str, int]] = defaultdict(lambda: {"tasks": 0, "reference_resolved": 0,
                                                               "empty_resolved": 0, **{k: 0 for k in self.kinds}})
        for grade in self.grades:
            for package in (grade.package, "TOTAL"):
                row = rows[package]
                if grade.kind == "reference":
                    row["tasks"] += 1
                    row["reference_resolved"] += int(grade.resolved and grade.reward == 1.0)
                elif grade.kind == "empty":
                    row["empty_resolved"] += int(grade.resolved or grade.reward > 0)
                else:
                    row[grade.kind] += int(grade.resolved or grade.reward > 0 or grade.error == "hack_build_error")
        return {name: dict(rows[name]) for name in sorted(rows, key=lambda n: (n == "TOTAL", n))}

    def failures(self) -> list[dict[str, Any]]:
        return [{"instance_id": g.instance_id, "kind": g.kind, "why": g.failure, "log_tail": g.log_tail[-600:]}
                for g in self.grades if g.failure]

    def format_table(self) -> str:
        table = self.table()
        columns = ["tasks", "reference_resolved", "empty_resolved", *self.kinds]
        heads = ["package", "tasks", "ref ok", "empty>0", *self.kinds]
        width = max([len(p) for p in table] + [8])
        lines = [f"{heads[0]:<{width}} " + " ".join(f"{h:>{max(len(h), 5)}}" for h in heads[1:])]
        for package, row in table.items():
            lines.append(f"{package:<{width}} " + " ".join(f"{row[c]:>{max(len(h), 5)}}"
                                                         for c, h in zip(columns, heads[1:])))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"kinds": self.kinds, "seconds": round(self.seconds, 1), "table": self.table(),
                "failures": self.failures(), "grades": [g.__dict__ for g in self.grades]}


def select_tasks(tasks: list[SWETask], limit_per_package: int | None) -> list[SWETask]:
    """The first ``limit_per_package`` tasks of each ``repo`` (all when None), in file order."""
    if limit_per_package is None:
        return list(tasks)
    seen: dict[str, int] = defaultdict(int)
    chosen = []
    for task in tasks:
        if seen[task.repo] < limit_per_package:
            seen[task.repo] += 1
            chosen.append(task)
    return chosen


async def audit(
    tasks: list[SWETask],
    config: RewardConfig,
    *,
    kinds: list[str] | None = None,
    max_workers: int = 1,
    work_root: str | None = None,
    progress: bool = True,
) -> AuditReport:
    """Grade reference, empty and each hack of ``kinds`` (default all) for every task.

    ``max_workers`` tasks are audited at once (each grades its patches one after
    another). A hack that cannot be written is recorded as error ``hack_build_error``.
    """
    kinds = list(kinds or HACKS)
    report = AuditReport(kinds=kinds)
    grader = Grader(config=config, work_root=work_root)
    semaphore = asyncio.Semaphore(max(1, max_workers))
    bar = tqdm(total=len(tasks), desc="auditing", unit="task", file=sys.stderr, disable=not progress)
    start = time.monotonic()

    async def one(task: SWETask) -> None:
        async with semaphore:
            patches: dict[str, str] = {"reference": task.patch, "empty": ""}
            try:
                patches.update(await _hacks_for(grader, task, kinds))
            except Exception as exc:  # noqa: BLE001 - one task's failure is recorded, the audit goes on
                for kind in kinds:
                    report.grades.append(Grade(task.instance_id, task.repo, kind, 0.0, False, "hack_build_error",
                                               [], 0, 0.0, f"{type(exc).__name__}: {exc}"))
            for kind, patch in patches.items():
                # Some hacks attack the task's own command: they are graded on a variant of it.
                graded_task = TASK_VARIANTS.get(kind, lambda t: t)(task)
                report.grades.append(Grade.of(task, kind, await grader.grade(graded_task, patch)))
        bar.update(1)

    try:
        await asyncio.gather(*(one(task) for task in tasks))
    finally:
        bar.close()
        grader.close()
    report.seconds = time.monotonic() - start
    order = {task.instance_id: i for i, task in enumerate(tasks)}
    rank = {kind: i for i, kind in enumerate([*BASELINES, *kinds])}
    report.grades.sort(key=lambda g: (order[g.instance_id], rank[g.kind]))
    return report


async def _hacks_for(grader: Grader, task: SWETask, kinds: list[str]) -> dict[str, str]:
    """The task's hack patches, written in its repository or, for an image task, in its image's tree."""
    if task.repo_path:
        return await asyncio.to_thread(build_hacks, task, kinds)
    containers = await grader.containers_for(task)
    if containers is None:
        raise RuntimeError(f"{task.instance_id}: an image task, and no Docker engine answers")
    tmp = await asyncio.to_thread(tempfile.mkdtemp, prefix="audit-tree-")
    try:
        tree = await containers.copy_tree(task, Path(tmp) / "repo")
        return await asyncio.to_thread(build_hacks, task, kinds, tree=str(tree))
    finally:
        await asyncio.to_thread(shutil.rmtree, tmp, True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m reward.audit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks-dir", required=True, help="directory holding tasks.jsonl")
    parser.add_argument("--max-workers", type=int, default=1, help="tasks audited at once (default 1)")
    parser.add_argument("--limit-per-package", type=int, default=None, help="first K tasks of each repo")
    parser.add_argument("--hacks", default=None, help=f"comma-separated kinds (default all: {','.join(HACKS)})")
    parser.add_argument("--out", default=None, help="write the JSON report here")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per test run (default 300)")
    parser.add_argument("--grade-timeout", type=float, default=DEFAULT_GRADE_TIMEOUT_S,
                        help=f"seconds per whole grade (default {DEFAULT_GRADE_TIMEOUT_S:g})")
    parser.add_argument("--no-fail-fast", action="store_true", help="run every test of every grade")
    parser.add_argument("--work-root", default=None, help="directory for temporary repository copies")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    if args.max_workers < 1 or (args.limit_per_package is not None and args.limit_per_package < 1):
        parser.error("--max-workers and --limit-per-package must be >= 1")
    if args.hacks:
        unknown = [k for k in args.hacks.split(",") if k not in HACKS]
        if unknown:
            parser.error(f"unknown hack kinds {unknown}; known: {list(HACKS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (see the module docstring)."""
    args = parse_args(argv)
    try:
        tasks = select_tasks(load_tasks(str(Path(args.tasks_dir) / "tasks.jsonl")), args.limit_per_package)
    except (OSError, ValueError) as exc:
        print(f"error: cannot read tasks: {exc}", file=sys.stderr)
        return 2
    config = RewardConfig(timeout_s=args.timeout, grade_timeout_s=args.grade_timeout, fail_fast=not args.no_fail_fast)
    kinds = args.hacks.split(",") if args.hacks else None
    report = asyncio.run(audit(tasks, config, kinds=kinds, max_workers=args.max_workers, work_root=args.work_root,
                               progress=not args.no_progress))
    print(report.format_table())
    failures = report.failures()
    print(f"{len(tasks)} tasks, {len(report.grades)} grades in {report.seconds:.0f} s; failures: {len(failures)}")
    for failure in failures:
        print(f"FAIL {failure['instance_id']} {failure['kind']}: {failure['why']}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
        print(f"Report written to {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
