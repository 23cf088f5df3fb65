"""Forked work trees (``sandbox.overlay``): sandboxes of one task start from one prepared checkout
through overlay mounts, nothing copied, and behave as copies do -- the policy's writes stay in its
sandbox, the prepared tree never changes, the patch is exactly the change, nothing stays mounted.

Real mounts on the real kernel: skipped where this process cannot mount overlays (not root).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from core.gitrepo import GIT_ENV
from core.pristine import PristineTrees
from core.process import run_command
from core.task import SWETask
from sandbox.jail import JailSpec
from sandbox.local import OWNER_FILE, LocalSandbox, reap_stale_sandboxes
from sandbox.overlay import mounts_below, overlay_available

pytestmark = pytest.mark.skipif(not overlay_available(), reason="overlay mounts need root here")


def _git(cwd, *args):
    subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True, env={**os.environ, **GIT_ENV})


def make_task(root: Path, name: str) -> SWETask:
    repo = root / name
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "calc.py").write_text("def add(a, b):\n    return a - b\n")
    (repo / "README.md").write_text("calc\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "base")
    base = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    return SWETask(instance_id=name, repo="local/" + name, base_commit=base, problem_statement="p",
                   repo_path=str(repo))


def tree_digest(path: Path) -> str:
    """Every file's path, mode, owner and bytes under ``path``."""
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        st = f.lstat()
        h.update(f"{f.relative_to(path)} {st.st_mode} {st.st_uid}".encode())
        if f.is_file() and not f.is_symlink():
            h.update(f.read_bytes())
    return h.hexdigest()


async def jailed(box: LocalSandbox, command: str):
    return await run_command(box.wrap_command(command), env=box.env(), timeout_s=60)


@pytest.fixture
def trees():
    store = PristineTrees(max_trees=1)
    yield store
    store.close()


async def test_forked_sandboxes_share_a_tree_that_never_changes(tmp_path, trees):
    task = make_task(tmp_path, "calc")
    parent = tmp_path / "boxes"
    jail = JailSpec(uid=200000, gid=200000)
    first = await LocalSandbox.create(task, parent_dir=str(parent), isolation="auto", jail=jail, trees=trees,
                                      work_tree="overlay")
    second = await LocalSandbox.create(task, parent_dir=str(parent), isolation="auto", jail=jail, trees=trees,
                                       work_tree="overlay")
    clone = await LocalSandbox.create(task, parent_dir=str(parent), isolation="auto", jail=jail)
    try:
        assert mounts_below(first.root) == [first.workdir] and mounts_below(second.root) == [second.workdir]
        prepared = first._held_tree.path
        before = tree_digest(prepared)
        edit = ("sed -i 's/a - b/a + b/' pkg/calc.py && echo new > pkg/new.py && rm README.md "
                "&& mkdir -p docs && echo x > docs/notes.txt && git add -A && git -c user.name=a -c user.email=a@b "
                "commit -qm mine && echo more >> pkg/calc.py")
        for box in (first, clone):
            done = await jailed(box, edit)
            assert done.returncode == 0, done.output
        # The same edits give the same patch on a forked tree as on a cloned one.
        assert await first.extract_patch() == await clone.extract_patch() != ""
        assert "+    return a + b" in await first.extract_patch()
        # The other fork and the prepared tree saw none of it.
        assert (second.workdir / "pkg" / "calc.py").read_text().endswith("return a - b\n")
        assert (second.workdir / "README.md").exists() and not (second.workdir / "pkg" / "new.py").exists()
        assert await second.extract_patch() == ""
        assert tree_digest(prepared) == before
        # The jail's uid owns the forked tree, as it owns a copy.
        assert (second.workdir / "pkg" / "calc.py").stat().st_uid == second.jail.uid
    finally:
        for box in (first, second, clone):
            await box.teardown()
    assert mounts_below(parent) == [] and list(parent.iterdir()) == []


async def test_the_policy_cannot_reach_the_layers(tmp_path, trees):
    task = make_task(tmp_path, "calc")
    box = await LocalSandbox.create(task, parent_dir=str(tmp_path / "boxes"), isolation="bwrap",
                                    jail=JailSpec(uid=200000, gid=200000), trees=trees, work_tree="overlay")
    try:
        prepared = box._held_tree.path
        lower = prepared / "pkg" / "calc.py"
        # It may learn where the layers are (mount options) but cannot open them...
        probe = await jailed(box, f"cat {lower} 2>&1; ls {box.root / 'layers'} 2>&1; echo pwned > {lower} 2>&1; true")
        assert "return a - b" not in probe.output and "upper" not in probe.output
        # ...nor steer overlayfs through its extended attributes.
        attr = await jailed(box, "python3 -c \"import os; os.setxattr('pkg/calc.py', 'trusted.overlay.redirect', "
                                 "b'/etc/shadow')\" 2>&1; echo rc=$?")
        assert "rc=1" in attr.output, attr.output
        assert lower.read_text() == "def add(a, b):\n    return a - b\n"
    finally:
        await box.teardown()


async def test_a_held_tree_is_not_evicted_and_a_dead_runs_mount_is_reaped(tmp_path, trees):
    parent = tmp_path / "boxes"
    one, two = make_task(tmp_path, "one"), make_task(tmp_path, "two")
    box = await LocalSandbox.create(one, parent_dir=str(parent), trees=trees, work_tree="overlay")
    other = await LocalSandbox.create(two, parent_dir=str(parent), trees=trees, work_tree="overlay")
    try:
        # max_trees=1, two trees in use: neither may go while mounted.
        assert box._held_tree.path.exists() and other._held_tree.path.exists()
        assert (box.workdir / "pkg" / "calc.py").exists()
        # A run killed before its teardown: its owner is gone, its overlay still mounted.
        (box.root / OWNER_FILE).write_text(json.dumps({"pid": 2 ** 22 + 7, "create_time": 0, "rollout_id": "x" * 32}))
        removed = reap_stale_sandboxes(parent)
        assert removed == [box.root] and mounts_below(box.root) == [] and not box.root.exists()
        assert (other.workdir / "pkg" / "calc.py").exists(), "a live sandbox is left alone"
    finally:
        await box.teardown()
        await other.teardown()
    assert mounts_below(parent) == []
