"""What a patch changed, as git reports it after applying, and putting protected files back.

The grader applies the model patch with ``git apply`` in its own fresh copy of the
repository, then asks git which paths changed (``git add -A --force`` then ``git
diff --cached --raw -z --no-renames`` against the base commit): real paths,
NUL-separated, after git's own unquoting, whatever the patch text claimed (C-quoted
names, octal escapes, renames, copies, mode changes, symlinks, ignored files). The
copy's ``.git`` is the grader's (a fresh clone; ``git apply`` refuses paths inside
``.git``), and every git call runs with hooks, fsmonitor and attributes-driven
filters unable to run anything (``SAFE_GIT``).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from core.gitrepo import GIT_ENV

# Seconds for each git command of this module.
GIT_TIMEOUT_S = 60.0
# No hooks, no fsmonitor, no user or system config, literal pathspecs, no quoting.
SAFE_GIT = (
    "git", "-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false", "-c", "core.quotePath=false",
    "--literal-pathspecs",
)
SYMLINK_MODE = "120000"


@dataclass(frozen=True)
class Change:
    """One path the patch changed.

    Attributes:
        path: repository-relative, as the file system names it.
        status: git's ``A`` (added), ``M`` (modified), ``D`` (deleted) or ``T`` (type changed).
        old_mode, new_mode: git modes (``000000`` for none, ``120000`` for a symlink).
    """

    path: str
    status: str
    old_mode: str
    new_mode: str

    @property
    def in_base(self) -> bool:
        return self.old_mode != "000000"

    @property
    def is_symlink(self) -> bool:
        return self.new_mode == SYMLINK_MODE


async def _git(repo: Path, *args: str) -> bytes:
    proc = await asyncio.create_subprocess_exec(
        *SAFE_GIT, "-C", str(repo), *args,
        env={**{k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}, **GIT_ENV},
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), GIT_TIMEOUT_S)
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {err.decode(errors='replace').strip()[-1000:]}")
    return out


def _split_z(data: bytes) -> list[str]:
    return [os.fsdecode(item) for item in data.split(b"\0") if item]


async def applied_changes(repo: Path, base_commit: str) -> list[Change]:
    """Every path of the work tree that differs from ``base_commit`` (ignored files included)."""
    await _git(repo, "add", "-A", "--force", "--", ".")
    out = await _git(repo, "diff", "--cached", "--raw", "-z", "--no-renames", "--no-abbrev", base_commit)
    fields = out.split(b"\0")
    changes = []
    i = 0
    while i + 1 < len(fields) and fields[i]:
        meta = fields[i].decode().lstrip(":").split()
        old_mode, new_mode, status = meta[0], meta[1], meta[4][0]
        changes.append(Change(path=os.fsdecode(fields[i + 1]), status=status, old_mode=old_mode, new_mode=new_mode))
        i += 2
    return changes


async def tree_files(repo: Path, rev: str) -> set[str]:
    """Every file path in ``rev`` (``"--index"`` for the index after ``applied_changes``)."""
    if rev == "--index":
        return set(_split_z(await _git(repo, "ls-files", "-z")))
    return set(_split_z(await _git(repo, "ls-tree", "-r", "-z", "--name-only", rev)))


async def restore(repo: Path, base_commit: str, changes: list[Change]) -> None:
    """Put ``changes`` back to their state at ``base_commit``: re-checkout, or delete what was new."""
    in_base = [c.path for c in changes if c.in_base]
    for change in changes:
        if not change.in_base:
            target = repo / change.path
            if target.is_symlink() or target.is_file():
                target.unlink()
    for start in range(0, len(in_base), 200):
        await _git(repo, "checkout", base_commit, "--", *in_base[start:start + 200])


def directories_with_init(files: set[str]) -> set[str]:
    """Repository-relative directories (``""`` for the root) that hold an ``__init__.py``."""
    found = set()
    for path in files:
        pure = PurePosixPath(path)
        if pure.name == "__init__.py":
            parent = str(pure.parent)
            found.add("" if parent == "." else parent)
    return found
