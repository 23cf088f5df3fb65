"""Shared fixtures: a small set of generated tasks and the tiny local model, built once per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# mini-swe-agent and litellm must never reach the network or a first-run wizard in tests.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("MSWEA_CONFIGURED", "true")
os.environ.setdefault("MSWEA_SILENT_STARTUP", "1")


@pytest.fixture(scope="session")
def simple_tasks_dir(tmp_path_factory) -> Path:
    """``prepare_data.py --mode simple`` output with 8 tasks (one per bug kind at least)."""
    out = tmp_path_factory.mktemp("simple_tasks")
    subprocess.run(
        [sys.executable, str(ROOT / "prepare" / "prepare_data.py"), "--mode", "simple", "--out", str(out),
         "--num-tasks", "8", "--seed", "0"],
        check=True, cwd=ROOT, capture_output=True,
    )
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2 model + ChatML tokenizer built locally (no hub)."""
    from prepare.tiny_model import build_tiny_model

    return Path(build_tiny_model(tmp_path_factory.mktemp("tiny_model"), seed=0))


@pytest.fixture(scope="session")
def simple_image_tasks_dir(simple_tasks_dir, tmp_path_factory) -> Path:
    """The simple tasks as image tasks (``python -m prepare.images``: one image, validated in containers).

    Needs a Docker engine and the base image; request it only from ``docker``-marked tests.
    """
    out = tmp_path_factory.mktemp("simple_image_tasks")
    done = subprocess.run(
        [sys.executable, "-m", "prepare.images", "--tasks-dir", str(simple_tasks_dir), "--out", str(out),
         "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def smith_tasks_dir(tmp_path_factory) -> Path:
    """``prepare_data.py --mode smith`` over the fixture package tests/prepare/fixtures/smith_pkg
    (tinycalc): up to 3 mined, validated tasks."""
    import json

    tmp = tmp_path_factory.mktemp("smith_tasks")
    packages = tmp / "packages.yaml"
    packages.write_text(json.dumps({"packages": [{
        "name": "tinycalc", "version": "0.1.0", "test_paths": ["tests"],
        "local_path": str(ROOT / "tests" / "prepare" / "fixtures" / "smith_pkg"),
        "isolated_env": False, "install_deps": False}]}))
    out = tmp / "out"
    done = subprocess.run(
        [sys.executable, str(ROOT / "prepare" / "prepare_data.py"), "--mode", "smith", "--packages-file",
         str(packages), "--out", str(out), "--seed", "0", "--max-tasks-per-package", "3",
         "--max-candidates-per-package", "8", "--task-timeout", "20", "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out
