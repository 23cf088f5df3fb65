"""The patch-text helpers on real `git diff` output (the similarity reward's filter, size and format checks).

The grader's protection works on what git applied: tests/reward/test_protected.py."""

from __future__ import annotations

import subprocess

import pytest

from reward.patch import PatchError, split_protected_changes as split_test_changes
from reward.protected import is_test_path

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost", "-c", "core.hooksPath=/dev/null"]


def _git(repo, *args: str) -> str:
    return subprocess.run([*GIT, "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


@pytest.mark.parametrize(
    "path, expected",
    [
        ("tests/test_a.py", True),
        ("pkg/tests/helpers.py", True),
        ("test/data.json", True),
        ("pkg/test_util.py", True),
        ("pkg/util_test.py", True),
        ("conftest.py", True),
        ("pkg/sub/conftest.py", True),
        ("pkg/testing.py", False),
        ("testing/data.json", True),
        ("pkg/contest.py", False),
        ("latest_tests.txt", False),
        ("src/attest.py", False),
        ("/dev/null", False),
    ],
)
def test_is_test_path(path, expected):
    assert is_test_path(path) is expected


def test_split_real_git_diff(tmp_path):
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "tests").mkdir()
    (repo / "pkg" / "mod.py").write_text("a = 1\nb = 2\n")
    (repo / "tests" / "test_mod.py").write_text("def test_a():\n    pass\n")
    (repo / "blob.bin").write_bytes(b"\x00\x01binary")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "init")
    base = _git(repo, "rev-parse", "HEAD").strip()

    (repo / "pkg" / "mod.py").write_text("a = 1\nb = 3\n")
    (repo / "pkg" / "new.py").write_text("c = 4\n")
    (repo / "tests" / "test_mod.py").write_text("def test_a():\n    assert True\n")
    (repo / "conftest.py").write_text("import sys\n")
    (repo / "blob.bin").write_bytes(b"\x00\x02binary!")
    _git(repo, "add", "-A")
    patch = _git(repo, "diff", "--cached", "--binary", base)

    kept, removed = split_test_changes(patch)
    assert removed == ["conftest.py", "tests/test_mod.py"]
    assert "tests/test_mod.py" not in kept and "conftest.py" not in kept
    assert "GIT binary patch" in kept  # raw sections kept verbatim, binary bodies included

    # The kept part applies on a fresh copy of the base and changes exactly the non-test files.
    copy = tmp_path / "copy"
    subprocess.run(["git", "clone", "-q", str(repo), str(copy)], check=True)
    _git(copy, "checkout", "-q", base)
    (tmp_path / "kept.patch").write_text(kept)
    _git(copy, "apply", str(tmp_path / "kept.patch"))
    assert (copy / "pkg" / "mod.py").read_text() == "a = 1\nb = 3\n"
    assert (copy / "pkg" / "new.py").read_text() == "c = 4\n"
    assert (copy / "blob.bin").read_bytes() == b"\x00\x02binary!"
    assert (copy / "tests" / "test_mod.py").read_text() == "def test_a():\n    pass\n"
    assert not (copy / "conftest.py").exists()


def test_rename_into_tests_is_removed():
    patch = (
        "diff --git a/pkg/util.py b/tests/util.py\nsimilarity index 100%\n"
        "rename from pkg/util.py\nrename to tests/util.py\n"
    )
    assert split_test_changes(patch) == ("", ["tests/util.py"])


def test_plain_unified_diff_without_git_headers():
    patch = (
        "--- a/pkg/m.py\n+++ b/pkg/m.py\n@@ -1 +1 @@\n-x = 1\n+x = 2\n"
        "--- a/tests/test_m.py\n+++ b/tests/test_m.py\n@@ -1 +1 @@\n-y\n+z\n"
    )
    kept, removed = split_test_changes(patch)
    assert removed == ["tests/test_m.py"]
    assert "pkg/m.py" in kept and "+x = 2" in kept and "test_m" not in kept


def test_empty_patch():
    assert split_test_changes("") == ("", [])
    assert split_test_changes("\n  \n") == ("", [])


@pytest.mark.parametrize(
    "text",
    [
        "I fixed it by changing the loop.\n",
        "--- a/x.py\n+++ b/x.py\n@@ -1,3 +1,3 @@\n-a\n+b\n",  # hunk shorter than its header says
    ],
)
def test_unparsable_patch_raises(text):
    with pytest.raises(PatchError):
        split_test_changes(text)


def test_quoted_and_escaped_names_are_read_as_git_writes_them():
    patch = ('diff --git "a/conftes\\164.py" "b/conftes\\164.py"\nnew file mode 100644\n--- /dev/null\n'
             '+++ "b/conftes\\164.py"\n@@ -0,0 +1 @@\n+x = 1\n')
    assert split_test_changes(patch) == ("", ["conftest.py"])


def test_check_patch_limits():
    from reward.patch import PatchRejected, check_patch

    patch = "--- a/m.py\n+++ b/m.py\n@@ -1 +1 @@\n-x = 1\n+x = 2\n"
    check_patch(patch, max_bytes=1000)
    check_patch("", max_bytes=1)
    with pytest.raises(PatchRejected) as info:
        check_patch(patch, max_bytes=10)
    assert info.value.error_class == "patch_too_large"
    with pytest.raises(PatchError) as info:
        check_patch("just words\n", max_bytes=1000)
    assert info.value.error_class == "patch_parse_error"
    rename_out = "diff --git a/m.py b/m.py\nsimilarity index 100%\nrename from m.py\nrename to ../m.py\n"
    with pytest.raises(PatchRejected) as info:
        check_patch(rename_out, max_bytes=1000)
    assert info.value.error_class == "path_outside_repo"


def test_normalize_patch_ignores_index_lines():
    from reward.patch import normalize_patch

    a = "diff --git a/m.py b/m.py\nindex 83db48f..bf269f4 100644\n--- a/m.py\n+++ b/m.py\n@@ -1 +1 @@\n-x\n+y\n"
    b = a.replace("83db48f..bf269f4", "1111111..2222222") + "\n\n"
    assert normalize_patch(a) == normalize_patch(b) != normalize_patch(a.replace("+y", "+z"))


@pytest.mark.parametrize(
    "name, before, after, changed",
    [
        ("pyproject.toml", '[project]\nname = "a"\n[tool.pytest.ini_options]\nx = 1\n',
         '[project]\nname = "b"\n[tool.pytest.ini_options]\nx = 1\n', False),
        ("pyproject.toml", '[tool.pytest.ini_options]\nx = 1\n', '[tool.pytest.ini_options]\nx = 2\n', True),
        ("pyproject.toml", '[project]\nname = "a"\n', '[project]\nname = "a"\n[tool.pytest]\naddopts = ["-x"]\n', True),
        ("pyproject.toml", '[project]\n', 'not = toml = at all', True),
        ("setup.cfg", "[metadata]\nname = a\n", "[metadata]\nname = b\n", False),
        ("setup.cfg", "[metadata]\nname = a\n", "[metadata]\nname = a\n[tool:pytest]\naddopts = -p x\n", True),
        ("tox.ini", "[tox]\nenvlist = py311\n", "[tox]\nenvlist = py312\n", False),
        ("tox.ini", None, "[pytest]\naddopts = -p x\n", True),
        ("tox.ini", "[pytest]\naddopts = -q\n", None, True),
    ],
)
def test_pytest_settings_changed(name, before, after, changed):
    from reward.runner_config import pytest_settings_changed

    assert pytest_settings_changed(name, before, after) is changed
