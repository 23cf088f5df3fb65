"""Start pytest for the grader: ``python swe_rl_pytest.py PYTEST_ARGS...`` in the repository copy.

``python -m pytest`` puts the working directory (the repository, which the model
patched) first on ``sys.path`` before pytest is imported, so a ``pytest/`` package,
a ``pluggy.py`` or a shadowing ``_pytest`` in the repository would run instead of
the runner. Here pytest, its start-up imports and the grader's outcome plugin are
imported with every path inside the repository removed from ``sys.path``; then the
path is what ``python -m pytest`` would give the tests (the repository first, then
``PYTHONPATH``), and modules the repository also provides (e.g. the task is
``iniconfig``, which pytest imports too) are dropped from ``sys.modules`` so the
tests import the repository's. pytest keeps the copies it imported.

Written for the grader only: standard library and pytest, no project imports.
"""

import os
import sys

# Imported before the repository is on sys.path, and never dropped afterwards.
_RUNNER = ("pytest", "_pytest", "pluggy", "swe_rl_outcomes")


def _inside(path: str, root: str) -> bool:
    real = os.path.realpath(path or os.curdir)
    return real == root or real.startswith(root + os.sep)


def _provides(entries: list, name: str) -> bool:
    for entry in entries:
        base = os.path.join(entry, name)
        if os.path.isdir(base) or any(os.path.exists(base + ext) for ext in (".py", ".pyc", ".so", ".pyd")):
            return True
    return False


def main() -> int:
    repo = os.path.realpath(os.getcwd())
    here = os.path.dirname(os.path.realpath(__file__))
    original = [p for p in sys.path if os.path.realpath(p or os.curdir) != here]
    sys.path[:] = [here] + [p for p in original if p and not _inside(p, repo)]
    import pytest  # noqa: PLC0415 - on purpose, after the path is cleaned

    import swe_rl_outcomes  # noqa: PLC0415

    repo_entries = [repo] + [p for p in original if p and _inside(p, repo)]
    sys.path[:] = repo_entries + [p for p in original if p and not _inside(p, repo)]
    for name in list(sys.modules):
        top = name.partition(".")[0]
        if top not in _RUNNER and top not in sys.stdlib_module_names and _provides(repo_entries, top):
            del sys.modules[name]
    return int(pytest.main(sys.argv[1:], plugins=[swe_rl_outcomes]))


if __name__ == "__main__":
    sys.exit(main())
