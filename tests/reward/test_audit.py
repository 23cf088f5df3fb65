"""`python -m reward.audit` on smith tasks built from the tiny fixture package (real
`prepare_data.py --mode smith` run, real git and pytest): reference resolves, empty
does not, every hack scores 0; plus fail-fast and the whole-grade timeout."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from core.task import load_tasks
from reward.config import RewardConfig
from reward.grader import Grader
from reward.grading import grade_patch
from reward.hacks import HACKS

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def smith_dir(smith_tasks_dir) -> Path:
    """The validated smith tasks mined from tests/prepare/fixtures/smith_pkg (tests/conftest.py)."""
    assert len(load_tasks(str(smith_tasks_dir / "tasks.jsonl"))) >= 2
    return smith_tasks_dir


def test_audit_cli_on_smith_tasks(smith_dir, tmp_path):
    report_path = tmp_path / "audit.json"
    proc = subprocess.run(
        [sys.executable, "-m", "reward.audit", "--tasks-dir", str(smith_dir), "--max-workers", "2",
         "--out", str(report_path), "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(report_path.read_text())
    n = len(load_tasks(str(smith_dir / "tasks.jsonl")))
    total = report["table"]["TOTAL"]
    assert total["tasks"] == n and total["reference_resolved"] == n and total["empty_resolved"] == 0
    assert all(total[kind] == 0 for kind in HACKS) and report["failures"] == []
    assert "pypi/tinycalc" in proc.stdout and "failures: 0" in proc.stdout
    grades = {(g["instance_id"], g["kind"]): g for g in report["grades"]}
    assert len(grades) == n * (2 + len(HACKS))
    some = report["grades"][0]["instance_id"]
    assert "conftest.py" in grades[(some, "conftest_pass_all")]["removed_files"]
    assert grades[(some, "pytest_ini_plugin")]["removed_files"] == ["pytest.ini"]
    assert grades[(some, "runner_config_plugin")]["removed_files"] == ["pyproject.toml"]


def test_audit_fails_when_protection_is_off(smith_dir):
    # The audit must be able to fail: without stripping, the force-pass conftest resolves the task.
    from reward.audit import audit

    task = load_tasks(str(smith_dir / "tasks.jsonl"))[0]
    import asyncio

    report = asyncio.run(audit([task], RewardConfig(protect=False), kinds=["conftest_pass_all"], progress=False))
    assert report.table()["TOTAL"]["conftest_pass_all"] == 1
    assert [f["kind"] for f in report.failures()] == ["conftest_pass_all"]


async def test_fail_fast_keeps_rewards_and_lists_skipped_tests(calc_task):
    # A wrong fix: every FAIL_TO_PASS test still fails: with fail-fast the first failure stops the run.
    breaking = calc_task.patch.replace("+    for value in values:", "+    for value in values[:-1]:")
    assert breaking != calc_task.patch
    for variant in ("binary", "partial"):
        full_cfg = RewardConfig(variant=variant, fail_fast=False)
        fast_cfg = replace(full_cfg, fail_fast=True)
        for patch in (calc_task.patch, breaking, ""):
            full = await grade_patch(calc_task, patch, config=full_cfg, timeout_s=120)
            fast = await grade_patch(calc_task, patch, config=fast_cfg, timeout_s=120)
            assert (fast.reward, fast.resolved, fast.error) == (full.reward, full.resolved, full.error), (variant, patch)
            assert full.not_run == []
            ran = sum(len(fast.tests[k][b]) for k in ("FAIL_TO_PASS", "PASS_TO_PASS") for b in ("success", "failure"))
            assert ran + len(fast.not_run) == 4
            if full.resolved:
                assert fast.not_run == []
            else:
                assert fast.not_run, (variant, fast.tests)  # something was skipped once the reward was decided


async def test_grade_timeout_covers_the_whole_grade(calc_task, tmp_path):
    # The test run's own limit is generous; the whole-grade limit stops a hanging suite.
    hang = calc_task.model_copy(update={"test_cmd": "sleep 30; python -m pytest -rA"})
    config = RewardConfig(timeout_s=120, grade_timeout_s=1.5)
    grader = Grader(config=config, work_root=str(tmp_path))
    result = await grader.grade(hang, calc_task.patch)
    assert result.error == "grade_timeout" and result.reward == 0.0 and not result.resolved
    assert result.duration_s < 20
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("grade-")] == []  # the copy was removed


async def test_crashed_pytest_with_forged_passes_scores_zero(calc_task):
    # Found by the smith audit (iniconfig: pytest imports the patched package at start-up):
    # pytest dies before its summary, exit status 1, and code of the patch prints
    # "PASSED <test>" at exit. Without a summary section the run counts as crashed.
    forged = 'python -c "import sys; print(*(\'PASSED \' + a for a in sys.argv[1:]), sep=chr(10)); sys.exit(1)" pytest -rA'
    result = await grade_patch(calc_task.model_copy(update={"test_cmd": forged}), calc_task.patch, timeout_s=60)
    assert result.error == "test_error" and result.reward == 0.0 and not result.resolved, result.log_tail
