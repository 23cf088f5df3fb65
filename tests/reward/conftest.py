"""A tiny hand-made task repository (real git) for the grader tests."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from core.task import SWETask

BUGGY = """\
def add_all(values):
    \"\"\"Sum of all values.\"\"\"
    total = 0
    for value in values[1:]:
        total += value
    return total
"""

FIXED = BUGGY.replace("values[1:]", "values")

VISIBLE_TESTS = """\
from calc import add_all


def test_empty():
    assert add_all([]) == 0


def test_single_zero():
    assert add_all([0]) == 0
"""

HIDDEN_TESTS = """\
from calc import add_all


def test_sum():
    assert add_all([1, 2, 3]) == 6


def test_single():
    assert add_all([5]) == 5
"""

GIT_ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@localhost",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@localhost",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
}


def run_git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True, env=GIT_ENV
    ).stdout


def worktree_diff(repo: Path, path: str, content: str) -> str:
    """``git diff`` after writing ``content`` to ``path``; the file is restored afterwards."""
    target = repo / path
    original = target.read_text() if target.exists() else None
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(content)
    try:
        if original is None:
            run_git(repo, "add", "-N", path)  # intent-to-add writes no object
        return run_git(repo, "diff")
    finally:
        if original is None:
            run_git(repo, "rm", "-q", "--cached", path)
            target.unlink()
        else:
            target.write_text(original)


@pytest.fixture(scope="session")
def calc_task(tmp_path_factory) -> SWETask:
    """Task ``calc-1``: ``add_all`` skips the first value; two hidden tests catch it."""
    repo = tmp_path_factory.mktemp("calc_repo") / "calc"
    (repo / "calc").mkdir(parents=True)
    (repo / "tests").mkdir()
    (repo / "calc" / "__init__.py").write_text("from calc.ops import add_all\n")
    (repo / "calc" / "ops.py").write_text(BUGGY)
    (repo / "tests" / "test_ops.py").write_text(VISIBLE_TESTS)
    (repo / "pyproject.toml").write_text('[tool.pytest.ini_options]\npythonpath = ["."]\n')
    run_git(repo, "init", "-q", "-b", "main")
    run_git(repo, "add", "-A")
    run_git(repo, "commit", "-q", "-m", "init")
    base = run_git(repo, "rev-parse", "HEAD").strip()
    patch = worktree_diff(repo, "calc/ops.py", FIXED)
    test_patch = worktree_diff(repo, "tests/test_ops_hidden.py", HIDDEN_TESTS)
    assert run_git(repo, "status", "--porcelain") == ""
    return SWETask(
        instance_id="calc-1",
        repo="local/calc",
        base_commit=base,
        problem_statement="add_all([1, 2, 3]) returns 5 instead of 6",
        patch=patch,
        test_patch=test_patch,
        FAIL_TO_PASS=["tests/test_ops_hidden.py::test_sum", "tests/test_ops_hidden.py::test_single"],
        PASS_TO_PASS=["tests/test_ops.py::test_empty", "tests/test_ops.py::test_single_zero"],
        repo_path=str(repo),
        data_source="unit_test",
    )
