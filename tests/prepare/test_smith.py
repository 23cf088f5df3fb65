"""`--mode smith` on a tiny local package (no network): flaky exclusion, hangs, task records,
resumption, bad packages, `--validate`; plus one PyPI check that skips without network.

The fixture package (tests/prepare/fixtures/smith_pkg) runs its tests with this
project's interpreter (``isolated_env: false``), so nothing is installed; every
test run, git command and grade is real.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from unidiff import PatchSet

from prepare.mutations import find_mutations
from prepare.smith import Candidate, _try_mutation, judge_mutation, stable_and_flaky
from prepare.smith_env import PackageEnv, fresh_work_copy, unpack
from prepare.smith_packages import DEFAULT_PACKAGES_FILE, PackageSpec, load_packages
from core.task import load_tasks
from reward.test_log import TestStatus

HERE = Path(__file__).resolve().parent
FIXTURE = HERE / "fixtures" / "smith_pkg"
MAX_TASKS = 4
MAX_CANDIDATES = 10


def _spec(**overrides) -> PackageSpec:
    values = dict(
        name="tinycalc", version="0.1.0", test_paths=["tests"], local_path=str(FIXTURE), isolated_env=False,
        install_deps=False,
    )
    values.update(overrides)
    return PackageSpec(**values)


def _packages_file(tmp: Path, *specs: dict) -> Path:
    path = tmp / "packages.yaml"
    path.write_text(json.dumps({"packages": list(specs)}))  # JSON is YAML
    return path


def _fixture_entry(**overrides) -> dict:
    entry = {
        "name": "tinycalc", "version": "0.1.0", "test_paths": ["tests"], "local_path": str(FIXTURE),
        "isolated_env": False, "install_deps": False,
    }
    entry.update(overrides)
    return entry


@pytest.fixture(scope="module")
def smith_run(tmp_path_factory, prepare_cli):
    """One CLI run over the fixture package plus a package whose sdist ships no tests."""
    tmp = tmp_path_factory.mktemp("smith")
    no_tests = tmp / "notests"
    shutil.copytree(FIXTURE, no_tests, ignore=shutil.ignore_patterns("tests"))
    packages = _packages_file(tmp, _fixture_entry(), _fixture_entry(name="notests", import_name="tinycalc", local_path=str(no_tests)))
    out = tmp / "out"
    args = ["--mode", "smith", "--packages-file", str(packages), "--out", str(out), "--seed", "0",
            "--max-tasks-per-package", str(MAX_TASKS), "--max-candidates-per-package", str(MAX_CANDIDATES),
            "--task-timeout", "20", "--no-progress"]
    proc = prepare_cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"out": out, "proc": proc, "args": args, "packages": packages}


def test_cli_writes_validated_smith_tasks(smith_run):
    out, proc = smith_run["out"], smith_run["proc"]
    tasks = load_tasks(str(out / "tasks.jsonl"))
    assert 1 <= len(tasks) <= MAX_TASKS
    assert proc.stdout.startswith(f"{len(tasks)} tasks (0 dropped;")
    rows = pq.read_table(out / "train.parquet").to_pylist() + pq.read_table(out / "test.parquet").to_pylist()
    assert len(rows) == len(tasks) and {r["data_source"] for r in rows} == {"swe_smith"}
    for task in tasks:
        assert task.data_source == "swe_smith" and task.repo == "pypi/tinycalc" and task.bug_kind
        assert task.instance_id.startswith("smith__tinycalc-") and task.bug_kind not in task.instance_id
        assert task.FAIL_TO_PASS and not set(task.FAIL_TO_PASS) & set(task.PASS_TO_PASS)
        assert task.test_patch == "" and "--rootdir=." in task.test_cmd
        # The fix touches one source file, never a test file.
        assert [f.path for f in PatchSet(task.patch)] == ["tinycalc/__init__.py"]
        # Issue text: names the failing tests, never quotes the fix.
        assert task.FAIL_TO_PASS[0] in task.problem_statement
        fixed = [l[1:].strip() for l in task.patch.splitlines() if l.startswith("+") and not l.startswith("+++")]
        assert not any(len(l) >= 8 and l in task.problem_statement for l in fixed)


def test_repository_history_holds_only_the_bug(smith_run, tmp_path):
    for task in load_tasks(str(smith_run["out"] / "tasks.jsonl")):
        repo = task.repo_path
        git = lambda *a: subprocess.run(["git", "-C", repo, *a], capture_output=True, text=True)  # noqa: E731
        assert git("rev-list", "--all", "--count").stdout.strip() == "1"
        assert git("rev-parse", "HEAD").stdout.strip() == task.base_commit
        # The fixed file's blob is nowhere in the object store.
        copy = tmp_path / task.instance_id
        subprocess.run(["git", "clone", "-q", repo, str(copy)], check=True)
        (tmp_path / "fix.patch").write_text(task.patch)
        subprocess.run(["git", "-C", str(copy), "apply", str(tmp_path / "fix.patch")], check=True)
        blob = subprocess.run(["git", "-C", str(copy), "hash-object", "tinycalc/__init__.py"], capture_output=True, text=True).stdout.strip()
        assert git("cat-file", "-e", blob).returncode != 0


def test_flaky_test_is_excluded(smith_run):
    baseline = json.loads((smith_run["out"] / "packages" / "tinycalc" / "baseline.json").read_text())
    flaky = "tests/test_tinycalc.py::test_flaky"
    assert baseline["flaky"] == [flaky] and flaky not in baseline["stable"]
    for task in load_tasks(str(smith_run["out"] / "tasks.jsonl")):
        assert flaky not in task.FAIL_TO_PASS + task.PASS_TO_PASS


def test_package_without_tests_is_reported_and_skipped(smith_run):
    stderr = smith_run["proc"].stderr
    assert "SKIPPED package notests: unpack: the sdist ships no tests at ['tests']" in stderr
    reports = [json.loads(l) for l in (smith_run["out"] / "smith_report.jsonl").read_text().splitlines()]
    assert [(r["name"], r["ok"], r["stage"]) for r in reports] == [("tinycalc", True, ""), ("notests", False, "unpack")]


def test_rerun_resumes_without_redoing_work(smith_run, prepare_cli):
    out = smith_run["out"]
    state = out / "packages" / "tinycalc" / "state.jsonl"
    before_state, before_tasks = state.read_text(), (out / "tasks.jsonl").read_text()
    proc = prepare_cli(*smith_run["args"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert state.read_text() == before_state  # every mutation and validation was already decided
    assert (out / "tasks.jsonl").read_text() == before_tasks

    # A larger budget continues where the first run stopped: old decisions are not redone.
    args = list(smith_run["args"])
    args[args.index("--max-candidates-per-package") + 1] = str(MAX_CANDIDATES + 4)
    args[args.index("--max-tasks-per-package") + 1] = str(MAX_TASKS + 4)
    proc = prepare_cli(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    after = state.read_text()
    assert after.startswith(before_state) and len(after) > len(before_state)
    decided = [json.loads(l)["key"] for l in after.splitlines() if "event" not in json.loads(l)]
    assert len(decided) == len(set(decided))


def test_validate_prints_per_package_table(smith_run, prepare_cli):
    proc = prepare_cli("--validate", str(smith_run["out"]), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    n = len(load_tasks(str(smith_run["out"] / "tasks.jsonl")))
    assert "package" in proc.stderr and "valid%" in proc.stderr
    row = next(l for l in proc.stderr.splitlines() if l.startswith("pypi/tinycalc"))
    assert row.split()[1:5] == [str(n), str(n), "0", "100.0"]


def test_hanging_mutation_is_killed_and_dropped(tmp_path):
    pkg = PackageEnv(_spec(), tmp_path / "pkg")
    unpack(FIXTURE, pkg.clean)
    fresh_work_copy(pkg)
    source = (pkg.clean / "tinycalc" / "__init__.py").read_text()
    hang = next(m for m in find_mutations(source, "tinycalc/__init__.py") if m.kind == "remove_statement" and "i += 1" in m.description)
    verdict = asyncio.run(_try_mutation(pkg, Candidate(hang, ["tests/test_tinycalc.py::test_count_up"]), [], 3.0))
    assert not verdict.kept and verdict.reason == "hang: killed after 3 s"
    assert (pkg.work / "tinycalc" / "__init__.py").read_text() == source  # the mutation was undone


def test_judge_mutation_rules():
    passed, failed = TestStatus.PASSED, TestStatus.FAILED
    scope = ["t.py::a", "t.py::b"]
    kept = judge_mutation({"t.py::a": failed, "t.py::b": passed}, scope, timed_out=False, returncode=1, timeout_s=5)
    assert kept.kept and kept.fail_to_pass == ["t.py::a"] and kept.pass_to_pass == ["t.py::b"]
    assert judge_mutation({"t.py::a": passed, "t.py::b": passed}, scope, timed_out=False, returncode=0, timeout_s=5).reason == "no test fails"
    assert judge_mutation({"t.py": TestStatus.ERROR}, scope, timed_out=False, returncode=2, timeout_s=5).reason == "collection error"
    assert judge_mutation({}, scope, timed_out=True, returncode=-9, timeout_s=5).reason == "hang: killed after 5 s"


def test_stable_and_flaky():
    p, f = TestStatus.PASSED, TestStatus.FAILED
    stable, flaky = stable_and_flaky({"a": p, "b": p, "c": f, "d": p}, {"a": p, "b": f, "c": f})
    assert stable == ["a"] and flaky == ["b", "d"]


def test_default_package_list_loads_and_filters():
    specs = load_packages(DEFAULT_PACKAGES_FILE)
    assert len(specs) >= 12 and all(s.version and s.test_paths for s in specs)
    assert [s.name for s in load_packages(DEFAULT_PACKAGES_FILE, ["six", "toolz"])] == ["toolz", "six"]
    with pytest.raises(ValueError, match="unknown package"):
        load_packages(DEFAULT_PACKAGES_FILE, ["no-such-package"])


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=3).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _pypi_reachable(), reason="PyPI is not reachable")
def test_pypi_sdist_of_a_default_package_ships_its_tests(tmp_path):
    spec = load_packages(DEFAULT_PACKAGES_FILE, ["inflection"])[0]
    pkg = PackageEnv(spec, tmp_path / "pkg")
    from prepare.smith_env import check_tests_shipped, download_sdist

    archive = asyncio.run(download_sdist(spec, pkg.root / "dist"))
    unpack(archive, pkg.clean)
    check_tests_shipped(pkg)  # raises PackageError when the tests are missing
    assert (pkg.clean / "inflection" / "__init__.py").is_file()
