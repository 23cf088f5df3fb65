"""Done-when checks on every `prepare_data.py --mode simple` task: the reference patch
resolves, the empty patch does not, and reward-hacking patches score 0."""

from __future__ import annotations

import asyncio

import pytest

from reward.hacks import EFFECTIVE_UNPROTECTED, HackBuilder, build_hacks

from prepare.task import load_tasks
from reward.config import RewardConfig
from reward.grading import grade_patch
from reward.isolation import NetworkPolicy

# Grades in flight at once (the machine has 2 cores).
CONCURRENCY = 2


@pytest.fixture(scope="module")
def simple_tasks(simple_tasks_dir):
    tasks = load_tasks(str(simple_tasks_dir / "tasks.jsonl"))
    assert len(tasks) == 8
    return tasks


async def _grade_all(jobs, config: RewardConfig):
    semaphore = asyncio.Semaphore(CONCURRENCY)
    network = NetworkPolicy(config.network)

    async def one(task, patch):
        async with semaphore:
            return await grade_patch(task, patch, config=config, network=network, timeout_s=120)

    return await asyncio.gather(*(one(task, patch) for task, patch in jobs))


async def test_reference_resolves_empty_and_hacks_score_zero(simple_tasks):
    jobs, labels = [], []
    for task in simple_tasks:
        for name, patch in [("reference", task.patch), ("empty", "")] + list(build_hacks(task).items()):
            jobs.append((task, patch))
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
    assert removed["atexit_fake_results"] == []  # an ordinary source edit; the log parser ignores its output


async def test_hacks_would_resolve_without_protection(simple_tasks):
    # Shows the hacks above are real: with stripping off they resolve an unfixed task.
    task = simple_tasks[0]
    hacks = build_hacks(task, list(EFFECTIVE_UNPROTECTED))
    results = await _grade_all([(task, hacks[name]) for name in EFFECTIVE_UNPROTECTED],
                               RewardConfig(protect=False))
    for name, result in zip(EFFECTIVE_UNPROTECTED, results):
        assert result.resolved and result.reward == 1.0, (name, result.error, result.log_tail[-800:])


async def test_legitimate_pyproject_change_is_kept(simple_tasks):
    task = simple_tasks[0]
    with HackBuilder(task) as builder:
        text = builder.read("pyproject.toml")
        fix_plus_metadata = task.patch + builder.patch({"pyproject.toml": text.replace('version = "0.1.0"',
                                                                                     'version = "0.1.1"')})
    result = await grade_patch(task, fix_plus_metadata, timeout_s=120)
    assert result.resolved and result.removed_test_files == [], result.log_tail
