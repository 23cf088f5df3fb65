"""Check tasks the way SWE-bench validates its instances, before they are used.

A task is valid when, graded on a pristine copy (``reward.grading.grade_patch``):
- the reference ``patch`` resolves it (every FAIL_TO_PASS and PASS_TO_PASS passes), and
- the empty patch does not: every FAIL_TO_PASS test fails at ``base_commit``
  while every PASS_TO_PASS test passes there.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

from tqdm import tqdm

from core.task import SWETask
from reward.container import ContainerGrading
from sandbox.docker_sandbox import DockerSettings
from reward.grading import GradeResult, grade_patch


@dataclass
class ValidationResult:
    """Verdict on one task.

    Attributes:
        instance_id: the task's id.
        ok: the task passed every check.
        reason: why it failed ("" when ok).
        reference: grade of the reference patch (None if not run).
        empty: grade of the empty patch (None if not run).
    """

    instance_id: str
    ok: bool
    reason: str = ""
    reference: GradeResult | None = None
    empty: GradeResult | None = None


def _short(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def judge(task: SWETask, reference: GradeResult, empty: GradeResult) -> ValidationResult:
    """Verdict from the two grades of ``task`` (pure; see the module docstring for the rules)."""

    def fail(reason: str) -> ValidationResult:
        return ValidationResult(task.instance_id, False, reason, reference, empty)

    if not task.FAIL_TO_PASS:
        return fail("task has no FAIL_TO_PASS tests")
    if not reference.resolved:
        failing = reference.tests["FAIL_TO_PASS"]["failure"] + reference.tests["PASS_TO_PASS"]["failure"]
        detail = f"error={reference.error}" if reference.error else f"failing: {_short(failing)}"
        return fail(f"reference patch does not resolve the task ({detail})")
    if empty.error not in (None, "test_error"):
        return fail(f"tests at base_commit could not run (error={empty.error})")
    if empty.resolved:
        return fail("the empty patch resolves the task")
    passing_f2p = empty.tests["FAIL_TO_PASS"]["success"]
    if passing_f2p:
        return fail(f"FAIL_TO_PASS tests already pass at base_commit: {_short(passing_f2p)}")
    failing_p2p = empty.tests["PASS_TO_PASS"]["failure"]
    if failing_p2p:
        return fail(f"PASS_TO_PASS tests fail at base_commit: {_short(failing_p2p)}")
    return ValidationResult(task.instance_id, True, "", reference, empty)


async def validate_task(
    task: SWETask,
    *,
    timeout_s: float = 120.0,
    work_root: str | None = None,
    semaphore: asyncio.Semaphore | None = None,
    containers: ContainerGrading | None = None,
) -> ValidationResult:
    """Grade the reference and the empty patch of ``task`` and judge the pair.

    ``containers``: the Docker engine image tasks are graded with (``reward.container``).

    The two grades run concurrently, each holding ``semaphore`` (when given)
    while it runs. Never raises for a bad task; the reason is in the result
    (an unexpected exception from the grader included, so one broken record
    cannot stop a whole preparation run).
    """

    async def grade(patch: str) -> GradeResult:
        # The reference defines the expected outcomes (an XFAIL it gives is expected).
        as_reference = patch == task.patch
        async with semaphore or contextlib.nullcontext():
            return await grade_patch(task, patch, timeout_s=timeout_s, work_root=work_root, as_reference=as_reference,
                                     containers=containers)

    try:
        reference, empty = await asyncio.gather(grade(task.patch), grade(""))
    except Exception as exc:  # noqa: BLE001 - reported as this task's failure
        return ValidationResult(task.instance_id, False, f"grading crashed: {type(exc).__name__}: {exc}")
    return judge(task, reference, empty)


async def validate_tasks(
    tasks: Sequence[SWETask],
    *,
    concurrency: int = 4,
    timeout_s: float = 120.0,
    work_root: str | None = None,
    progress: bool = True,
    containers: ContainerGrading | None = None,
) -> list[ValidationResult]:
    """Validate every task, at most ``concurrency`` grades at a time.

    Args:
        tasks: the tasks to check.
        concurrency: test runs in flight at once.
        timeout_s: limit per test run, in seconds.
        work_root: directory for the temporary repository copies.
        progress: show a tqdm bar on stderr.
        containers: the Docker engine image tasks are graded with.

    Returns:
        One ``ValidationResult`` per task, in the order of ``tasks``.
    """
    semaphore = asyncio.Semaphore(max(1, concurrency))
    own = None
    if containers is None and any(not task.repo_path for task in tasks):
        try:  # image tasks are graded in containers; without an engine each fails with sandbox_error
            containers = own = await asyncio.to_thread(ContainerGrading.connect, DockerSettings())
        except Exception:  # noqa: BLE001
            containers = None
    bar = tqdm(total=len(tasks), desc="validating tasks", unit="task", file=sys.stderr, disable=not progress)

    async def one(task: SWETask) -> ValidationResult:
        result = await validate_task(task, timeout_s=timeout_s, work_root=work_root, semaphore=semaphore,
                                     containers=containers)
        bar.update(1)
        return result

    try:
        return list(await asyncio.gather(*(one(task) for task in tasks)))
    finally:
        bar.close()
        if own is not None:
            await asyncio.to_thread(own.close)


def report_failures(results: Sequence[ValidationResult], stream: TextIO | None = None) -> int:
    """Write one line per failed task (``DROPPED <id>: <reason>``); returns how many failed."""
    out = sys.stderr if stream is None else stream
    failed = [r for r in results if not r.ok]
    for result in failed:
        print(f"DROPPED {result.instance_id}: {result.reason}", file=out)
    return len(failed)


def format_package_table(tasks: Sequence[SWETask], results: Sequence[ValidationResult]) -> str:
    """A plain-text table of validation results per package (``task.repo``).

    Columns: tasks, valid, invalid, percent valid, and the mean seconds of the
    reference-patch grade. A final ``all`` row sums the packages.
    """
    rows: dict[str, list[tuple[SWETask, ValidationResult]]] = {}
    for task, result in zip(tasks, results):
        rows.setdefault(task.repo, []).append((task, result))
    width = max([len("package"), len("all")] + [len(repo) for repo in rows])
    header = f"{'package':<{width}} {'tasks':>5} {'valid':>5} {'invalid':>7} {'valid%':>6} {'ref_s':>6}"
    lines = [header, "-" * len(header)]

    def line(name: str, pairs: list[tuple[SWETask, ValidationResult]]) -> str:
        n = len(pairs)
        ok = sum(1 for _, r in pairs if r.ok)
        durations = [r.reference.duration_s for _, r in pairs if r.reference is not None]
        mean = sum(durations) / len(durations) if durations else 0.0
        return f"{name:<{width}} {n:>5} {ok:>5} {n - ok:>7} {100.0 * ok / max(n, 1):>6.1f} {mean:>6.2f}"

    for repo in sorted(rows):
        lines.append(line(repo, rows[repo]))
    lines.append(line("all", [pair for pairs in rows.values() for pair in pairs]))
    return "\n".join(lines)
