"""One real `prepare_data.py --mode simple` run per test session, shared by the prepare tests."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from core.task import SWETask, load_tasks

ROOT = Path(__file__).resolve().parents[2]
# Kinds are dealt round-robin, so 8 tasks have 8 distinct bug kinds; fewer runs keep the suite fast.
NUM_TASKS = 8
SEED = 0


@dataclass
class PrepareRun:
    """A finished CLI run: its output directory, streams and the tasks it wrote."""

    out: Path
    num_tasks: int
    returncode: int
    stdout: str
    stderr: str
    tasks: list[SWETask]


def run_prepare(*args: str) -> subprocess.CompletedProcess[str]:
    """``python prepare/prepare_data.py ARGS`` from the repository root, as a user runs it."""
    return subprocess.run(
        [sys.executable, str(ROOT / "prepare" / "prepare_data.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def generate(out: Path) -> PrepareRun:
    proc = run_prepare("--mode", "simple", "--out", str(out), "--seed", str(SEED), "--num-tasks", str(NUM_TASKS))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return PrepareRun(out, NUM_TASKS, proc.returncode, proc.stdout, proc.stderr, load_tasks(str(out / "tasks.jsonl")))


@pytest.fixture(scope="session")
def generated(tmp_path_factory) -> PrepareRun:
    """The session's generated dataset (seed 0, NUM_TASKS tasks)."""
    return generate(tmp_path_factory.mktemp("simple") / "out")


# Helpers as fixtures: test modules cannot import this conftest by name reliably
# (several conftest.py files sit on sys.path in pytest's default import mode).
@pytest.fixture(scope="session")
def prepare_cli():
    """``run_prepare`` (run the CLI with arguments)."""
    return run_prepare


@pytest.fixture(scope="session")
def generate_dataset():
    """``generate(out)``: a fresh CLI run with the session's arguments into ``out``."""
    return generate

# tests/prepare/fixtures/ holds packages that the smith-mode tests mine for bugs; their
# own tests run inside those runs, never as part of this suite.
collect_ignore_glob = ["fixtures/*"]
