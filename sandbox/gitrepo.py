"""Fresh working copies of a task's git repository, and diffs out of them."""

from __future__ import annotations

import os
from pathlib import Path

from sandbox.process import run_command

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
_CACHE_EXCLUDES = (":(exclude,glob)**/__pycache__/**", ":(exclude,glob)**/*.pyc", ":(exclude,glob)**/.pytest_cache/**")


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


async def checkout_copy(repo_path: str | os.PathLike[str], commit: str, dest: str | os.PathLike[str]) -> Path:
    """Make ``dest`` a new, independent git working copy of ``repo_path`` at ``commit``.

    The copy has no remote, so nothing in it points back at the task repository.

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
    await git(dest, "remote", "remove", "origin")
    return dest


async def diff_against(repo: str | os.PathLike[str], commit: str) -> str:
    """Return ``git diff`` of the work tree (including untracked files) against ``commit``.

    Untracked files are added with ``git add -A`` first, so new files appear in the
    patch as SWE-bench patches do; interpreter and pytest caches are left out
    (repos without a ``.gitignore`` would otherwise ship them in the patch).
    Binary files appear as ``--binary`` hunks.
    """
    await git(repo, "add", "-A", "--", ".", *_CACHE_EXCLUDES)
    return await git(repo, "diff", "--cached", "--binary", commit)
