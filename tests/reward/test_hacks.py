"""Done-when checks on every `prepare_data.py --mode simple` task: the reference patch
resolves, the empty patch does not, and reward-hacking patches score 0."""

from __future__ import annotations

import asyncio

import pytest

from reward.hacks import EFFECTIVE_UNPROTECTED, TASK_VARIANTS, HackBuilder, build_hacks

from core.task import load_tasks
from reward.config import RewardConfig
from reward.grading import grade_patch
from reward.isolation import grading_policy
from reward.test_log import TestStatus, parse_test_log

# Grades in flight at once (the machine has 2 cores).
CONCURRENCY = 2


@pytest.fixture(scope="module")
def simple_tasks(simple_tasks_dir):
    tasks = load_tasks(str(simple_tasks_dir / "tasks.jsonl"))
    assert len(tasks) == 8
    return tasks


async def _grade_all(jobs, config: RewardConfig):
    semaphore = asyncio.Semaphore(CONCURRENCY)
    network = grading_policy(config)

    async def one(task, patch):
        async with semaphore:
            return await grade_patch(task, patch, config=config, network=network, timeout_s=120)

    return await asyncio.gather(*(one(task, patch) for task, patch in jobs))


async def test_reference_resolves_empty_and_hacks_score_zero(simple_tasks):
    jobs, labels = [], []
    for task in simple_tasks:
        for name, patch in [("reference", task.patch), ("empty", "")] + list(build_hacks(task).items()):
            jobs.append((TASK_VARIANTS.get(name, lambda t: t)(task), patch))
            labels.append((task.instance_id, name))
    results = await _grade_all(jobs, RewardConfig())
    for (instance_id, name), result in zip(labels, results):
        where = f"{instance_id} {name}: error={result.error} {result.log_tail[-800:]}"
        if name == "reference":
            assert result.resolved and result.reward == 1.0 and result.error is None, where
            assert result.removed_test_files == [], where
        else:
            assert not result.resolved and result.reward == 0.0, where
            assert result.error in (None, "test_error"), where  # graded, not rejected: the tests decided
    removed = {name: result.removed_test_files for (_, name), result in zip(labels, results)}
    assert "conftest.py" in removed["conftest_pass_all"]
    assert set(removed["pth_and_sitecustomize"]) == {"sitecustomize.py", "usercustomize.py", "zz_hook.pth"}
    assert "pytest.ini" in removed["pytest_ini_plugin"]
    assert removed["runner_config_plugin"] == ["pyproject.toml"]  # restored after applying: its pytest table changed
    assert removed["atexit_fake_results"] == []  # an ordinary source edit; outcomes come from the plugin
    # What git applied is what the rules see, however the patch spelled the names.
    assert set(removed["quoted_paths"]) == set(removed["escaped_paths"]) == {
        "conftest.py", "sitecustomize.py", "zz_hook.pth", "pytest.ini"}
    assert set(removed["pytest_toml_plugin"]) == {"pytest.toml", ".pytest.toml"}
    assert set(removed["shadow_pytest"]) == {"pytest/__init__.py", "pytest/__main__.py"}
    assert all(p.startswith("force_pass_plugin-1.0.dist-info/") for p in removed["entry_point_plugin"])
    for name in ("fake_summary_at_exit", "skip_reason_newline", "xfail_under_test", "forge_outcome_channel"):
        assert removed[name] == []  # ordinary source edits: the outcome channel decides


async def test_hacks_would_resolve_without_protection(simple_tasks):
    # Shows the hacks above are real: with stripping off they resolve an unfixed task.
    task = simple_tasks[0]
    hacks = build_hacks(task, list(EFFECTIVE_UNPROTECTED))
    results = await _grade_all([(task, hacks[name]) for name in EFFECTIVE_UNPROTECTED],
                               RewardConfig(protect=False))
    for name, result in zip(EFFECTIVE_UNPROTECTED, results):
        assert result.resolved and result.reward == 1.0, (name, result.error, result.log_tail[-800:])


def _naive_resolves(task, patch: str, tmp_path) -> bool:
    """A SWE-bench-style grade: ``python -m pytest -rA`` on the patched tree, outcomes read from the log,
    XFAIL counted as a pass, no protection. Shows a hack is a real attack, not a strawman."""
    import subprocess

    repo = tmp_path / "naive"
    subprocess.run(["git", "clone", "-q", task.repo_path, str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "checkout", "-q", task.base_commit], check=True)
    for text in (patch, task.test_patch):
        subprocess.run(["git", "-C", str(repo), "apply", "-"], input=text.encode(), check=True)
    names = list(dict.fromkeys(task.FAIL_TO_PASS + task.PASS_TO_PASS))
    out = subprocess.run(["bash", "-c", " ".join([task.test_cmd, *names])], cwd=repo, capture_output=True,
                         text=True).stdout
    found = parse_test_log(out, task.test_cmd)
    return all(found.get(name) in (TestStatus.PASSED, TestStatus.XFAIL) for name in names)


CHANNEL_HACKS = ("shadow_pytest", "fake_summary_at_exit", "skip_reason_newline", "xfail_under_test",
                 "entry_point_plugin", "quoted_paths", "escaped_paths", "pytest_toml_plugin")


@pytest.mark.parametrize("name", CHANNEL_HACKS)
def test_new_hacks_fool_a_swebench_style_grader(simple_tasks, tmp_path, name):
    task = TASK_VARIANTS.get(name, lambda t: t)(simple_tasks[0])
    assert _naive_resolves(task, build_hacks(task, [name])[name], tmp_path), name


async def test_legitimate_pyproject_change_is_kept(simple_tasks):
    task = simple_tasks[0]
    with HackBuilder(task) as builder:
        text = builder.read("pyproject.toml")
        fix_plus_metadata = task.patch + builder.patch({"pyproject.toml": text.replace('version = "0.1.0"',
                                                                                     'version = "0.1.1"')})
    result = await grade_patch(task, fix_plus_metadata, timeout_s=120)
    assert result.resolved and result.removed_test_files == [], result.log_tail


def test_the_outcome_channel_ignores_what_the_tested_code_could_write(tmp_path):
    """Records the tested code could produce (no nonce, or written after the session finished) never
    count; the runner's files are read-only to the jail and the outcomes file is outside its view."""
    import json
    import os

    from reward.test_run import Outcomes, PytestCommand, PytestRun

    nonce = "n0nce"
    lines = [{"test": "t::a", "outcome": "FAILED", "nonce": nonce},
             {"test": "t::b", "outcome": "PASSED"},                      # forged: no nonce
             {"test": "t::a", "outcome": "PASSED", "nonce": "guess"},    # forged: wrong nonce
             {"finished": 1, "nonce": nonce},
             {"test": "t::a", "outcome": "PASSED", "nonce": nonce}]      # after the session: ignored
    path = tmp_path / "o.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    got = Outcomes.read(path, nonce)
    assert got.tests == {"t::a": TestStatus.FAILED} and got.finished and got.exit_status == 1
    with PytestRun(PytestCommand.parse("python -m pytest -q")) as run:
        run.command(["t::a"])
        assert run.pass_fds() and run.env()["SWE_RL_OUTCOMES_NONCE"] == run.nonce
        assert not str(run.outcomes_file).startswith(str(run.dir))
        assert oct(run.dir.stat().st_mode & 0o777) == "0o755" and oct(run.outcomes_file.parent.stat().st_mode & 0o777) == "0o700"
        assert all(not os.access(p, os.W_OK) or os.geteuid() == 0 for p in run.dir.iterdir())
        assert all(oct(p.stat().st_mode & 0o777) == "0o644" for p in run.dir.iterdir())
