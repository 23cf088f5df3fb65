"""Identical patches of one instance are graded once, across tasks, threads and event loops."""

from __future__ import annotations

import asyncio
import threading

import pytest
from test_grading import new_file_patch

from reward.cache import GradeCache
from reward.grader import Grader


async def test_concurrent_identical_patches_grade_once(calc_task, tmp_path):
    grader = Grader(work_root=str(tmp_path))
    # Same fix: verbatim and with trailing blank lines share one grade; with a (stripped) test edit it is
    # its own (what is stripped is known only once git has applied the patch).
    variants = [calc_task.patch] * 3 + [calc_task.patch + "\n\n",
                                        calc_task.patch + new_file_patch("tests/test_extra.py", "def test_x():\n    pass\n")]
    results = await asyncio.gather(*(grader.grade(calc_task, patch) for patch in variants))
    assert all(r.resolved and r.reward == 1.0 for r in results)
    assert grader.cache.stats.misses == 2 and grader.cache.stats.joins + grader.cache.stats.hits == 3
    assert sorted(r.cached for r in results) == [False, False, True, True, True]
    assert results[-1].removed_test_files == ["tests/test_extra.py"] and results[0].removed_test_files == []
    # A different patch of the same instance, and the same patch of another instance, are graded anew.
    other_task = calc_task.model_copy(update={"instance_id": "calc-other"})
    wrong = calc_task.patch.replace("for value in values:", "for value in values[:1]:")
    again = await asyncio.gather(grader.grade(calc_task, wrong), grader.grade(other_task, calc_task.patch))
    assert not again[0].resolved and again[1].resolved and not any(r.cached for r in again)
    assert grader.cache.stats.misses == 4


async def test_empty_patch_runs_nothing(calc_task, tmp_path):
    grader = Grader(work_root=str(tmp_path / "nonexistent"))  # a copy would fail to be made here
    result = await grader.grade(calc_task, "")
    assert result.error == "empty_patch" and result.reward == 0.0
    assert grader.cache.stats.misses == 0


def test_threads_with_their_own_loops_share_one_grade(calc_task, tmp_path):
    # verl may call compute_score from several threads, each with its own event loop.
    grader = Grader(work_root=str(tmp_path))
    results = []
    barrier = threading.Barrier(3)

    def worker():
        barrier.wait()
        results.append(asyncio.run(grader.grade(calc_task, calc_task.patch)))

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 3 and all(r.resolved for r in results)
    assert grader.cache.stats.misses == 1


async def test_cancelled_owner_hands_over_and_errors_are_not_cached():
    cache: GradeCache[str] = GradeCache()
    started, release = asyncio.Event(), asyncio.Event()
    calls = []

    async def slow():
        calls.append("slow")
        started.set()
        await release.wait()
        return "never"

    async def fast():
        calls.append("fast")
        return "graded"

    owner = asyncio.create_task(cache.get_or_compute(("i", "k"), slow))
    await started.wait()
    waiter = asyncio.create_task(cache.get_or_compute(("i", "k"), fast))
    await asyncio.sleep(0.01)
    owner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await owner
    assert await waiter == ("graded", False)  # the waiter graded it itself
    assert await cache.get_or_compute(("i", "k"), slow) == ("graded", True)
    assert calls == ["slow", "fast"]

    async def boom():
        raise RuntimeError("grader broke")

    with pytest.raises(RuntimeError):
        await cache.get_or_compute(("i", "x"), boom)
    assert await cache.get_or_compute(("i", "x"), fast) == ("graded", False)


async def test_cache_is_bounded():
    cache: GradeCache[int] = GradeCache(max_entries=2)
    for n in range(3):
        async def value(n=n):
            return n
        await cache.get_or_compute(("i", str(n)), value)
    assert len(cache) == 2
