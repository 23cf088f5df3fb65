"""Grades on forked trees (``RewardConfig.work_tree=auto``): a GRPO group's grades start from one
prepared checkout through overlay mounts (``sandbox.overlay``), score exactly as on copies, never
change the checkout, and leave nothing mounted. Real mounts: skipped where overlays cannot be
mounted (not root)."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from core.pristine import PristineTrees
from reward.config import RewardConfig
from reward.grading import grade_patch
from sandbox.overlay import mounts_below, overlay_available

pytestmark = pytest.mark.skipif(not overlay_available(), reason="overlay mounts need root here")

SCRIBBLE = """diff --git a/tests/conftest.py b/tests/conftest.py
new file mode 100644
--- /dev/null
+++ b/tests/conftest.py
@@ -0,0 +1,4 @@
+import pathlib
+for f in pathlib.Path('.').rglob('*.py'):
+    f.write_text('raise SystemExit(0)\\n')
+pathlib.Path('calc/ops.py').unlink()
"""


def digest(path):
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        h.update(str(f.relative_to(path)).encode() + (f.read_bytes() if f.is_file() else b""))
    return h.hexdigest()


async def test_forked_grades_score_as_copies_and_leave_the_checkout_alone(calc_task, tmp_path, monkeypatch):
    from reward import grading

    mounted = []
    real_mount = grading.mount_overlay_async

    async def counted_mount(*args):
        mounted.append(args[2])
        await real_mount(*args)

    monkeypatch.setattr(grading, "mount_overlay_async", counted_mount)
    work = tmp_path / "grades"
    work.mkdir()
    trees = PristineTrees()
    try:
        forked = RewardConfig(fail_fast=False, work_tree="auto")
        copied = RewardConfig(fail_fast=False, work_tree="copy")
        patches = [calc_task.patch, "", SCRIBBLE, calc_task.patch]
        held = await trees.hold_checkout(calc_task.repo_path, calc_task.base_commit)
        before = digest(held.path)
        grades = await asyncio.gather(*(grade_patch(calc_task, p, config=forked, pristine=trees, work_root=str(work))
                                        for p in patches))
        assert len(mounted) == len(patches), "every grade's tree was a fork"
        assert mounts_below(work) == [] and list(work.iterdir()) == []
        again = [await grade_patch(calc_task, p, config=copied, pristine=trees, work_root=str(work)) for p in patches]
        assert len(mounted) == len(patches), "work_tree=copy copies"
        assert [g.resolved for g in grades] == [g.resolved for g in again] == [True, False, False, True]
        assert [g.tests for g in grades] == [g.tests for g in again]
        # A patch whose conftest rewrote every file it could reach changed its own fork only.
        assert digest(held.path) == before
        held.release()
        assert mounts_below(work) == [] and list(work.iterdir()) == []
    finally:
        trees.close()
