"""Pure parts of task generation: templates, edits, reproducers, diffs, splits."""

from __future__ import annotations

import pytest

from prepare.export import split_ids
from prepare.repo_builder import git_file_diff
from prepare.simple_tasks import TEMPLATES, apply_edits, bug_kinds, generate_specs, run_reproducer


def test_specs_deterministic_per_seed():
    assert generate_specs(0, 12) == generate_specs(0, 12)
    assert generate_specs(0, 12) != generate_specs(1, 12)
    # A longer run extends a shorter one: task i does not depend on num_tasks.
    assert generate_specs(3, 20)[:5] == generate_specs(3, 5)


def test_every_kind_dealt_once_per_round():
    kinds = bug_kinds()
    assert len(kinds) >= 8
    for seed in range(5):
        specs = generate_specs(seed, len(kinds))
        assert sorted(s.bug_kind for s in specs) == kinds


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda t: t.render.__name__)
def test_every_template_renders_for_many_seeds(template):
    import random

    from prepare.simple_tasks import assemble

    for seed in range(15):
        spec = assemble(template, random.Random(seed), 0)  # raises if the bug does not show
        (module_path,) = spec.fixed_files
        assert spec.base_files[module_path] != spec.fixed_files[module_path]
        assert spec.fail_to_pass and spec.pass_to_pass
        assert "@@" not in spec.base_files[module_path]


def test_apply_edits_block_inline_and_removal():
    source = "def f(x=@@D@@):\n    @@BODY@@\n    return x\n"
    edits = {"D": ("[]", "None"), "BODY": ("", "if x is None:\n    x = []")}
    assert apply_edits(source, edits, 0) == "def f(x=[]):\n    return x\n"
    assert apply_edits(source, edits, 1) == "def f(x=None):\n    if x is None:\n        x = []\n    return x\n"
    with pytest.raises(ValueError):
        apply_edits("@@MISSING@@\n", {}, 0)


def test_run_reproducer_shows_values_and_exceptions():
    module = "def f(x):\n    if x < 0:\n        raise KeyError(x)\n    return [x] * 2\n"
    assert run_reproducer(module, (), "f(3)") == "[3, 3]"
    assert run_reproducer(module, ("y = -1",), "f(y)").endswith("KeyError: -1")


def test_git_file_diff_formats():
    created = git_file_diff("tests/t.py", None, "a\nb\n")
    assert created.startswith("diff --git a/tests/t.py b/tests/t.py\nnew file mode 100644\n--- /dev/null\n")
    changed = git_file_diff("p/m.py", "x = 1\ny = 2\n", "x = 1\ny = 3\n")
    assert "--- a/p/m.py\n+++ b/p/m.py\n" in changed and "-y = 2\n+y = 3\n" in changed
    with pytest.raises(ValueError):
        git_file_diff("p/m.py", "no newline", "x\n")


def test_split_ids():
    ids = [f"t{i}" for i in range(24)]
    test = split_ids(ids, seed=0, test_fraction=0.25)
    assert len(test) == 6 and test <= set(ids)
    assert split_ids(list(reversed(ids)), seed=0, test_fraction=0.25) == test  # order does not matter
    assert split_ids(ids, seed=1, test_fraction=0.25) != test
    assert len(split_ids(["a", "b"], seed=0, test_fraction=0.1)) == 1  # both splits non-empty
    assert split_ids(ids, seed=0, test_fraction=0.0) == frozenset()
    with pytest.raises(ValueError):
        split_ids(ids, seed=0, test_fraction=1.5)
