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

from reward.protected import protected_reason

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


_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", '"': '"', "\\": "\\"}


def unquote_path(path: str) -> str:
    """git's C-quoted path (``"a/conftes\\164.py"``) as the plain name git writes; others unchanged."""
    if len(path) < 2 or not (path.startswith('"') and path.endswith('"')):
        return path
    body, out, i = path[1:-1], bytearray(), 0
    while i < len(body):
        ch = body[i]
        if ch == "\\" and i + 1 < len(body):
            nxt = body[i + 1]
            if nxt in "01234567" and i + 3 < len(body) + 1 and all(c in "01234567" for c in body[i + 1:i + 4]):
                out.append(int(body[i + 1:i + 4], 8) & 0xFF)
                i += 4
                continue
            out += _ESCAPES.get(nxt, nxt).encode()
            i += 2
            continue
        out += ch.encode()
        i += 1
    return out.decode("utf-8", errors="surrogateescape")


def _strip_prefix(path: str | None) -> str:
    if not path or path == "/dev/null":
        return ""
    path = unquote_path(path)
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
    """Remove the changes to protected files (``reward.protected``) from a unified diff's text.

    Only for what never applies a patch (the similarity reward compares texts); the
    grader applies the patch and reads the changed paths from git (``reward.applied``).

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
