"""`--mode swebench`: SWE-bench / SWE-smith / R2E-Gym-style rows -> tasks.jsonl + parquet."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from prepare.swebench_import import swebench_image_name
from core.task import SWETask, load_tasks

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "swebench_rows.jsonl"


def test_converts_rows_and_reports_bad_lines(prepare_cli, tmp_path):
    out = tmp_path / "out"
    proc = prepare_cli("--mode", "swebench", "--input", str(FIXTURE), "--out", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert f"SKIPPED {FIXTURE}:5: missing field(s) base_commit" in proc.stderr
    assert f"SKIPPED {FIXTURE}:6: not valid JSON" in proc.stderr
    assert f"SKIPPED {FIXTURE}:7: duplicate instance_id astropy__astropy-12907" in proc.stderr
    tasks = {t.instance_id: t for t in load_tasks(str(out / "tasks.jsonl"))}
    assert sorted(tasks) == ["astropy__astropy-12907", "pudo__dataset.5c2dc8d3.func_basic__0hyyg2hw", "r2e__orange3-1234"]

    astropy = tasks["astropy__astropy-12907"]
    assert astropy.FAIL_TO_PASS == ["astropy/modeling/tests/test_separable.py::test_separable[compound_model6-result6]"]
    assert astropy.PASS_TO_PASS == ["astropy/modeling/tests/test_separable.py::test_coord_matrix"]
    assert astropy.version == "4.3" and astropy.environment_setup_commit.startswith("298ccb4")
    assert astropy.image_name == "swebench/sweb.eval.x86_64.astropy_1776_astropy-12907:latest"
    assert astropy.test_patch.startswith("diff --git a/astropy/modeling/tests/")
    assert astropy.repo_path is None and astropy.data_source == "swe_bench"
    # SWE-bench's images keep the instance's environment in the conda env "testbed", not on the image's PATH.
    assert astropy.runs_in_image and astropy.env_bin == "/opt/miniconda3/envs/testbed/bin"

    smith = tasks["pudo__dataset.5c2dc8d3.func_basic__0hyyg2hw"]
    assert smith.image_name == "jyangballin/swesmith.x86_64.pudo_1776_dataset.5c2dc8d3"  # the row's own image
    assert smith.env_bin is None  # another image's environment: its own PATH
    r2e = tasks["r2e__orange3-1234"]
    assert (r2e.repo, r2e.base_commit[:6], r2e.image_name) == ("biolab/orange3", "abcdef", "namanjain12/orange3_final:abcdef")
    assert r2e.version == "3.1"

    rows = pq.read_table(out / "train.parquet").to_pylist() + pq.read_table(out / "test.parquet").to_pylist()
    assert len(rows) == 3
    for row in rows:
        task = SWETask.from_extra_info(row["extra_info"])
        assert task == tasks[task.instance_id]
        assert row["data_source"] == "swe_bench" and row["reward_model"]["ground_truth"] == task.patch
        assert row["prompt"][0]["content"] == task.problem_statement


def test_missing_file_and_unreachable_hub_fail_clearly(prepare_cli, tmp_path):
    proc = prepare_cli("--mode", "swebench", "--input", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "no such file" in proc.stderr
    proc = prepare_cli("--mode", "swebench", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "--mode swebench needs --input" in proc.stderr


def test_swebench_image_naming():
    assert swebench_image_name("django__django-11099") == "swebench/sweb.eval.x86_64.django_1776_django-11099:latest"
    assert swebench_image_name("Foo__Bar-1", namespace="x", arch="arm64") == "x/sweb.eval.arm64.foo_1776_bar-1:latest"


def test_hub_dataset_without_hub_access_fails_clearly(tmp_path):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    # Offline mode makes the hub lookup fail at once, as it fails (after retries) without network.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run(
        [sys.executable, str(root / "prepare" / "prepare_data.py"), "--mode", "swebench", "--input",
         "princeton-nlp/SWE-bench_Lite", "--out", str(tmp_path / "o")],
        cwd=root, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "cannot load 'princeton-nlp/SWE-bench_Lite' (split 'test') from the Hugging Face hub" in proc.stderr
    assert "export the rows to a JSONL file" in proc.stderr
