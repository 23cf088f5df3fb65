"""Prepared trees: a directory built once per key under a private store, copied on demand.

A grade or a rollout must start from a tree nobody has touched. Building it (a git
checkout, an image's work tree pulled out of the engine) costs far more than copying a
finished one with ``cp -a`` (one process; reflinks where the file system has them), so
each key's tree is built once and every user gets its own copy. The prepared tree is
only ever read.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import shutil
import tempfile
import threading
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from core.owner import owner_alive, owner_record
from core.process import run_command

# Limit for copying one prepared tree, seconds.
COPY_TIMEOUT_S = 120.0
# The owner record at a store's root (``core.owner``).
STORE_OWNER_FILE = "store-owner.json"


class TreeCopyError(RuntimeError):
    """Copying a prepared tree failed (the message carries ``cp``'s output)."""


class _Abandoned(Exception):
    """The build that owned a key was cancelled; a waiter builds it itself."""


@dataclass
class _Tree:
    ready: Future  # concurrent.futures.Future[Path], awaitable from any loop
    users: int = 0  # callers copying from (or waiting for) this tree


# ``build(dest)`` makes the tree at ``dest`` (which does not exist yet).
Builder = Callable[[Path], Awaitable[object]]


@dataclass
class PreparedTrees:
    """Trees built on first use under a private store and copied for each caller.

    Args:
        work_root: parent directory of the store (None = the system temp dir); the store
            itself is a new private directory, removed by ``close()`` or when the object
            is garbage-collected.
        max_trees: prepared trees kept; beyond it the least recently used tree no caller
            is copying is removed (a later caller rebuilds it).
        prefix: the store directory's name prefix.

    Safe across threads and event loops: a key is built at most once at a time (the
    in-flight build is a ``concurrent.futures.Future`` any loop can await); a failed
    build is not remembered, so the next caller tries again.
    """

    work_root: str | None = None
    max_trees: int = 64
    prefix: str = "prepared-trees-"
    _trees: OrderedDict[Hashable, _Tree] = field(default_factory=OrderedDict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _root: Path | None = field(default=None, init=False, repr=False)
    _finalizer: weakref.finalize | None = field(default=None, init=False, repr=False)

    def _store(self) -> Path:
        with self._lock:
            if self._root is None:
                root = Path(tempfile.mkdtemp(prefix=self.prefix, dir=self.work_root))
                # A worker killed before close() leaves the store to the start-up reaper (reap_stale_stores).
                (root / STORE_OWNER_FILE).write_text(json.dumps(owner_record()))
                self._root = root
                self._finalizer = weakref.finalize(self, shutil.rmtree, str(root), True)
            return self._root

    async def _build(self, key: Hashable, build: Builder) -> Path:
        store = await asyncio.to_thread(self._store)
        name = hashlib.sha256(repr(key).encode()).hexdigest()[:24]
        staging = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix=name + "-", dir=store))
        final = staging / "repo"
        try:
            await build(final)
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

    async def copy_to(self, key: Hashable, build: Builder, dest: Path) -> Path:
        """Make ``dest`` (must not exist) a copy of ``key``'s tree, building it first if needed.

        Raises:
            TreeCopyError: the copy failed.
            OSError: the store cannot be created (work_root missing, disk full).
            Whatever ``build`` raises (not remembered: the next caller builds again).
        """
        held = await self.hold(key, build)
        try:
            # cp -a keeps modes, symlinks and timestamps, as a checkout has them.
            result = await run_command(["cp", "-a", "--reflink=auto", str(held.path), str(dest)],
                                       timeout_s=COPY_TIMEOUT_S)
            if result.returncode != 0 or result.timed_out:
                raise TreeCopyError(f"copying the prepared tree {held.path} failed: {result.output.strip()[-2000:]}")
            return dest
        finally:
            await asyncio.shield(asyncio.to_thread(held.release))

    async def hold(self, key: Hashable, build: Builder) -> HeldTree:
        """``key``'s tree, built first if needed, kept (never evicted) until ``release()``: for a
        caller that reads it in place (an overlay's lower layer) rather than copying it.

        Raises:
            OSError: the store cannot be created (work_root missing, disk full).
            Whatever ``build`` raises (not remembered: the next caller builds again).
        """
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
            held = HeldTree(Path(), self, tree)
            try:
                if owner:
                    try:
                        path = await self._build(key, build)
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
                        await asyncio.shield(asyncio.to_thread(held.release))
                        continue
            except BaseException:
                await asyncio.shield(asyncio.to_thread(held.release))
                raise
            held.path = path
            return held

    def _release(self, tree: _Tree) -> None:
        with self._lock:
            tree.users -= 1
        for stale in self._evict():
            shutil.rmtree(stale, ignore_errors=True)

    def close(self) -> None:
        """Remove every prepared tree (later calls build them again); call when nobody copies."""
        with self._lock:
            finalizer, self._root, self._finalizer = self._finalizer, None, None
            self._trees = OrderedDict()
        if finalizer is not None:
            finalizer()


@dataclass
class HeldTree:
    """A prepared tree kept for one caller (``PreparedTrees.hold``) until ``release()``.

    Attributes:
        path: the prepared tree (read it, never write it).
    """

    path: Path
    _trees: PreparedTrees
    _tree: _Tree
    _released: bool = False

    def release(self) -> None:
        """Let the store evict the tree again (idempotent). Blocking: may remove evicted trees."""
        if not self._released:
            self._released = True
            self._trees._release(self._tree)


def reap_stale_stores(parent_dir: str | Path) -> list[Path]:
    """Remove the stores under ``parent_dir`` whose owner (``STORE_OWNER_FILE``) is dead: what a
    killed worker's prepared trees left. Stores without an owner file are left alone. Blocking."""
    removed = []
    try:
        candidates = list(Path(parent_dir).iterdir())
    except OSError:
        return []
    for store in candidates:
        try:
            record = json.loads((store / STORE_OWNER_FILE).read_text())
        except (OSError, ValueError):  # not a store, or not ours to read
            continue
        if not owner_alive(record):
            shutil.rmtree(store, ignore_errors=True)
            removed.append(store)
    if removed:
        logging.getLogger(__name__).warning("reaped %d stale prepared-tree store(s) under %s", len(removed), parent_dir)
    return removed
