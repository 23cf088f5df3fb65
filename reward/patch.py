"""Check a model's patch and separate the part that is graded from what it may not touch.

SWE-bench grades a model patch against the task's own hidden tests; a patch that
edits test files, the test runner's configuration or the interpreter's start-up
hooks could weaken or replace those tests, so such changes are removed before
the patch is applied (the removed paths are reported, not punished). Patches
that cannot be graded safely at all (too large, binary, writing outside the
repository) are rejected with an error class (``PatchRejected.error_class``).
"""

from __future__ import annotations

import posixpath
import re
from pathlib import PurePosixPath

from unidiff import PatchSet
from unidiff.errors import UnidiffParseError

# Directory names whose contents are test code anywhere in the tree.
_TEST_DIRS = frozenset({"tests", "test"})
# Files that configure pytest wholesale, wherever they are (pytest looks for
# them in every ancestor of the test paths).
_RUNNER_CONFIG_NAMES = frozenset({"pytest.ini", ".pytest.ini"})
# Python imports these at start-up from any directory on sys.path.
_STARTUP_HOOK_NAMES = frozenset({"sitecustomize.py", "usercustomize.py"})
# A git-style per-file header; hunk lines never start at column 0 with "diff".
_GIT_HEADER = re.compile(r"^diff --git ", re.MULTILINE)
# Extended header lines naming paths (renames and copies).
_PATH_HEADER = re.compile(r"^(?:rename|copy) (?:from|to) (.+)$", re.MULTILINE)
_SYMLINK_MODE = re.compile(r"^(?:new file mode|new mode) 120000$", re.MULTILINE)
_BINARY = re.compile(r"^(?:GIT binary patch|Binary files .* differ)$", re.MULTILINE)
_INDEX_LINE = re.compile(r"^index [0-9a-fA-F]+\.\.[0-9a-fA-F]+(?: [0-7]+)?\n", re.MULTILINE)


class PatchError(ValueError):
    """The text is not a unified diff that can be parsed (message says why)."""

    error_class = "patch_parse_error"


class PatchRejected(PatchError):
    """A parsable patch that is not graded; ``error_class`` names why.

    Classes: ``patch_too_large`` (over the byte limit), ``binary_patch`` (binary
    sections), ``path_outside_repo`` (absolute or ``..`` paths, symlinks pointing
    out of the repository).
    """

    def __init__(self, error_class: str, message: str) -> None:
        super().__init__(message)
        self.error_class = error_class


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


def protected_reason(path: str) -> str | None:
    """Why a patch may not change ``path``, or None when it may.

    Returns ``"test"`` (``is_test_path``), ``"runner_config"`` (``pytest.ini``
    anywhere), or ``"startup_hook"`` (``sitecustomize.py``, ``usercustomize.py``,
    any ``*.pth``). Files that hold runner configuration next to other settings
    (``pyproject.toml``, ``setup.cfg``, ``tox.ini``) are checked section by
    section after applying (``reward.runner_config``), not here.
    """
    if not path or path == "/dev/null":
        return None
    if is_test_path(path):
        return "test"
    name = PurePosixPath(path).name
    if name in _RUNNER_CONFIG_NAMES:
        return "runner_config"
    if name in _STARTUP_HOOK_NAMES or name.endswith(".pth"):
        return "startup_hook"
    return None


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


def _parse(patch: str) -> tuple[PatchSet, list[str]]:
    try:
        parsed = PatchSet(patch)
    except UnidiffParseError as exc:
        raise PatchError(f"malformed patch: {exc}") from exc
    if len(parsed) == 0:
        raise PatchError("no file changes found in patch (not a unified diff)")
    sections = _file_sections(patch, len(parsed))
    if sections is None:
        sections = [str(patched_file) for patched_file in parsed]
    return parsed, sections


def _escapes(path: str) -> bool:
    """True for an absolute path or one that climbs out with ``..``."""
    if path.startswith("/") or path.startswith("\\") or re.match(r"^[A-Za-z]:[\\/]", path):
        return True
    return ".." in PurePosixPath(path.replace("\\", "/")).parts


def _symlink_target(section: str) -> str | None:
    """The target of a symlink a section creates (its single added line), else None."""
    if not _SYMLINK_MODE.search(section):
        return None
    added = [line[1:] for line in section.splitlines() if line.startswith("+") and not line.startswith("+++")]
    return added[0] if added else ""


def check_patch(patch: str, *, max_bytes: int, allow_binary: bool = False) -> None:
    """Reject a patch that cannot be graded safely.

    Args:
        patch: the model patch (unified diff); may be empty.
        max_bytes: limit on ``len(patch.encode("utf-8"))``.
        allow_binary: accept binary sections.

    Raises:
        PatchRejected: ``patch_too_large``, ``binary_patch`` or ``path_outside_repo``
            (absolute or ``..`` paths in any header, or a symlink whose target is
            absolute or resolves outside the repository).
        PatchError: the text is not a unified diff (checked after the size, so a
            huge non-diff is reported as too large without being parsed).
    """
    size = len(patch.encode("utf-8", errors="replace"))
    if size > max_bytes:
        raise PatchRejected("patch_too_large", f"patch is {size} bytes, over the limit of {max_bytes} bytes")
    if not patch.strip():
        return
    parsed, sections = _parse(patch)
    for patched_file, section in zip(parsed, sections):
        names = [patched_file.source_file or "", patched_file.target_file or ""]
        names = [_strip_prefix(name) if name[:2] in ("a/", "b/") else name for name in names]
        names += [m.group(1).strip() for m in _PATH_HEADER.finditer(section)]
        for name in names:
            if name and name != "/dev/null" and _escapes(name):
                raise PatchRejected("path_outside_repo", f"patch touches a path outside the repository: {name!r}")
        target = _symlink_target(section)
        if target is not None:
            link = _strip_prefix(patched_file.target_file) or _strip_prefix(patched_file.source_file)
            resolved = posixpath.normpath(posixpath.join(posixpath.dirname(link), target))
            if target.startswith("/") or resolved == ".." or resolved.startswith("../"):
                raise PatchRejected(
                    "path_outside_repo", f"patch creates symlink {link!r} pointing outside the repository: {target!r}"
                )
        if not allow_binary and (patched_file.is_binary_file or _BINARY.search(section)):
            name = _strip_prefix(patched_file.target_file) or _strip_prefix(patched_file.source_file)
            raise PatchRejected("binary_patch", f"patch has a binary change to {name!r}")


def split_protected_changes(patch: str) -> tuple[str, list[str]]:
    """Remove the changes to protected files (``protected_reason``) from a unified diff.

    Args:
        patch: a unified diff, git-style (``git diff``) or plain ``---``/``+++``.

    Returns:
        ``(kept_patch, removed_paths)``: the patch text without the sections
        touching protected files (for renames either side counts), and the
        repository-relative paths of the removed sections in patch order. An
        empty or whitespace-only patch gives ``("", [])``. ``kept_patch`` is
        ``""`` when every section was removed.

    Raises:
        PatchError: the text is not empty but has no parsable file changes, or a
            hunk is malformed (unidiff's parse error is chained).
    """
    if not patch.strip():
        return "", []
    parsed, sections = _parse(patch)
    kept: list[str] = []
    removed: list[str] = []
    for patched_file, section in zip(parsed, sections):
        source = _strip_prefix(patched_file.source_file)
        target = _strip_prefix(patched_file.target_file)
        if protected_reason(source) or protected_reason(target):
            removed.append(target or source)
            continue
        kept.append(section)
    text = "".join(kept)
    if text and not text.endswith("\n"):
        text += "\n"
    return text, removed


# The historic name: test files were the first protected class.
split_test_changes = split_protected_changes


def normalize_patch(patch: str) -> str:
    """A canonical form of a (filtered) patch for cache keys and similarity.

    Drops git's ``index <sha>..<sha>`` lines (they depend on object ids, not on
    the change) and trailing blank space at the end; everything that changes
    what ``git apply`` does is kept.
    """
    text = _INDEX_LINE.sub("", patch).rstrip()
    return text + "\n" if text else ""


def changed_paths(patch: str) -> list[str]:
    """Repository-relative paths a (parsable) patch writes, targets and sources, in order."""
    if not patch.strip():
        return []
    parsed, _ = _parse(patch)
    paths: list[str] = []
    for patched_file in parsed:
        for name in (patched_file.source_file, patched_file.target_file):
            stripped = _strip_prefix(name)
            if stripped and stripped not in paths:
                paths.append(stripped)
    return paths
