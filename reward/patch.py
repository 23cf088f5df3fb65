"""Separate a model's patch into the part that is graded and the test-file changes.

SWE-bench grades a model patch against the task's own hidden tests; a patch that
edits test files could weaken or replace them, so those changes are removed
before the patch is applied (the counted paths are reported, not punished).
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from unidiff import PatchSet
from unidiff.errors import UnidiffParseError

# Directory names whose contents are test code anywhere in the tree.
_TEST_DIRS = frozenset({"tests", "test"})
# A git-style per-file header; hunk lines never start at column 0 with "diff".
_GIT_HEADER = re.compile(r"^diff --git ", re.MULTILINE)


class PatchError(ValueError):
    """The text is not a unified diff that can be parsed (message says why)."""


def is_test_path(path: str) -> bool:
    """True for files that belong to the test suite.

    A path is a test path when a directory on it is ``tests``/``test``, or its
    file name is ``conftest.py``, ``test_*.py`` or ``*_test.py``. ``path`` is
    relative to the repository root, with or without git's ``a/``/``b/`` prefix
    stripped already; ``/dev/null`` is never a test path.
    """
    if not path or path == "/dev/null":
        return False
    parts = PurePosixPath(path).parts
    name = parts[-1]
    if any(part in _TEST_DIRS for part in parts[:-1]):
        return True
    if name == "conftest.py":
        return True
    return name.endswith(".py") and (name.startswith("test_") or name.endswith("_test.py"))


def _strip_prefix(path: str | None) -> str:
    if not path or path == "/dev/null":
        return ""
    return path[2:] if path[:2] in ("a/", "b/") else path


def _file_sections(patch: str, n_files: int) -> list[str] | None:
    """Raw text of each file's section for git-style patches, in file order.

    Slicing the raw text (rather than ``str(PatchedFile)``) keeps parts unidiff
    does not re-emit, such as ``GIT binary patch`` bodies and mode lines. Text
    before the first header (a ``git format-patch`` preamble) belongs to no file.
    Returns None when the sections cannot be matched one-to-one to parsed files.
    """
    starts = [m.start() for m in _GIT_HEADER.finditer(patch)]
    if len(starts) != n_files:
        return None
    ends = starts[1:] + [len(patch)]
    return [patch[s:e] for s, e in zip(starts, ends)]


def split_test_changes(patch: str) -> tuple[str, list[str]]:
    """Remove the changes to test files from a unified diff.

    Args:
        patch: a unified diff, git-style (``git diff``) or plain ``---``/``+++``.

    Returns:
        ``(kept_patch, removed_paths)``: the patch text without the sections
        touching test files (see ``is_test_path``; for renames either side
        counts), and the repository-relative paths of the removed sections in
        patch order. An empty or whitespace-only patch gives ``("", [])``.
        ``kept_patch`` is ``""`` when every section was removed.

    Raises:
        PatchError: the text is not empty but has no parsable file changes, or a
            hunk is malformed (unidiff's parse error is chained).
    """
    if not patch.strip():
        return "", []
    try:
        parsed = PatchSet(patch)
    except UnidiffParseError as exc:
        raise PatchError(f"malformed patch: {exc}") from exc
    if len(parsed) == 0:
        raise PatchError("no file changes found in patch (not a unified diff)")

    sections = _file_sections(patch, len(parsed))
    kept: list[str] = []
    removed: list[str] = []
    for i, patched_file in enumerate(parsed):
        source = _strip_prefix(patched_file.source_file)
        target = _strip_prefix(patched_file.target_file)
        if is_test_path(source) or is_test_path(target):
            removed.append(target or source)
            continue
        kept.append(sections[i] if sections is not None else str(patched_file))
    text = "".join(kept)
    if text and not text.endswith("\n"):
        text += "\n"
    return text, removed
