"""One rule set: the files a model patch may not change, because Python or pytest reads them around the tests.

SWE-bench grades a patch with the task's own hidden tests; a patch that can edit
the tests, the runner's configuration, the interpreter's start-up hooks, installed
package metadata, or put a module in front of the runner could make failing tests
pass without fixing anything. Every rule is applied to the paths git reports after
applying the patch (``reward.applied``), never to the patch text, so quoting,
escapes, renames, copies, mode changes and symlinks cannot hide a path. Names are
compared case-insensitively (a case-insensitive file system maps ``Conftest.py``
onto ``conftest.py``).

Rules (``protected_reason``):

- ``test``: a file under a ``tests``/``test``/``testing`` directory, or named
  ``test_*.py``, ``*_test.py``, ``conftest.py`` (pytest loads every conftest on the
  way to the tests).
- ``runner_config``: every file name pytest reads its configuration from
  (``PYTEST_CONFIG_NAMES``: pytest 9's ``_pytest.config.findpaths.CONFIG_LOADERS_BY_NAME``
  minus the shared files) -- ``pytest.toml``, ``.pytest.toml``, ``pytest.ini``,
  ``.pytest.ini``. ``pyproject.toml``/``setup.cfg``/``tox.ini`` hold other settings
  too: they are restored only when their pytest part changed (``reward.runner_config``).
- ``startup_hook``: ``sitecustomize.py``, ``usercustomize.py``, any ``*.pth``.
- ``package_metadata``: anything inside a ``*.dist-info``/``*.egg-info`` directory
  and ``*.egg-link`` files: ``importlib.metadata`` finds them on ``sys.path`` (the
  repository root is on it under ``python -m pytest``), and their entry points are how
  pytest autoloads plugins (group ``pytest11``).
- ``shadows_runner``: a new top-level module or package (its directory has no
  ``__init__.py``, so a directory on ``sys.path`` may hold it) named after the test
  runner, its dependencies, the grader's own runner modules, or the standard library
  (``sys.stdlib_module_names``), e.g. a ``pytest/`` package at the root, which
  ``python -m pytest`` would import instead of pytest. Modules that exist at the base
  commit are the task's own code and are not affected.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import PurePosixPath

TEST_DIRS = frozenset({"tests", "test", "testing"})
# pytest 9.2's CONFIG_LOADERS_BY_NAME (tests/reward/test_protected.py compares it with the installed pytest).
PYTEST_CONFIG_NAMES = frozenset({"pytest.toml", ".pytest.toml", "pytest.ini", ".pytest.ini"})
SHARED_CONFIG_NAMES = frozenset({"pyproject.toml", "setup.cfg", "tox.ini"})
STARTUP_HOOK_NAMES = frozenset({"sitecustomize.py", "usercustomize.py"})
METADATA_DIR_SUFFIXES = (".dist-info", ".egg-info")
# The runner, what pytest 9 imports at start-up (its Requires-Dist), and the grader's own modules.
RUNNER_MODULES = frozenset({
    "pytest", "_pytest", "pluggy", "py", "iniconfig", "packaging", "pygments", "colorama",
    "exceptiongroup", "tomli", "unittest", "swe_rl_outcomes", "swe_rl_pytest",
})
SHADOWED_NAMES = RUNNER_MODULES | frozenset(name.lower() for name in sys.stdlib_module_names)

Reason = str  # "test" | "runner_config" | "startup_hook" | "package_metadata" | "shadows_runner"


def is_test_path(path: str) -> bool:
    """True for files of the test suite (see the module docstring); ``path`` is repository-relative."""
    parts = [p.lower() for p in PurePosixPath(path).parts]
    if not parts:
        return False
    name = parts[-1]
    if any(part in TEST_DIRS for part in parts[:-1]):
        return True
    if name == "conftest.py":
        return True
    return name.endswith(".py") and (name.startswith("test_") or name.endswith("_test.py"))


def top_level_module(path: str) -> str | None:
    """The module name a file would define if its directory were on ``sys.path``, else None.

    ``pytest.py`` -> ``pytest``; ``pytest/__init__.py`` -> ``pytest``; ``json.pyc`` ->
    ``json``; a directory's other files (``pytest/main.py``) also put the package there.
    """
    parts = PurePosixPath(path).parts
    if not parts:
        return None
    name = parts[-1].lower()
    for suffix in (".py", ".pyc", ".pyw", ".so", ".pyd"):
        if name.endswith(suffix) and len(parts) >= 1:
            return name[: -len(suffix)].split(".")[0] or None
    return None


def protected_reason(path: str, *, new_module_roots: frozenset[str] = frozenset()) -> Reason | None:
    """Why a patch may not change ``path`` (repository-relative, as git reports it), or None.

    Args:
        new_module_roots: the first path component of modules/packages the patch
            adds at a place with no ``__init__.py`` above it (``reward.applied`` computes
            them): a file under such a root may shadow a module of the same name.
    """
    if not path or path == "/dev/null":
        return None
    pure = PurePosixPath(path)
    lower_parts = [p.lower() for p in pure.parts]
    name = lower_parts[-1]
    if is_test_path(path):
        return "test"
    if name in PYTEST_CONFIG_NAMES:
        return "runner_config"
    if name in STARTUP_HOOK_NAMES or name.endswith(".pth"):
        return "startup_hook"
    if name.endswith(".egg-link") or any(p.endswith(METADATA_DIR_SUFFIXES) for p in lower_parts[:-1]) or name.endswith(
            METADATA_DIR_SUFFIXES):
        return "package_metadata"
    if path in new_module_roots:
        return "shadows_runner"
    return None


def shadowing_candidates(added: list[str], is_package: Callable[[str], bool]) -> dict[str, str]:
    """Added files that would put a runner or standard-library name on a ``sys.path`` directory.

    Args:
        added: repository-relative paths the patch creates (files).
        is_package: whether a repository-relative directory (``""`` = the root) holds an
            ``__init__.py`` after the patch.

    Returns:
        ``{added path: the module's own path}`` (``json.py``, ``src/pytest``): the module
        shadows only if that path did not exist at the base commit (the task's own code).
    """
    found: dict[str, str] = {}
    for path in added:
        parts = PurePosixPath(path).parts
        # Walk up from the file: the first directory without __init__.py is where a sys.path entry may point.
        for depth in range(len(parts) - 1, -1, -1):
            parent = str(PurePosixPath(*parts[:depth])) if depth else ""
            if depth and is_package(parent):
                continue
            head = parts[depth]
            module = top_level_module(head) if depth == len(parts) - 1 else head.lower()
            if module in SHADOWED_NAMES:
                found[path] = str(PurePosixPath(parent, head)) if parent else head
            break
    return found


def shadowing_roots(added: list[str], has_init: set[str], base_paths: set[str]) -> frozenset[str]:
    """The added files that shadow a runner or standard-library module (``shadowing_candidates``).

    Args:
        added: repository-relative paths the patch creates (files).
        has_init: directories (repository-relative, ``""`` = the root) holding an ``__init__.py``.
        base_paths: every file path at the base commit.
    """
    base_dirs = {str(parent) for p in base_paths for parent in PurePosixPath(p).parents}
    candidates = shadowing_candidates(added, lambda d: d in has_init)
    return frozenset(path for path, module in candidates.items() if module not in base_paths | base_dirs)
