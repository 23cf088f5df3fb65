"""Turn a ``TaskSpec`` into a task git repository and its SWE-bench record.

The repository gets exactly one commit holding the buggy code and the visible
tests. The reference fix and the hidden tests exist only as diff text
(``SWETask.patch`` / ``test_patch``): they are computed with ``difflib`` in
memory, never written into the repository, so neither its history nor its
object store (``git fsck --lost-found``) can reveal them.
"""

from __future__ import annotations

import asyncio
import difflib
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from prepare.simple_tasks import DATA_SOURCE, TaskSpec
from core.task import DEFAULT_TEST_CMD, SWETask
from core.gitrepo import git, git_env
from core.process import run_command

# A fixed timestamp (2024-01-01T00:00:00Z) so the same files give the same commit hash.
COMMIT_DATE = "1704067200 +0000"
COMMIT_MESSAGE = "Initial commit"


def commit_env() -> dict[str, str]:
    """git's environment for reproducible commits: fixed identity and dates, no user config."""
    return {
        **git_env(),
        "GIT_AUTHOR_DATE": COMMIT_DATE,
        "GIT_COMMITTER_DATE": COMMIT_DATE,
        # A user's ~/.gitconfig (signing, hooks, autocrlf) must not change the commit.
        "GIT_CONFIG_GLOBAL": os.devnull,
    }


def git_file_diff(path: str, old: str | None, new: str | None) -> str:
    """A git-style unified diff (``git apply``-able) of one text file.

    ``old=None`` means the file is created, ``new=None`` that it is deleted.
    Contents must end with a newline (no "\\ No newline at end of file" handling).

    Raises:
        ValueError: a content does not end with a newline.
    """
    for content in (old, new):
        if content and not content.endswith("\n"):
            raise ValueError(f"{path}: content must end with a newline")
    header = [f"diff --git a/{path} b/{path}\n"]
    if old is None:
        header.append("new file mode 100644\n")
    elif new is None:
        header.append("deleted file mode 100644\n")
    body = difflib.unified_diff(
        (old or "").splitlines(keepends=True),
        (new or "").splitlines(keepends=True),
        fromfile="/dev/null" if old is None else f"a/{path}",
        tofile="/dev/null" if new is None else f"b/{path}",
    )
    return "".join(header) + "".join(body)


def git_tree_diff(changes: Iterable[tuple[str, str | None, str | None]]) -> str:
    """Concatenated ``git_file_diff`` of ``(path, old, new)`` triples, sorted by path like git."""
    return "".join(git_file_diff(path, old, new) for path, old, new in sorted(changes, key=lambda c: c[0]))


def _write_files(root: Path, files: dict[str, str]) -> None:
    for rel, content in files.items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content, encoding="utf-8")


async def _commit_all(repo: Path) -> str:
    env = commit_env()

    async def run(*args: str) -> str:
        result = await run_command(["git", "-C", str(repo), *args], env=env, timeout_s=60.0)
        if result.returncode != 0 or result.timed_out:
            raise RuntimeError(f"git {' '.join(args)} failed in {repo}: {result.output.strip()}")
        return result.output

    await run("init", "-q", "-b", "main")
    await run("add", "-A")
    await run("commit", "-q", "--no-verify", "-m", COMMIT_MESSAGE)
    return (await git(repo, "rev-parse", "HEAD")).strip()


async def build_task_repo(spec: TaskSpec, repos_dir: str | os.PathLike[str]) -> SWETask:
    """Create ``repos_dir/<instance_id>`` as a one-commit git repo and return its task.

    An existing directory of that name is replaced.

    Returns:
        The ``SWETask`` with ``base_commit`` = the commit's hash, ``patch`` = the
        fix, ``test_patch`` = the hidden tests, ``repo_path`` absolute.

    Raises:
        RuntimeError: a git command failed.
    """
    repo = Path(repos_dir).resolve() / spec.instance_id
    await asyncio.to_thread(shutil.rmtree, repo, ignore_errors=True)
    await asyncio.to_thread(repo.mkdir, parents=True)
    await asyncio.to_thread(_write_files, repo, spec.base_files)
    base_commit = await _commit_all(repo)
    patch = git_tree_diff((path, spec.base_files.get(path), new) for path, new in spec.fixed_files.items())
    test_patch = git_tree_diff((path, spec.base_files.get(path), new) for path, new in spec.hidden_test_files.items())
    return SWETask(
        instance_id=spec.instance_id,
        repo=f"swe-simple/{spec.package}",
        base_commit=base_commit,
        problem_statement=spec.problem_statement,
        patch=patch,
        test_patch=test_patch,
        FAIL_TO_PASS=list(spec.fail_to_pass),
        PASS_TO_PASS=list(spec.pass_to_pass),
        version="0.1",
        repo_path=str(repo),
        test_cmd=DEFAULT_TEST_CMD,
        data_source=DATA_SOURCE,
        bug_kind=spec.bug_kind,
    )


async def build_task_repos(
    specs: list[TaskSpec], repos_dir: str | os.PathLike[str], *, concurrency: int = 4
) -> list[SWETask]:
    """``build_task_repo`` for every spec, at most ``concurrency`` at a time, in spec order."""
    semaphore = asyncio.Semaphore(concurrency)

    async def one(spec: TaskSpec) -> SWETask:
        async with semaphore:
            return await build_task_repo(spec, repos_dir)

    return list(await asyncio.gather(*(one(spec) for spec in specs)))
