"""Every package imports only the packages below it.

The layers, top to bottom (the README's layout table):

    bench                 measures everything
    recipe                the verl recipe: agent loop, runners, trainer, rollout CLI
    prepare               task generation and validation (validates with the grader)
    reward                grading patches with hidden tests
    sandbox, model_proxy  per-rollout sandboxes; the OpenAI-compatible proxy
    core                  task schema, git and subprocess helpers

The test reads every ``import`` statement (module level or inside functions) of the
project's packages with ``ast`` and fails on any that reaches sideways or up.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RANK = {"core": 0, "sandbox": 1, "model_proxy": 1, "reward": 2, "prepare": 3, "recipe": 4, "bench": 5}


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``; relative ones resolved."""
    package = path.relative_to(ROOT).with_suffix("").parts
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level]
                module = ".".join(base + ((node.module,) if node.module else ()))
            else:
                module = node.module or ""
            out.append((node.lineno, module))
    return out


def test_every_package_imports_only_those_below_it():
    violations = []
    for package, rank in RANK.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            for line, module in _imports(path):
                top = module.split(".")[0]
                if top in RANK and top != package and RANK[top] >= rank:
                    violations.append(f"{path.relative_to(ROOT)}:{line} imports {module} ({package} -> {top})")
    assert not violations, "imports that go sideways or up:\n" + "\n".join(violations)


@pytest.mark.parametrize("package", sorted(RANK))
def test_the_ranked_packages_are_the_projects(package):
    assert (ROOT / package / "__init__.py").is_file() or package == "bench"


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    # The reader resolves relative imports and finds imports inside functions.
    module = ROOT / "core" / "_layering_probe.py"
    module.write_text("def f():\n    from sandbox import local\n    from . import task\n")
    try:
        found = _imports(module)
    finally:
        module.unlink()
    assert (2, "sandbox") in found and (3, "core") in found
