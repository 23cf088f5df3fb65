"""Each mutation operator of `prepare.mutations`: what it changes, and that the edit stays minimal."""

from __future__ import annotations

import ast
import difflib

import pytest

from prepare.mutations import MUTATION_KINDS, find_mutations

SOURCE = '''\
"""Module docstring."""

TABLE = [1, 2, 3]  # module level: never mutated


def f(xs, n=3):
    """Docstring: never removed."""
    total = 0
    for i, x in enumerate(xs[1:n]):
        if x < 2 and i >= 0:
            total += max(x, i)
        elif not x:
            raise ValueError("bad")
    return total if total is not None else -1


class C:
    limit = 5  # class level: never mutated

    def ok(self):
        return True
'''


def _changed_lines(before: str, after: str) -> list[tuple[str, str]]:
    """(old line, new line) pairs of a one-hunk change."""
    diff = [d for d in difflib.ndiff(before.splitlines(), after.splitlines()) if d[:1] in "+-"]
    old = [d[2:] for d in diff if d.startswith("-")]
    new = [d[2:] for d in diff if d.startswith("+")]
    return list(zip(old, new)) if len(old) == len(new) else [(o, "") for o in old]


@pytest.fixture(scope="module")
def mutations():
    return find_mutations(SOURCE, "pkg/mod.py", seed=0)


def _by_kind(mutations, kind):
    return [m for m in mutations if m.kind == kind]


def _changes(mutations, kind):
    return [_changed_lines(SOURCE, m.apply(SOURCE)) for m in _by_kind(mutations, kind)]


def test_every_operator_finds_sites_and_edits_one_line(mutations):
    assert {m.kind for m in mutations} == set(MUTATION_KINDS)
    for m in mutations:
        mutated = m.apply(SOURCE)
        # A real change of the program (not formatting), that still parses.
        assert ast.dump(ast.parse(mutated)) != ast.dump(ast.parse(SOURCE)), m
        changes = _changed_lines(SOURCE, mutated)
        assert len(changes) == 1, (m.kind, changes)
        assert m.path == "pkg/mod.py" and m.function in {"f", "C.ok"}


def test_module_and_class_level_code_and_docstrings_are_not_mutated(mutations):
    for m in mutations:
        (old, _new), = _changed_lines(SOURCE, m.apply(SOURCE))
        assert "TABLE" not in old and "limit = 5" not in old and "Docstring" not in old


def test_compare_swap(mutations):
    changes = _changes(mutations, "compare_swap")
    assert ("        if x < 2 and i >= 0:", "        if x <= 2 and i >= 0:") in [c[0] for c in changes]
    assert ("        if x < 2 and i >= 0:", "        if x < 2 and i > 0:") in [c[0] for c in changes]
    assert (
        "    return total if total is not None else -1",
        "    return total if total is None else -1",
    ) in [c[0] for c in changes]


def test_bool_swap(mutations):
    assert _changes(mutations, "bool_swap") == [[("        if x < 2 and i >= 0:", "        if x < 2 or i >= 0:")]]


def test_off_by_one_const(mutations):
    changes = [c[0] for c in _changes(mutations, "off_by_one_const")]
    assert ("    total = 0", "    total = 1") in changes
    # The literal inside -1 moves by one (to -2 or 0), nothing else on the line changes.
    assert any(old.endswith("else -1") and new.rsplit(" ", 1)[1] in {"-2", "-0"} for old, new in changes)
    # Slice bounds belong to off_by_one_slice only.
    assert not any("xs[" in old for old, _ in changes)


def test_off_by_one_slice(mutations):
    news = sorted(c[0][1].strip() for c in _changes(mutations, "off_by_one_slice"))
    lower = {"for i, x in enumerate(xs[0:n]):", "for i, x in enumerate(xs[2:n]):"}
    upper = {"for i, x in enumerate(xs[1:n + 1]):", "for i, x in enumerate(xs[1:n - 1]):"}
    assert len(news) == 2 and news[0] in lower | upper and news[1] in lower | upper
    assert {news[0] in lower, news[1] in lower} == {True, False}


def test_negate_condition(mutations):
    changes = [c[0] for c in _changes(mutations, "negate_condition")]
    assert ("        if x < 2 and i >= 0:", "        if not (x < 2 and i >= 0):") in changes
    assert ("        elif not x:", "        elif x:") in changes  # an existing `not` is removed
    assert any("if not (total is not None) else" in new for _, new in changes)  # conditional expression


def test_remove_statement(mutations):
    removed = [c[0] for c in _changes(mutations, "remove_statement")]
    assert ("    total = 0", "") in removed
    # The only statement of a block becomes `pass`, so the file still parses.
    assert ("            total += max(x, i)", "            pass") in removed
    assert ('            raise ValueError("bad")', "            pass") in removed


def test_swap_arguments(mutations):
    changes = [c[0] for c in _changes(mutations, "swap_arguments")]
    assert ("            total += max(x, i)", "            total += max(i, x)") in changes
    assert ("    for i, x in enumerate(xs[1:n]):", "") not in changes


def test_change_return(mutations):
    changes = [c[0] for c in _changes(mutations, "change_return")]
    assert ("        return True", "        return False") in changes
    assert ("    return total if total is not None else -1", "    return None") in changes


def test_keys_are_stable_and_unique():
    first = find_mutations(SOURCE, "pkg/mod.py", seed=0)
    again = find_mutations(SOURCE, "pkg/mod.py", seed=0)
    assert [m.key for m in first] == [m.key for m in again]
    assert len({m.key for m in first}) == len(first)
    assert {m.key for m in find_mutations(SOURCE, "other.py", seed=0)}.isdisjoint(m.key for m in first)


def test_formatting_and_non_ascii_text_are_kept():
    source = 'def g(s):\n    # ünïcode comment\n    return s[ 2 : ] + "é"  # keep   me\n'
    for m in find_mutations(source, "g.py"):
        out = m.apply(source)
        assert "# ünïcode comment" in out and "# keep   me" in out, (m.kind, out)
    slices = [m.apply(source) for m in find_mutations(source, "g.py") if m.kind == "off_by_one_slice"]
    assert slices and all(out.count("\n") == source.count("\n") for out in slices)
    assert any('s[ 3 : ] + "é"' in out or 's[ 1 : ] + "é"' in out for out in slices)


def test_bad_source_raises_syntax_error():
    with pytest.raises(SyntaxError):
        find_mutations("def broken(:\n", "x.py")
