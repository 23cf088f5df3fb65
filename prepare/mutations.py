"""AST-located, text-applied mutations of Python source: the bug injector of ``--mode smith``.

The method follows SWE-smith's procedural modifications (``swesmith/bug_gen/procedural``):
find a node in a function body with ``ast``, change it, keep the change only if tests
break. Unlike ``ast.unparse`` round trips, every mutation here is a minimal text edit at
the node's exact source span, so the rest of the file keeps its formatting and the
reference patch (the inverse edit) is a one- or two-line diff.

Operators (``Mutation.kind``):

    compare_swap      ``<``/``<=``, ``>``/``>=``, ``==``/``!=``, ``is``/``is not``, ``in``/``not in``
    bool_swap         ``and`` <-> ``or``
    off_by_one_const  an integer literal ``n`` -> ``n + 1`` or ``n - 1``
    off_by_one_slice  a slice bound ``x[a:b]`` moved by one
    negate_condition  ``if c`` / ``while c`` / ``x if c else y`` -> ``not c`` (or ``not`` removed)
    remove_statement  an assignment, call statement or ``raise`` deleted
    swap_arguments    the first two positional arguments of a call exchanged
    change_return     ``return x`` -> ``return None``; ``return True`` <-> ``return False``

This module is pure (no I/O).
"""

from __future__ import annotations

import ast
import hashlib
import re
from dataclasses import dataclass, field

MUTATION_KINDS = (
    "compare_swap",
    "bool_swap",
    "off_by_one_const",
    "off_by_one_slice",
    "negate_condition",
    "remove_statement",
    "swap_arguments",
    "change_return",
)

# compare_swap: the operator's text and its replacement (regexes need word boundaries
# for the keyword operators and must not match a prefix of a longer operator).
_COMPARE_SWAPS: dict[type[ast.cmpop], tuple[str, str]] = {
    ast.Lt: (r"<(?![=<])", "<="),
    ast.LtE: (r"<=", "<"),
    ast.Gt: (r"(?<![-])>(?![=>])", ">="),
    ast.GtE: (r">=", ">"),
    ast.Eq: (r"==", "!="),
    ast.NotEq: (r"!=", "=="),
    ast.Is: (r"\bis\b", "is not"),
    ast.IsNot: (r"\bis\s+not\b", "is"),
    ast.In: (r"\bin\b", "not in"),
    ast.NotIn: (r"\bnot\s+in\b", "in"),
}
# Expressions that need no parentheses after ``not`` or before ``+ 1``.
_ATOMS = (ast.Name, ast.Attribute, ast.Call, ast.Subscript, ast.Constant)


@dataclass(frozen=True)
class Edit:
    """Replace ``source[start:end]`` (character offsets) with ``text``."""

    start: int
    end: int
    text: str


@dataclass(frozen=True)
class Mutation:
    """One candidate bug in one file.

    Attributes:
        kind: the operator (one of ``MUTATION_KINDS``).
        path: the file, relative to the repository root.
        function: qualified name of the enclosing function (``Class.method``).
        lineno: first line (1-based) the edit touches.
        end_lineno: last line the edit touches.
        stmt_lineno: first line of the innermost statement holding the edit (the
            line coverage tools report for the whole statement).
        function_lines: (first, last) line of the enclosing function definition.
        edits: non-overlapping text edits, applied together.
        description: a short human-readable summary (for logs, never for the issue text).
    """

    kind: str
    path: str
    function: str
    lineno: int
    end_lineno: int
    stmt_lineno: int = 0
    function_lines: tuple[int, int] = (0, 0)
    edits: tuple[Edit, ...] = field(default_factory=tuple)
    description: str = ""

    @property
    def key(self) -> str:
        """A stable 10-hex-digit id of (path, kind, edits): the same mutation gets the same key."""
        text = repr((self.path, self.kind, [(e.start, e.end, e.text) for e in self.edits]))
        return hashlib.sha1(text.encode("utf-8")).hexdigest()[:10]

    def apply(self, source: str) -> str:
        """``source`` with the edits applied (edits are in offsets of ``source``)."""
        out = source
        for edit in sorted(self.edits, key=lambda e: e.start, reverse=True):
            out = out[: edit.start] + edit.text + out[edit.end :]
        return out


class _Offsets:
    """(line, UTF-8 byte column) -> character offset, as ast positions are byte columns."""

    def __init__(self, source: str) -> None:
        self.source = source
        # ast counts only \n, \r\n and \r as line ends (str.splitlines also splits on \f etc.).
        self.lines = re.findall(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+$", source)
        self.starts = [0]
        for line in self.lines:
            self.starts.append(self.starts[-1] + len(line))

    def at(self, lineno: int, col: int) -> int:
        line = self.lines[lineno - 1]
        return self.starts[lineno - 1] + len(line.encode("utf-8")[:col].decode("utf-8", errors="replace"))

    def span(self, node: ast.AST) -> tuple[int, int]:
        return self.at(node.lineno, node.col_offset), self.at(node.end_lineno, node.end_col_offset)

    def text(self, node: ast.AST) -> str:
        start, end = self.span(node)
        return self.source[start:end]


def _parenthesized(node: ast.expr, text: str) -> str:
    return text if isinstance(node, _ATOMS) else f"({text})"


def _int_value(node: ast.expr) -> int | None:
    """The value of an int literal or a negated int literal (``-1``); None otherwise."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if (
        isinstance(node, ast.UnaryOp)
        and isinstance(node.op, ast.USub)
        and isinstance(node.operand, ast.Constant)
        and type(node.operand.value) is int
    ):
        return -node.operand.value
    return None


class _Finder(ast.NodeVisitor):
    """Collects mutation sites inside function bodies (module- and class-level code is skipped:
    it runs at import, so a bug there breaks every test instead of a few)."""

    def __init__(self, source: str, path: str, seed_text: str) -> None:
        self.off = _Offsets(source)
        self.path = path
        self.seed_text = seed_text
        self.scope: list[str] = []
        self.function_depth = 0
        self.function_spans: list[tuple[int, int]] = []
        self.found: list[Mutation] = []
        self._docstrings: set[int] = set()
        self.stmt_lines: list[int] = []

    def visit(self, node: ast.AST) -> None:
        # Track the innermost statement: coverage reports a multi-line statement
        # under its first line only.
        if isinstance(node, ast.stmt):
            self.stmt_lines.append(node.lineno)
            try:
                super().visit(node)
            finally:
                self.stmt_lines.pop()
        else:
            super().visit(node)

    # -- scopes -------------------------------------------------------------------------
    def _visit_scope(self, node: ast.AST, is_function: bool) -> None:
        self.scope.append(node.name)  # type: ignore[attr-defined]
        body = getattr(node, "body", [])
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            self._docstrings.add(id(body[0]))
        if is_function:
            self.function_depth += 1
            self.function_spans.append((node.lineno, node.end_lineno))  # type: ignore[attr-defined]
            # Decorators, defaults and annotations run at definition time: skip them.
            for stmt in node.body:  # type: ignore[attr-defined]
                self._maybe_remove(stmt, node.body)  # type: ignore[attr-defined]
                self.visit(stmt)
            self.function_spans.pop()
            self.function_depth -= 1
        else:
            for stmt in body:
                self.visit(stmt)
        self.scope.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._visit_scope(node, True)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self._visit_scope(node, True)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._visit_scope(node, False)

    def visit_Lambda(self, node: ast.Lambda) -> None:
        if self.function_depth:
            self.generic_visit(node)

    # -- helpers ------------------------------------------------------------------------
    def _add(self, kind: str, node: ast.AST, edits: list[Edit], description: str, stmt_lineno: int = 0) -> None:
        if not self.function_depth or not edits:
            return
        lines = [self.off.source.count("\n", 0, e.start) + 1 for e in edits]
        end_lines = [self.off.source.count("\n", 0, max(e.start, e.end - 1)) + 1 for e in edits]
        self.found.append(
            Mutation(
                kind=kind,
                path=self.path,
                function=".".join(self.scope),
                lineno=min(lines),
                end_lineno=max(end_lines),
                stmt_lineno=stmt_lineno or (self.stmt_lines[-1] if self.stmt_lines else min(lines)),
                function_lines=self.function_spans[-1],
                edits=tuple(edits),
                description=description,
            )
        )

    def _rng_bit(self, node: ast.AST) -> bool:
        """A deterministic coin per site (no global random state): hash of path and position."""
        digest = hashlib.sha1(f"{self.seed_text}:{self.path}:{node.lineno}:{node.col_offset}".encode()).digest()
        return bool(digest[0] & 1)

    # -- operators ----------------------------------------------------------------------
    def visit_Compare(self, node: ast.Compare) -> None:
        if self.function_depth:
            left = node.left
            for op, right in zip(node.ops, node.comparators):
                swap = _COMPARE_SWAPS.get(type(op))
                if swap is None:
                    left = right
                    continue
                start = self.off.span(left)[1]
                end = self.off.span(right)[0]
                gap = self.off.source[start:end]
                match = re.search(swap[0], gap) if "#" not in gap else None
                if match is not None:
                    edit = Edit(start + match.start(), start + match.end(), swap[1])
                    self._add("compare_swap", node, [edit], f"{match.group(0)} -> {swap[1]}")
                left = right
        self.generic_visit(node)

    def visit_BoolOp(self, node: ast.BoolOp) -> None:
        if self.function_depth and len(node.values) == 2:
            word, other = ("and", "or") if isinstance(node.op, ast.And) else ("or", "and")
            start = self.off.span(node.values[0])[1]
            end = self.off.span(node.values[1])[0]
            gap = self.off.source[start:end]
            match = re.search(rf"\b{word}\b", gap) if "#" not in gap else None
            if match is not None:
                edit = Edit(start + match.start(), start + match.end(), other)
                self._add("bool_swap", node, [edit], f"{word} -> {other}")
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        if type(node.value) is int and getattr(node, "_in_slice", False) is False:
            delta = 1 if (node.value == 0 or self._rng_bit(node)) else -1
            start, end = self.off.span(node)
            self._add("off_by_one_const", node, [Edit(start, end, str(node.value + delta))], f"{node.value} -> {node.value + delta}")

    def visit_Slice(self, node: ast.Slice) -> None:
        for bound_name in ("lower", "upper"):
            bound = getattr(node, bound_name)
            if bound is None:
                continue
            start, end = self.off.span(bound)
            value = _int_value(bound)
            delta = 1 if self._rng_bit(bound) else -1
            if value is not None:
                new = str(value + delta)
                if value + delta == 0 and bound_name == "upper":
                    continue  # x[:0] is an empty slice, not an off-by-one
            else:
                new = f"{_parenthesized(bound, self.off.text(bound))} {'+' if delta > 0 else '-'} 1"
            self._add("off_by_one_slice", node, [Edit(start, end, new)], f"slice {bound_name} {self.off.text(bound)} -> {new}")
        # Constants inside slice bounds belong to off_by_one_slice only.
        for bound in (node.lower, node.upper, node.step):
            if bound is not None:
                for sub in ast.walk(bound):
                    if isinstance(sub, ast.Constant):
                        sub._in_slice = True  # type: ignore[attr-defined]
        self.generic_visit(node)

    def _negate(self, test: ast.expr, owner: ast.AST) -> None:
        start, end = self.off.span(test)
        if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
            new = self.off.text(test.operand)
            if not isinstance(test.operand, _ATOMS):
                new = f"({new})" if not new.startswith("(") else new
        else:
            new = f"not {_parenthesized(test, self.off.text(test))}"
        self._add("negate_condition", owner, [Edit(start, end, new)], f"negate {self.off.text(test)[:60]}")

    def visit_If(self, node: ast.If) -> None:
        if self.function_depth:
            self._negate(node.test, node)
        self.generic_visit(node)

    def visit_While(self, node: ast.While) -> None:
        if self.function_depth and not (isinstance(node.test, ast.Constant)):
            self._negate(node.test, node)
        self.generic_visit(node)

    def visit_IfExp(self, node: ast.IfExp) -> None:
        if self.function_depth:
            self._negate(node.test, node)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        if self.function_depth and len(node.args) >= 2:
            first, second = node.args[0], node.args[1]
            if not any(isinstance(a, ast.Starred) for a in (first, second)):
                a_text, b_text = self.off.text(first), self.off.text(second)
                if a_text != b_text:
                    (a0, a1), (b0, b1) = self.off.span(first), self.off.span(second)
                    edits = [Edit(a0, a1, b_text), Edit(b0, b1, a_text)]
                    self._add("swap_arguments", node, edits, f"swap {a_text[:30]}, {b_text[:30]}")
        self.generic_visit(node)

    def visit_Return(self, node: ast.Return) -> None:
        if self.function_depth and node.value is not None:
            value = node.value
            start, end = self.off.span(value)
            if isinstance(value, ast.Constant) and isinstance(value.value, bool):
                new = str(not value.value)
            elif isinstance(value, ast.Constant) and value.value is None:
                new = None
            else:
                new = "None"
            if new is not None:
                self._add("change_return", node, [Edit(start, end, new)], f"return {self.off.text(value)[:40]} -> {new}")
        self.generic_visit(node)

    def generic_visit(self, node: ast.AST) -> None:
        # Statement removal is decided where the statement sits in its block.
        for name in ("body", "orelse", "finalbody"):
            block = getattr(node, name, None)
            if isinstance(block, list) and block and isinstance(block[0], ast.stmt):
                for stmt in block:
                    self._maybe_remove(stmt, block)
        super().generic_visit(node)

    def _maybe_remove(self, stmt: ast.stmt, block: list[ast.stmt]) -> None:
        if not self.function_depth or id(stmt) in self._docstrings:
            return
        removable = isinstance(stmt, (ast.Assign, ast.AugAssign, ast.Raise)) or (
            isinstance(stmt, ast.AnnAssign) and stmt.value is not None
        ) or (isinstance(stmt, ast.Expr) and isinstance(stmt.value, (ast.Call, ast.Await, ast.Yield, ast.YieldFrom)))
        if not removable:
            return
        start, end = self.off.span(stmt)
        line_start = self.off.starts[stmt.lineno - 1]
        line_end = self.off.starts[stmt.end_lineno]
        before = self.off.source[line_start:start]
        after = self.off.source[end:line_end]
        # Only statements alone on their lines (no ``a = 1; b = 2``, no trailing comment).
        if before.strip() or after.strip():
            return
        if len(block) == 1:
            edit = Edit(start, end, "pass")
        else:
            edit = Edit(line_start, line_end, "")
        first_line = self.off.text(stmt).splitlines()[0]
        self._add("remove_statement", stmt, [edit], f"remove {first_line[:60]}", stmt_lineno=stmt.lineno)


def find_mutations(source: str, path: str, *, seed: int = 0) -> list[Mutation]:
    """Every mutation site in ``source`` (the file at repository path ``path``).

    Only mutations whose result parses and differs from the original AST are
    returned, so none is a pure formatting change. Order: source order per
    operator visit; callers sample from the list.

    Args:
        source: the file's text.
        path: repository-relative path, recorded in each ``Mutation``.
        seed: varies the direction of off-by-one changes.

    Raises:
        SyntaxError: ``source`` does not parse.
    """
    tree = ast.parse(source)
    finder = _Finder(source, path, f"seed{seed}")
    finder.visit(tree)
    lines = finder.off.lines
    original_dumps: dict[tuple[int, int], str | None] = {}
    out: list[Mutation] = []
    seen: set[str] = set()
    for mutation in finder.found:
        # Re-parse only the enclosing function (a whole-module parse per mutation is
        # quadratic on large modules); edits never leave the function's lines.
        first, last = mutation.function_lines
        if (first, last) not in original_dumps:
            original_dumps[(first, last)] = _dump_segment("".join(lines[first - 1 : last]))
        start = finder.off.starts[first - 1]
        end = finder.off.starts[last]
        shifted = Mutation(
            **{**mutation.__dict__, "edits": tuple(Edit(e.start - start, e.end - start, e.text) for e in mutation.edits)}
        )
        mutated = _dump_segment(shifted.apply(source[start:end]))
        if mutated is None or mutated == original_dumps[(first, last)] or mutation.key in seen:
            continue
        seen.add(mutation.key)
        out.append(mutation)
    return out


def _dump_segment(segment: str) -> str | None:
    """``ast.dump`` of a function's source lines (indented ones wrapped in ``if 1:``); None if invalid."""
    if segment[:1] in (" ", "\t"):
        segment = "if 1:\n" + segment
    try:
        return ast.dump(ast.parse(segment))
    except SyntaxError:
        return None
