"""Prepared pristine trees: one checkout per (repository, commit), copied for each grade.

A grade must run in a tree no other grade and no agent has touched. Cloning the
task repository for every grade costs three git processes (clone, checkout,
remote removal; 0.04-0.2 s measured on the simple and smith tasks); copying a
checkout made once with ``cp -a`` costs one process (about 4-8x less, see
``bench/reward_throughput.py``). The prepared tree is only ever read: grades run
in their own copies, so it stays identical to a fresh ``checkout_copy``
(``core.gitrepo``), ``.git`` included (the grader's ``git apply`` and
``git show`` need it). The store itself is ``core.trees.PreparedTrees``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from core.gitrepo import GitError, checkout_copy
from core.trees import HeldTree, PreparedTrees, TreeCopyError


@dataclass
class PristineTrees(PreparedTrees):
    """Checkouts at a commit, made on first use under a private store and copied on demand
    (see ``core.trees.PreparedTrees`` for ``work_root``, ``max_trees`` and thread safety)."""

    prefix: str = "reward-pristine-"

    async def copy_to(self, repo_path: str, commit: str, dest: Path) -> Path:  # type: ignore[override]
        """Make ``dest`` (must not exist) a copy of ``repo_path`` checked out at ``commit``.

        Raises:
            FileNotFoundError: ``repo_path`` is not a git repository.
            GitError: the checkout failed (e.g. unknown commit) or the copy failed.
            OSError: the store cannot be created (work_root missing, disk full).
        """
        key = (os.path.realpath(repo_path), commit)
        try:
            return await super().copy_to(key, lambda final: checkout_copy(repo_path, commit, final), dest)
        except TreeCopyError as exc:
            raise GitError(str(exc)) from exc

    async def hold_checkout(self, repo_path: str, commit: str) -> HeldTree:
        """The prepared checkout of ``repo_path`` at ``commit``, kept until its ``release()``
        (``PreparedTrees.hold``); read it in place, never write it.

        Raises:
            FileNotFoundError: ``repo_path`` is not a git repository.
            GitError: the checkout failed (e.g. unknown commit).
        """
        key = (os.path.realpath(repo_path), commit)
        return await self.hold(key, lambda final: checkout_copy(repo_path, commit, final))
