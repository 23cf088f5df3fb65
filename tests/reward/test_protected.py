"""The protected-path rules, applied to what git applied (quoting, escapes, renames, copies, modes, symlinks)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reward.applied import applied_changes, directories_with_init, restore, tree_files
from reward.protected import (
    PYTEST_CONFIG_NAMES,
    SHARED_CONFIG_NAMES,
    protected_reason,
    shadowing_roots,
)


def _git(repo: Path, *args: str, stdin: str | None = None) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@l", *args],
                          input=stdin, capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def base_repo(tmp_path_factory) -> tuple[Path, str]:
    repo = tmp_path_factory.mktemp("protected_base") / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "__init__.py").write_text("")
    (repo / "pkg" / "core.py").write_text("def f():\n    return 1\n")
    (repo / "tests").mkdir()
    (repo / "tests" / "test_core.py").write_text("from pkg.core import f\n\ndef test_f():\n    assert f() == 1\n")
    (repo / "conftest.py").write_text("# fixtures\n")
    _git(repo.parent, "init", "-q", "-b", "main", str(repo))
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "base")
    return repo, _git(repo, "rev-parse", "HEAD").strip()


def _copy(base_repo, dest: Path) -> Path:
    repo, commit = base_repo
    if dest.exists():
        shutil.rmtree(dest)
    subprocess.run(["git", "clone", "-q", str(repo), str(dest)], check=True, capture_output=True)
    return dest


def _apply(repo: Path, patch: str) -> None:
    subprocess.run(["git", "-C", str(repo), "apply", "-"], input=patch, text=True, check=True, capture_output=True)


def _protected_after(repo: Path, commit: str) -> list[str]:
    async def run():
        changes = await applied_changes(repo, commit)
        added = [c.path for c in changes if not c.in_base]
        roots = shadowing_roots(added, directories_with_init(await tree_files(repo, "--index")),
                                await tree_files(repo, commit))
        protected = [c for c in changes if protected_reason(c.path, new_module_roots=roots)]
        await restore(repo, commit, protected)
        return sorted(c.path for c in protected)

    return asyncio.run(run())


def test_every_config_file_pytest_reads_is_protected():
    findpaths = pytest.importorskip("_pytest.config.findpaths")
    assert set(findpaths.CONFIG_LOADERS_BY_NAME) <= PYTEST_CONFIG_NAMES | SHARED_CONFIG_NAMES


@pytest.mark.parametrize("path, reason", [
    ("conftest.py", "test"), ("pkg/sub/Conftest.py", "test"), ("tests/helpers.py", "test"), ("Tests/x.txt", "test"),
    ("pkg/test_core.py", "test"), ("pkg/core_test.py", "test"), ("testing/util.py", "test"),
    ("pytest.toml", "runner_config"), (".pytest.toml", "runner_config"), ("sub/PYTEST.INI", "runner_config"),
    ("sitecustomize.py", "startup_hook"), ("src/usercustomize.py", "startup_hook"), ("a/b.pth", "startup_hook"),
    ("x-1.0.dist-info/entry_points.txt", "package_metadata"), ("src/x.egg-info/PKG-INFO", "package_metadata"),
    ("x.egg-link", "package_metadata"),
    ("pkg/core.py", None), ("pyproject.toml", None), ("README.md", None), ("pkg/contest.py", None),
])
def test_protected_reason(path, reason):
    assert protected_reason(path) == reason


def test_new_modules_in_front_of_the_runner_or_stdlib_are_caught():
    added = ["pytest/__init__.py", "pytest/__main__.py", "json.py", "src/pluggy.py", "pkg/json.py", "newmod.py"]
    has_init = {"pkg", "pytest"}
    roots = shadowing_roots(added, has_init, base_paths={"pkg/__init__.py", "pkg/core.py"})
    assert roots == {"pytest/__init__.py", "pytest/__main__.py", "json.py", "src/pluggy.py"}
    # A module the task already has is its own code: a task on pytest itself edits src/_pytest.
    assert shadowing_roots(["src/_pytest/new.py"], set(), base_paths={"src/_pytest/main.py"}) == frozenset()


_PROTECTED_TARGETS = st.sampled_from([
    "conftest.py", "pkg/conftest.py", "pytest.toml", ".pytest.toml", "pytest.ini", "zz.pth", "sitecustomize.py",
    "tests/test_extra.py", "evil-1.0.dist-info/entry_points.txt", "pytest/__init__.py", "json.py",
])


def _header_name(prefix: str, path: str, quote: bool, escapes: list[int]) -> str:
    """``prefix/path`` as a diff header names it: plain, or git's C-quoted form with octal escapes."""
    if not (quote or escapes):
        return f"{prefix}/{path}"
    chars = list(path)
    for i in sorted(set(escapes)):
        if i < len(chars) and chars[i] not in "/\\\"":
            chars[i] = f"\\{ord(chars[i]):03o}"
    return f'"{prefix}/' + "".join(chars) + '"'


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(target=_PROTECTED_TARGETS, quote=st.booleans(), escapes=st.lists(st.integers(0, 30), max_size=4))
def test_quoted_and_escaped_paths_are_seen_as_git_writes_them(base_repo, tmp_path, target, quote, escapes):
    repo = _copy(base_repo, tmp_path / "copy")
    a, b = (_header_name(prefix, target, quote, escapes) for prefix in ("a", "b"))
    if target == "conftest.py":  # exists at base: a modification
        patch = f"diff --git {a} {b}\n--- {a}\n+++ {b}\n@@ -1 +1,2 @@\n # fixtures\n+import os\n"
    else:
        patch = f"diff --git {a} {b}\nnew file mode 100644\n--- /dev/null\n+++ {b}\n@@ -0,0 +1 @@\n+import os\n"
    _apply(repo, patch)
    assert (repo / target).is_file()  # git wrote the plain name
    assert _protected_after(repo, base_repo[1]) == [target]
    # Put back: a new file is gone, the existing one is as at base.
    assert asyncio.run(applied_changes(repo, base_repo[1])) == []


def test_renames_copies_symlinks_and_mode_changes(base_repo, tmp_path):
    repo, commit = base_repo
    cases = {
        "rename": ("diff --git a/pkg/core.py b/conftest2/conftest.py\nsimilarity index 100%\n"
                   "rename from pkg/core.py\nrename to conftest2/conftest.py\n", ["conftest2/conftest.py"]),
        "copy": ("diff --git a/pkg/core.py b/sitecustomize.py\nsimilarity index 100%\n"
                 "copy from pkg/core.py\ncopy to sitecustomize.py\n", ["sitecustomize.py"]),
        "symlink": ("diff --git a/x.pth b/x.pth\nnew file mode 120000\n--- /dev/null\n+++ b/x.pth\n"
                    "@@ -0,0 +1 @@\n+pkg/core.py\n\\ No newline at end of file\n", ["x.pth"]),
        "mode": ("diff --git a/tests/test_core.py b/tests/test_core.py\nold mode 100644\nnew mode 100755\n",
                 ["tests/test_core.py"]),
    }
    for name, (patch, expected) in cases.items():
        copy = _copy(base_repo, tmp_path / name)
        _apply(copy, patch)
        protected = _protected_after(copy, commit)
        assert set(expected) <= set(protected), (name, protected)
        # Only what was protected was put back: a rename's deleted source stays deleted.
        if name == "rename":
            assert not (copy / "pkg" / "core.py").exists() and not (copy / "conftest2" / "conftest.py").exists()
        else:
            left = asyncio.run(applied_changes(copy, commit))
            assert left == [], (name, left)


def test_a_gitignore_cannot_hide_a_protected_file(base_repo, tmp_path):
    repo = _copy(base_repo, tmp_path / "ignored")
    _apply(repo, "diff --git a/.gitignore b/.gitignore\nnew file mode 100644\n--- /dev/null\n+++ b/.gitignore\n"
                 "@@ -0,0 +1 @@\n+pytest.toml\n"
                 "diff --git a/pytest.toml b/pytest.toml\nnew file mode 100644\n--- /dev/null\n+++ b/pytest.toml\n"
                 "@@ -0,0 +1 @@\n+[pytest]\n")
    assert _protected_after(repo, base_repo[1]) == ["pytest.toml"]
    assert not (repo / "pytest.toml").exists() and (repo / ".gitignore").exists()
