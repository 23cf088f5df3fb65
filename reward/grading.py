"""Grade a model patch the way SWE-bench's harness does, on a pristine repository copy.

Steps (``swebench/harness/run_evaluation.py`` + ``grading.py``): check out the
task's ``base_commit`` into a fresh temporary copy, apply the model patch (test
file changes removed), apply the task's ``test_patch`` (the hidden tests), run
the FAIL_TO_PASS and PASS_TO_PASS tests, read each test's outcome from the log.
The task counts as resolved when every FAIL_TO_PASS and every PASS_TO_PASS test
passes (SWE-bench's ``ResolvedStatus.FULL``); the binary reward is 1.0 then,
else 0.0.

The agent's own working copy is never graded: it may hold edited tests, caches
or processes the agent left behind.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from prepare.task import SWETask, task_path_env
from reward.patch import PatchError, split_test_changes
from reward.test_log import TestStatus, parse_pytest_log
from sandbox.gitrepo import GitError, checkout_copy, git_env
from sandbox.process import run_command

# Error classes a grade can carry (None = the tests ran to completion).
GradeErrorClass = Literal[
    "empty_patch",  # nothing left to apply (only with skip_empty=True)
    "patch_apply_failed",  # git apply rejected the model patch
    "patch_parse_error",  # the model patch is not a unified diff
    "timeout",  # the test command ran past timeout_s and was killed
    "repo_missing",  # task repository or base_commit not found
    "test_error",  # test patch did not apply, or the test run crashed / ran nothing
]

# As in SWE-bench's grading (``test_passed``): an expected failure counts as a pass.
_PASSING = frozenset({TestStatus.PASSED, TestStatus.XFAIL})
# pytest exit codes 0 (all passed) and 1 (some failed) mean the run completed;
# 2-5 mean interrupted / internal error / usage error / nothing collected.
_COMPLETED_RETURNCODES = frozenset({0, 1})
_LOG_TAIL_CHARS = 4000
_GIT_TIMEOUT_S = 60.0


def _empty_report() -> dict[str, dict[str, list[str]]]:
    return {key: {"success": [], "failure": []} for key in ("FAIL_TO_PASS", "PASS_TO_PASS")}


@dataclass
class GradeResult:
    """Outcome of grading one model patch on one task.

    Attributes:
        instance_id: the task's id.
        resolved: every FAIL_TO_PASS and PASS_TO_PASS test passed.
        reward: 1.0 if resolved else 0.0.
        patch_applied: the (test-stripped) model patch applied cleanly; False for
            an empty patch and when grading stopped before applying it.
        error: None, or the error class (see ``GradeErrorClass``).
        tests: SWE-bench's report shape, ``{"FAIL_TO_PASS": {"success": [...],
            "failure": [...]}, "PASS_TO_PASS": {...}}``; a test missing from the
            log is a failure. Empty lists when no test ran.
        removed_test_files: paths of test files the model patch touched, whose
            changes were dropped before applying.
        duration_s: wall-clock seconds for the whole grade.
        log_tail: the last characters of the test (or git) output, for debugging.
    """

    instance_id: str
    resolved: bool = False
    reward: float = 0.0
    patch_applied: bool = False
    error: GradeErrorClass | None = None
    tests: dict[str, dict[str, list[str]]] = field(default_factory=_empty_report)
    removed_test_files: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    log_tail: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of all fields."""
        return asdict(self)


def _tail(text: str) -> str:
    return text[-_LOG_TAIL_CHARS:]


def _test_env(task: SWETask) -> dict[str, str]:
    """Environment for the test run: the task's Python first on PATH, no outside pytest config."""
    env = task_path_env(task, dict(os.environ))
    # The copy must stay pristine and the log parseable: no .pyc files, no colour.
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["PY_COLORS"] = "0"
    env["NO_COLOR"] = "1"
    # Settings of an outer pytest (e.g. when grading runs inside a test session)
    # must not leak into the task's test run.
    for key in ("PYTEST_ADDOPTS", "PYTEST_PLUGINS", "PYTHONPATH", "PYTEST_CURRENT_TEST"):
        env.pop(key, None)
    return env


def build_report(
    outcomes: dict[str, TestStatus], fail_to_pass: list[str], pass_to_pass: list[str]
) -> dict[str, dict[str, list[str]]]:
    """SWE-bench's per-category success/failure lists from parsed outcomes.

    A test passes when its status is PASSED or XFAIL (SWE-bench's ``test_passed``);
    anything else, including absence from the log, is a failure.
    """
    report = _empty_report()
    for key, names in (("FAIL_TO_PASS", fail_to_pass), ("PASS_TO_PASS", pass_to_pass)):
        for name in names:
            bucket = "success" if outcomes.get(name) in _PASSING else "failure"
            report[key][bucket].append(name)
    return report


async def _apply(repo: Path, patch_text: str, patch_file: Path) -> tuple[bool, str]:
    """``git apply`` a patch in ``repo``; returns (applied, git output)."""
    await asyncio.to_thread(patch_file.write_text, patch_text, encoding="utf-8")
    result = await run_command(
        ["git", "-C", str(repo), "apply", "--whitespace=nowarn", str(patch_file)],
        env=git_env(),
        timeout_s=_GIT_TIMEOUT_S,
    )
    return result.returncode == 0 and not result.timed_out, result.output


def _unique(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))


async def grade_patch(
    task: SWETask,
    model_patch: str,
    *,
    timeout_s: float = 300.0,
    work_root: str | None = None,
    skip_empty: bool = False,
) -> GradeResult:
    """Apply ``model_patch`` to a fresh copy of the task repo and run its tests.

    Args:
        task: the task; needs ``repo_path``, ``base_commit``, ``test_patch``,
            ``test_cmd`` and FAIL_TO_PASS/PASS_TO_PASS node ids.
        model_patch: a unified diff (``git diff`` style) against ``base_commit``;
            changes to test files are removed first (``reward.patch``).
        timeout_s: wall-clock limit in seconds for the test command.
        work_root: directory for the temporary copy (default: the system temp dir).
        skip_empty: when the patch is empty after removing test changes, return
            error "empty_patch" without running the tests. By default the tests
            run anyway, which is how task validation checks that FAIL_TO_PASS
            fails at ``base_commit``.

    Returns:
        A ``GradeResult``. Bad patches, missing repositories, timeouts and test
        crashes are reported through ``GradeResult.error``, never raised. The
        temporary copy is removed in every case, cancellation included; on
        timeout or cancellation the test command's process group is killed.

    Raises:
        asyncio.CancelledError: propagated after cleanup.
    """
    start = time.monotonic()
    result = GradeResult(instance_id=task.instance_id)

    def finish(**updates: Any) -> GradeResult:
        for key, value in updates.items():
            setattr(result, key, value)
        result.duration_s = time.monotonic() - start
        return result

    try:
        patch_text, removed = split_test_changes(model_patch)
    except PatchError as exc:
        return finish(error="patch_parse_error", log_tail=_tail(str(exc)))
    result.removed_test_files = removed
    if skip_empty and not patch_text:
        return finish(error="empty_patch")
    if not task.repo_path or not Path(task.repo_path).exists():
        return finish(error="repo_missing", log_tail=f"task repository not found: {task.repo_path!r}")

    prefix = "grade-" + re.sub(r"[^A-Za-z0-9_.-]", "_", task.instance_id)[:60] + "-"
    tmp = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix=prefix, dir=work_root))
    try:
        repo = tmp / "repo"
        try:
            await checkout_copy(task.repo_path, task.base_commit, repo)
        except (FileNotFoundError, GitError) as exc:
            return finish(error="repo_missing", log_tail=_tail(str(exc)))

        if patch_text:
            applied, output = await _apply(repo, patch_text, tmp / "model.patch")
            if not applied:
                return finish(error="patch_apply_failed", log_tail=_tail(output))
            result.patch_applied = True
        if task.test_patch.strip():
            applied, output = await _apply(repo, task.test_patch, tmp / "test.patch")
            if not applied:
                return finish(error="test_error", log_tail=_tail("test_patch did not apply:\n" + output))

        fail_to_pass, pass_to_pass = list(task.FAIL_TO_PASS), list(task.PASS_TO_PASS)
        selected = _unique(fail_to_pass + pass_to_pass)
        if not selected:
            return finish(error="test_error", log_tail="task lists no FAIL_TO_PASS or PASS_TO_PASS tests")
        command = task.test_cmd + " " + " ".join(shlex.quote(name) for name in selected)
        run = await run_command(command, cwd=repo, env=_test_env(task), timeout_s=timeout_s)
        outcomes = parse_pytest_log(run.output)
        result.tests = build_report(outcomes, fail_to_pass, pass_to_pass)
        if run.timed_out:
            return finish(error="timeout", log_tail=_tail(run.output + f"\n[killed after {timeout_s:g} s]"))
        if run.returncode not in _COMPLETED_RETURNCODES or not outcomes:
            return finish(error="test_error", log_tail=_tail(run.output))
        resolved = not any(result.tests[key]["failure"] for key in ("FAIL_TO_PASS", "PASS_TO_PASS"))
        return finish(resolved=resolved, reward=1.0 if resolved else 0.0, log_tail=_tail(run.output))
    finally:
        # Shielded so a second cancellation cannot skip the cleanup; rmtree
        # runs in a thread because a repo copy can hold many files.
        await asyncio.shield(asyncio.to_thread(shutil.rmtree, tmp, ignore_errors=True))
