"""The local sandbox: a private copy at the base commit, and nothing left after teardown."""

from __future__ import annotations

import asyncio
import os
import subprocess

import psutil
import pytest

from core.task import SWETask
from core.gitrepo import GIT_ENV
from sandbox.local import LocalSandbox, SandboxError, find_marked_processes


def _git(cwd, *args):
    subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True, env={**os.environ, **GIT_ENV})


@pytest.fixture
def task_repo(tmp_path):
    repo = tmp_path / "task_repo"
    repo.mkdir()
    (repo / "pkg.py").write_text("def add(a, b):\n    return a - b\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "base")
    base = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    # A later commit the sandbox must not show (it is checked out at base_commit).
    (repo / "pkg.py").write_text("def add(a, b):\n    return a + b\n")
    _git(repo, "commit", "-qam", "later")
    return SWETask(instance_id="t-1", repo="local/t", base_commit=base, problem_statement="add subtracts", repo_path=str(repo))


async def test_copy_is_at_base_commit_and_independent(task_repo, tmp_path):
    box = await LocalSandbox.create(task_repo, parent_dir=str(tmp_path / "boxes"))
    try:
        assert (box.workdir / "pkg.py").read_text().endswith("return a - b\n")
        remotes = subprocess.run(["git", "-C", str(box.workdir), "remote"], capture_output=True, text=True).stdout
        assert remotes.strip() == ""
        (box.workdir / "pkg.py").write_text("def add(a, b):\n    return a + b\n")
        (box.workdir / "new_file.py").write_text("X = 1\n")
        (box.workdir / "__pycache__").mkdir()
        (box.workdir / "__pycache__" / "pkg.cpython-311.pyc").write_bytes(b"\x00cache")
        (box.workdir / ".pytest_cache").mkdir()
        (box.workdir / ".pytest_cache" / "README.md").write_text("cache")
        patch = await box.extract_patch()
        assert "+    return a + b" in patch and "new_file.py" in patch
        assert "__pycache__" not in patch and ".pytest_cache" not in patch
        # The task repository itself is untouched.
        status = subprocess.run(["git", "-C", task_repo.repo_path, "status", "--porcelain"], capture_output=True, text=True)
        assert status.stdout == ""
    finally:
        await box.teardown()
    assert not box.root.exists()


async def test_teardown_kills_detached_processes_and_removes_directory(task_repo, tmp_path):
    box = await LocalSandbox.create(task_repo, parent_dir=str(tmp_path / "boxes"))
    env = box.env()
    # One process in a tracked group, one that escaped into its own session (as
    # mini-swe-agent's commands do) and forked a grandchild.
    grouped = subprocess.Popen(["sleep", "300"], env=env, start_new_session=True)
    box.track_process_group(grouped.pid)
    detached = subprocess.Popen(["setsid", "bash", "-c", "sleep 300 & sleep 300"], env=env, cwd=box.workdir)
    await asyncio.sleep(0.3)
    assert len(await asyncio.to_thread(find_marked_processes, box.rollout_id)) >= 3
    await box.teardown()
    grouped.wait(timeout=5)
    detached.wait(timeout=5)
    assert await asyncio.to_thread(find_marked_processes, box.rollout_id) == []
    assert not box.root.exists()
    await box.teardown()  # idempotent


async def test_teardown_runs_when_the_rollout_is_cancelled(task_repo, tmp_path):
    boxes = tmp_path / "boxes"
    started = asyncio.Event()
    holder: dict[str, LocalSandbox] = {}

    async def rollout():
        box = await LocalSandbox.create(task_repo, parent_dir=str(boxes))
        holder["box"] = box
        try:
            proc = subprocess.Popen(["sleep", "300"], env=box.env(), start_new_session=True)
            holder["pid"] = proc.pid
            started.set()
            await asyncio.sleep(300)
        finally:
            await box.teardown()

    job = asyncio.create_task(rollout())
    await started.wait()
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    assert not holder["box"].root.exists()
    # Killed (and reaped by the teardown, it being our child), not left running.
    assert not psutil.pid_exists(holder["pid"])
    assert list(boxes.iterdir()) == []


async def test_missing_repo_is_a_sandbox_error_and_leaves_nothing(tmp_path):
    boxes = tmp_path / "boxes"
    task = SWETask(instance_id="gone", repo="x/y", base_commit="abc", problem_statement="p", repo_path=str(tmp_path / "nope"))
    with pytest.raises(SandboxError, match="gone"):
        await LocalSandbox.create(task, parent_dir=str(boxes))
    assert list(boxes.iterdir()) == []


async def test_unknown_commit_is_a_sandbox_error(task_repo, tmp_path):
    boxes = tmp_path / "boxes"
    bad = task_repo.model_copy(update={"base_commit": "0" * 40})
    with pytest.raises(SandboxError):
        await LocalSandbox.create(bad, parent_dir=str(boxes))
    assert list(boxes.iterdir()) == []


async def test_a_dead_workers_prepared_checkouts_go_to_the_reaper(task_repo, tmp_path):
    """A worker killed before closing its prepared checkouts (core.pristine) leaves their store; the
    start-up reaper removes it once its owner is dead, and leaves a live worker's alone."""
    import json

    from core.pristine import PristineTrees
    from core.trees import STORE_OWNER_FILE
    from sandbox.local import reap_stale_sandboxes

    parent = tmp_path / "stores"
    parent.mkdir()
    live, dead = PristineTrees(work_root=str(parent)), PristineTrees(work_root=str(parent))
    try:
        for trees in (live, dead):
            held = await trees.hold_checkout(task_repo.repo_path, task_repo.base_commit)
            held.release()
        dead_store = dead._root
        (dead_store / STORE_OWNER_FILE).write_text(json.dumps({"pid": 2 ** 22 + 7, "create_time": 0}))
        assert reap_stale_sandboxes(parent) == []  # no sandbox there; the stores are reaped besides
        assert not dead_store.exists() and live._root.exists()
    finally:
        live.close()
        dead.close()
