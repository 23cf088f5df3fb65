"""Prepared pristine trees: one checkout per (repository, commit), copied for each grade.

A grade must run in a tree no other grade and no agent has touched. Cloning the
task repository for every grade costs three git processes (clone, checkout,
remote removal; 0.04-0.2 s measured on the simple and smith tasks); copying a
checkout made once with ``cp -a`` costs one process (about 4-8x less, see
``bench/reward_throughput.py``). The prepared tree is only ever read: grades run
in their own copies, so it stays identical to a fresh ``checkout_copy``
(``core.gitrepo``), ``.git`` included (the grader's ``git apply`` and
``git show`` need it).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import tempfile
import threading
import weakref
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from core.gitrepo import GitError, checkout_copy
from core.process import run_command

# Limit for copying one prepared tree, seconds.
COPY_TIMEOUT_S = 120.0


class _Abandoned(Exception):
    """The build that owned a key was cancelled; a waiter builds it itself."""


@dataclass
class _Tree:
    ready: Future  # concurrent.futures.Future[Path], awaitable from any loop
    users: int = 0  # grades copying from (or waiting for) this tree


@dataclass
class PristineTrees:
    """Checkouts at a commit, made on first use under a private store and copied on demand.

    Args:
        work_root: parent directory of the store (None = the system temp dir);
            the store itself is a new private directory, removed by ``close()``
            or when the object is garbage-collected.
        max_trees: prepared trees kept; beyond it the least recently used tree
            that no grade is copying is removed (a later grade rebuilds it).

    Safe across threads and event loops: a tree is built at most once at a time
    (the in-flight build is a ``concurrent.futures.Future`` any loop can await);
    a failed build is not remembered, so the next grade tries again.
    """

    work_root: str | None = None
    max_trees: int = 64
    _trees: OrderedDict[tuple[str, str], _Tree] = field(default_factory=OrderedDict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _root: Path | None = field(default=None, init=False, repr=False)
    _finalizer: weakref.finalize | None = field(default=None, init=False, repr=False)

    def _store(self) -> Path:
        with self._lock:
            if self._root is None:
                root = Path(tempfile.mkdtemp(prefix="reward-pristine-", dir=self.work_root))
                self._root = root
                self._finalizer = weakref.finalize(self, shutil.rmtree, str(root), True)
            return self._root

    async def _build(self, repo_path: str, commit: str) -> Path:
        store = await asyncio.to_thread(self._store)
        name = hashlib.sha256(f"{os.path.realpath(repo_path)}\0{commit}".encode()).hexdigest()[:24]
        staging = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix=name + "-", dir=store))
        final = staging / "repo"
        try:
            await checkout_copy(repo_path, commit, final)
        except BaseException:
            await asyncio.shield(asyncio.to_thread(shutil.rmtree, staging, True))
            raise
        return final

    def _evict(self) -> list[Path]:
        """Drop least recently used idle trees over ``max_trees``; returns their directories."""
        dropped: list[Path] = []
        with self._lock:
            for key in list(self._trees):
                if len(self._trees) <= self.max_trees:
                    break
                tree = self._trees[key]
                if tree.users == 0 and tree.ready.done() and tree.ready.exception() is None:
                    del self._trees[key]
                    dropped.append(tree.ready.result().parent)
        return dropped

    async def copy_to(self, repo_path: str, commit: str, dest: Path) -> Path:
        """Make ``dest`` (must not exist) a copy of ``repo_path`` checked out at ``commit``.

        Raises:
            FileNotFoundError: ``repo_path`` is not a git repository.
            GitError: the checkout failed (e.g. unknown commit) or the copy failed.
            OSError: the store cannot be created (work_root missing, disk full).
        """
        key = (os.path.realpath(repo_path), commit)
        while True:
            with self._lock:
                tree = self._trees.get(key)
                owner = tree is None
                if tree is None:
                    tree = self._trees[key] = _Tree(Future())
                    # RUNNING futures cannot be cancelled by a cancelled waiter.
                    tree.ready.set_running_or_notify_cancel()
                self._trees.move_to_end(key)
                tree.users += 1
            try:
                if owner:
                    try:
                        path = await self._build(repo_path, commit)
                    except BaseException as exc:
                        with self._lock:
                            self._trees.pop(key, None)
                        cancelled = isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt, SystemExit))
                        tree.ready.set_exception(_Abandoned() if cancelled else exc)
                        raise
                    tree.ready.set_result(path)
                else:
                    try:
                        path = await asyncio.wrap_future(tree.ready)
                    except _Abandoned:
                        continue
                # cp -a keeps modes, symlinks and timestamps, as a checkout has them.
                result = await run_command(
                    ["cp", "-a", "--reflink=auto", str(path), str(dest)], timeout_s=COPY_TIMEOUT_S
                )
                if result.returncode != 0 or result.timed_out:
                    raise GitError(f"copying the prepared tree {path} failed: {result.output.strip()[-2000:]}")
                return dest
            finally:
                with self._lock:
                    tree.users -= 1
                for stale in self._evict():
                    await asyncio.shield(asyncio.to_thread(shutil.rmtree, stale, True))

    def close(self) -> None:
        """Remove every prepared tree (later calls build them again); call when no grade is running."""
        with self._lock:
            finalizer, self._root, self._finalizer = self._finalizer, None, None
            self._trees = OrderedDict()
        if finalizer is not None:
            finalizer()
