"""End-to-end checks of `prepare_data.py --mode simple` output (real git, real pytest)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import datasets
import pyarrow.parquet as pq
from unidiff import PatchSet

from prepare.export import parquet_schema
from prepare.simple_tasks import bug_kinds
from core.task import DEFAULT_TEST_CMD, SWETask, load_tasks
from reward.grading import grade_patch

ROOT = Path(__file__).resolve().parents[2]


def _git(repo: str | Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=check)


def test_cli_writes_outputs_and_summary(generated):
    n = generated.num_tasks
    lines = generated.stdout.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"{n} tasks (0 dropped; {n} kinds:")
    assert "validating tasks" in generated.stderr  # tqdm progress bar
    for name in ("tasks.jsonl", "train.parquet", "test.parquet", "dropped.jsonl"):
        assert (generated.out / name).is_file()
    assert (generated.out / "dropped.jsonl").read_text() == ""
    assert sorted(p.name for p in (generated.out / "repos").iterdir()) == sorted(
        t.instance_id for t in generated.tasks
    )


def test_generation_is_deterministic(generated, generate_dataset, tmp_path):
    again = generate_dataset(tmp_path / "out")
    first = (generated.out / "tasks.jsonl").read_text()
    second = (again.out / "tasks.jsonl").read_text()
    # Only repo_path (absolute, under --out) may differ between output directories.
    assert second.replace(str(again.out), str(generated.out)) == first
    assert [t.base_commit for t in again.tasks] == [t.base_commit for t in generated.tasks]
    for task in again.tasks:
        assert _git(task.repo_path, "rev-parse", "HEAD").stdout.strip() == task.base_commit


def test_covers_at_least_eight_bug_kinds(generated):
    assert len(bug_kinds()) >= 8
    assert len({t.bug_kind for t in generated.tasks}) >= 8


def test_task_records(generated):
    ids = [t.instance_id for t in generated.tasks]
    assert len(set(ids)) == len(ids)
    for task in generated.tasks:
        pkg = task.repo.split("/", 1)[1]
        assert re.fullmatch(rf"simple__{pkg}-\d+", task.instance_id)
        assert task.repo == f"swe-simple/{pkg}" and task.data_source == "swe_simple"
        assert task.test_cmd == DEFAULT_TEST_CMD and task.bug_kind
        assert task.repo_path and os.path.isabs(task.repo_path) and Path(task.repo_path, ".git").is_dir()
        hidden_files = [f.path for f in PatchSet(task.test_patch)]
        fix_files = [f.path for f in PatchSet(task.patch)]
        assert hidden_files and all(p.startswith("tests/") for p in hidden_files)
        assert fix_files and not any(p.startswith("tests/") for p in fix_files)
        assert task.FAIL_TO_PASS and all(name.split("::")[0] in hidden_files for name in task.FAIL_TO_PASS)
        assert any(name.split("::")[0] not in hidden_files for name in task.PASS_TO_PASS)  # visible tests
        # The issue describes the symptom; it never quotes the fix.
        lines = task.patch.splitlines()
        added = [line[1:].strip() for line in lines if line.startswith("+") and not line.startswith("+++")]
        assert added and not any(line in task.problem_statement for line in added)
        assert "```python" in task.problem_statement and f"from {pkg} import" in task.problem_statement


async def test_reference_resolves_and_empty_patch_does_not(generated):
    semaphore = asyncio.Semaphore(4)

    async def grade(task: SWETask, patch: str):
        async with semaphore:
            return await grade_patch(task, patch, timeout_s=120)

    tasks = generated.tasks
    results = await asyncio.gather(*(grade(t, t.patch) for t in tasks), *(grade(t, "") for t in tasks))
    for task, ref, empty in zip(tasks, results[: len(tasks)], results[len(tasks) :]):
        assert ref.resolved and ref.error is None, (task.instance_id, ref.tests, ref.log_tail)
        assert not empty.resolved and empty.error is None, (task.instance_id, empty.log_tail)
        assert sorted(empty.tests["FAIL_TO_PASS"]["failure"]) == sorted(task.FAIL_TO_PASS)
        assert sorted(empty.tests["PASS_TO_PASS"]["success"]) == sorted(task.PASS_TO_PASS)


def test_fix_and_hidden_tests_absent_from_repo_and_history(generated, tmp_path):
    for task in generated.tasks:
        repo = task.repo_path
        assert _git(repo, "rev-list", "--all", "--count").stdout.strip() == "1"
        hidden = [f.path for f in PatchSet(task.test_patch)]
        tracked = _git(repo, "ls-tree", "-r", "--name-only", "HEAD").stdout.split()
        history = _git(repo, "log", "--all", "--name-only", "--format=").stdout.split()
        for path in hidden:
            assert path not in tracked and path not in history and not Path(repo, path).exists()
        # Not even as an unreachable object: build the fixed tree elsewhere and look its blobs up.
        copy = tmp_path / task.instance_id
        subprocess.run(["git", "clone", "-q", repo, str(copy)], check=True)
        (tmp_path / "all.patch").write_text(task.patch + task.test_patch)
        _git(copy, "apply", str(tmp_path / "all.patch"))
        for path in hidden + [f.path for f in PatchSet(task.patch)]:
            blob = _git(copy, "hash-object", path).stdout.strip()
            assert _git(repo, "cat-file", "-e", blob, check=False).returncode != 0, (task.instance_id, path)


def test_parquet_schema_and_round_trip(generated, tmp_path):
    by_id = {t.instance_id: t for t in generated.tasks}
    seen: dict[str, str] = {}
    for split in ("train", "test"):
        path = generated.out / f"{split}.parquet"
        assert pq.read_schema(path).remove_metadata() == parquet_schema()
        ds = datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=str(tmp_path))
        assert set(ds.column_names) == {"data_source", "prompt", "ability", "agent_name", "reward_model", "extra_info"}
        for row in ds:
            task = SWETask.from_extra_info(row["extra_info"])
            assert task == by_id[task.instance_id]
            assert row["data_source"] == "swe_simple"
            assert row["prompt"] == [{"role": "user", "content": task.problem_statement}]
            assert row["ability"] == "software_engineering" and row["agent_name"] == "swe_agent"
            assert row["reward_model"] == {"style": "rule", "ground_truth": task.patch}
            assert row["extra_info"]["split"] == split
            index = int(row["extra_info"]["index"])
            assert generated.tasks[index].instance_id == task.instance_id
            assert task.instance_id not in seen
            seen[task.instance_id] = split
    assert set(seen) == set(by_id)
    assert list(seen.values()).count("test") == round(generated.num_tasks * 0.25)


def test_validate_drops_and_reports_bad_tasks(generated, prepare_cli, tmp_path):
    good, no_fix, bad_f2p = generated.tasks[:3]
    no_fix = no_fix.model_copy(update={"patch": ""})  # reference patch no longer fixes anything
    visible = next(n for n in bad_f2p.PASS_TO_PASS if "_hidden" not in n)
    bad_f2p = bad_f2p.model_copy(update={"FAIL_TO_PASS": bad_f2p.FAIL_TO_PASS + [visible]})
    out = tmp_path / "recheck"
    out.mkdir()
    (out / "tasks.jsonl").write_text("".join(t.model_dump_json() + "\n" for t in (good, no_fix, bad_f2p)))

    proc = prepare_cli("--validate", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert f"DROPPED {no_fix.instance_id}: reference patch does not resolve the task" in proc.stderr
    assert f"DROPPED {bad_f2p.instance_id}: FAIL_TO_PASS tests already pass at base_commit: {visible}" in proc.stderr
    assert proc.stdout.startswith("1 tasks (2 dropped;")
    assert [t.instance_id for t in load_tasks(str(out / "tasks.jsonl"))] == [good.instance_id]
    dropped = [json.loads(line) for line in (out / "dropped.jsonl").read_text().splitlines()]
    assert [d["instance_id"] for d in dropped] == [no_fix.instance_id, bad_f2p.instance_id]
    rows = pq.read_table(out / "train.parquet").num_rows + pq.read_table(out / "test.parquet").num_rows
    assert rows == 1
    assert Path(no_fix.repo_path).is_dir()  # --validate never deletes repositories


def test_runs_as_module_and_rejects_unknown_mode(prepare_cli):
    proc = subprocess.run(
        [sys.executable, "-m", "prepare.prepare_data", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0 and "--mode" in proc.stdout and "--validate" in proc.stdout
    proc = prepare_cli("--mode", "nonsense")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
