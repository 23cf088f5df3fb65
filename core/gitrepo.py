"""Fresh working copies of a task's git repository, and diffs out of them."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

from core.process import run_command

# A fixed identity and no user/system config, so commits and diffs do not depend
# on the machine's git settings.
GIT_ENV = {
    "GIT_AUTHOR_NAME": "swe-rl",
    "GIT_AUTHOR_EMAIL": "swe-rl@localhost",
    "GIT_COMMITTER_NAME": "swe-rl",
    "GIT_COMMITTER_EMAIL": "swe-rl@localhost",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_TERMINAL_PROMPT": "0",
}


# Pathspecs for files the agent's runs create that are never part of a patch.
CACHE_EXCLUDES = (":(exclude,glob)**/__pycache__/**", ":(exclude,glob)**/*.pyc", ":(exclude,glob)**/.pytest_cache/**")


def git_env() -> dict[str, str]:
    """The process environment plus ``GIT_ENV``."""
    return {**os.environ, **GIT_ENV}


class GitError(RuntimeError):
    """A git command failed; the message carries git's output."""


async def git(repo: str | os.PathLike[str], *args: str, timeout_s: float = 120.0) -> str:
    """Run ``git -C repo args...`` and return its output.

    Raises:
        GitError: non-zero exit or timeout.
    """
    result = await run_command(["git", "-C", str(repo), *args], env=git_env(), timeout_s=timeout_s)
    if result.returncode != 0 or result.timed_out:
        raise GitError(f"git {' '.join(args)} failed in {repo}: {result.output.strip()[-2000:]}")
    return result.output


# The snapshot commit's fixed metadata: the same tree always gets the same commit id.
SNAPSHOT_ENV = {"GIT_AUTHOR_DATE": "2000-01-01T00:00:00+0000", "GIT_COMMITTER_DATE": "2000-01-01T00:00:00+0000"}
SNAPSHOT_MESSAGE = "base"


async def checkout_copy(repo_path: str | os.PathLike[str], commit: str, dest: str | os.PathLike[str]) -> Path:
    """Make ``dest`` a work tree of ``repo_path``'s ``commit`` in a repository holding that tree only.

    The copy's git repository has exactly one commit (``HEAD``: the same tree, with
    fixed metadata), no remote, no other refs, tags, reflog entries or objects: the
    task's history (later commits holding the fix, branches, tags, dangling objects;
    the SWE-bench history exploit) is not in it. Use ``HEAD``, not ``commit``, inside.

    Raises:
        FileNotFoundError: ``repo_path`` is not a git repository.
        GitError: the clone or checkout failed (e.g. unknown commit).
    """
    src = Path(repo_path)
    if not (src / ".git").exists() and not (src / "HEAD").exists():
        raise FileNotFoundError(f"task repository not found: {src}")
    dest = Path(dest)
    # --no-hardlinks: the copy must not share object files with the task repo.
    await git(dest.parent, "clone", "-q", "--no-checkout", "--no-hardlinks", str(src.resolve()), str(dest))
    await git(dest, "checkout", "-q", "--detach", commit)
    await snapshot_history(dest)
    return dest


async def snapshot_history(work_tree: str | os.PathLike[str]) -> str:
    """Replace ``work_tree``'s git repository by one holding a single commit of the current files.

    Returns:
        The commit id (a function of the tree only: fixed identity, dates and message).
    """
    work_tree = Path(work_tree)
    await asyncio.to_thread(shutil.rmtree, work_tree / ".git")
    await git(work_tree, "init", "-q")
    await git(work_tree, "add", "-A", "--force")
    result = await run_command(
        ["git", "-C", str(work_tree), "-c", "core.hooksPath=/dev/null", "commit", "-q", "--allow-empty",
         "--no-verify", "-m", SNAPSHOT_MESSAGE],
        env={**git_env(), **SNAPSHOT_ENV}, timeout_s=120.0,
    )
    if result.returncode != 0:
        raise GitError(f"snapshot commit failed in {work_tree}: {result.output.strip()[-2000:]}")
    return (await git(work_tree, "rev-parse", "HEAD")).strip()
