"""Synthetic bug-fix tasks: small self-contained Python packages with one known bug each.

Each template writes one module with a marked bug site, the visible tests (they
pass on the buggy code), the hidden tests (some fail on it) and an issue text.
Names, constants and data vary with a ``random.Random`` seeded per task, so a
seed gives the same tasks byte for byte. The issue's "actual"/"expected" outputs
are computed by running the reproducer against the buggy and the fixed module,
so they cannot drift from the code.

This module is pure (no I/O); ``prepare.repo_builder`` turns a ``TaskSpec`` into
a git repository and an ``SWETask``.
"""

from __future__ import annotations

import ast
import random
import string
import textwrap
from collections.abc import Callable
from dataclasses import dataclass

DATA_SOURCE = "swe_simple"
PACKAGE_VERSION = "0.1.0"


@dataclass(frozen=True)
class Issue:
    """What the user reports: a title, the symptom and a reproducer.

    The reproducer is ``from <pkg> import <imports>``, then ``setup`` statements,
    then ``print(<expr>)``; its output on the buggy and fixed code is computed.
    """

    title: str
    summary: str
    imports: tuple[str, ...]
    setup: tuple[str, ...]
    expr: str
    expectation: str


@dataclass(frozen=True)
class BugCase:
    """One rendered template before assembly into a repository.

    ``source`` holds ``@@NAME@@`` markers; ``edits[NAME] = (buggy, fixed)`` says
    what each becomes (see ``apply_edits``). ``hidden_failing`` names the hidden
    test functions that fail on the buggy code; the other hidden tests pass on both.
    """

    kind: str
    module: str
    exports: tuple[str, ...]
    description: str
    source: str
    edits: dict[str, tuple[str, str]]
    visible_tests: str
    hidden_tests: str
    hidden_failing: frozenset[str]
    issue: Issue


@dataclass(frozen=True)
class TaskSpec:
    """Everything needed to build one task repository and its SWE-bench record.

    Attributes:
        instance_id: ``simple__<package>-<index>``.
        package: the Python package name (also the repo name ``swe-simple/<package>``).
        bug_kind: the bug's kind (``Template.kind``).
        problem_statement: the issue text shown to the agent.
        base_files: repository path -> content at ``base_commit`` (buggy code,
            visible tests, README, pyproject.toml, .gitignore).
        fixed_files: repository path -> fixed content, for the files the fix changes.
        hidden_test_files: repository path -> content of the hidden tests.
        fail_to_pass / pass_to_pass: pytest node ids.
    """

    instance_id: str
    package: str
    bug_kind: str
    problem_statement: str
    base_files: dict[str, str]
    fixed_files: dict[str, str]
    hidden_test_files: dict[str, str]
    fail_to_pass: tuple[str, ...]
    pass_to_pass: tuple[str, ...]


@dataclass(frozen=True)
class Template:
    """A bug template: its kind, the package names it may use, and its renderer."""

    kind: str
    packages: tuple[str, ...]
    render: Callable[[random.Random, str], BugCase]


def code(template: str, **values: object) -> str:
    """Dedent ``template`` and substitute ``$name`` placeholders (``string.Template``)."""
    text = textwrap.dedent(template).lstrip("\n")
    return string.Template(text).substitute({k: str(v) for k, v in values.items()})


def apply_edits(source: str, edits: dict[str, tuple[str, str]], which: int) -> str:
    """Replace every ``@@NAME@@`` marker with ``edits[NAME][which]`` (0 buggy, 1 fixed).

    A marker alone on its line is replaced by the text's lines, each indented like
    the marker (an empty text removes the line); a marker inside a line is
    replaced in place.

    Raises:
        ValueError: a marker has no edit or is left over (template bug).
    """
    out: list[str] = []
    for line in source.splitlines(keepends=True):
        stripped = line.strip()
        if stripped.startswith("@@") and stripped.endswith("@@") and stripped.count("@@") == 2:
            name = stripped[2:-2]
            if name not in edits:
                raise ValueError(f"no edit for marker {name}")
            indent = line[: len(line) - len(line.lstrip())]
            out.extend(indent + part + "\n" for part in edits[name][which].splitlines())
            continue
        for name, pair in edits.items():
            line = line.replace(f"@@{name}@@", pair[which])
        out.append(line)
    text = "".join(out)
    if "@@" in text:
        raise ValueError("unreplaced marker in template source")
    return text


def test_names(test_source: str) -> list[str]:
    """Module-level ``test*`` function names of a test file, in file order."""
    tree = ast.parse(test_source)
    return [node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test")]


def run_reproducer(module_source: str, setup: tuple[str, ...], expr: str) -> str:
    """What ``print(expr)`` shows after ``setup``, with the module's names in scope.

    An exception is shown the way the interpreter reports it (last line of the
    traceback), which is what a user pastes into an issue.
    """
    namespace: dict[str, object] = {"__name__": "reproducer"}
    try:
        exec(compile(module_source, "<module>", "exec"), namespace)
        for statement in setup:
            exec(statement, namespace)
        return str(eval(expr, namespace))
    except Exception as exc:  # the reproducer's point may be an exception
        message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return "Traceback (most recent call last):\n  ...\n" + message


# ---------------------------------------------------------------- templates


def _rolling_mean(rng: random.Random, pkg: str) -> BugCase:
    mean = rng.choice(["mean", "average", "arith_mean"])
    rolling = rng.choice(["rolling_mean", "moving_average", "window_means"])
    diffs = rng.choice(["deltas", "differences", "step_changes"])
    values = [rng.randint(1, 40) for _ in range(rng.randint(5, 7))]
    window = rng.randint(2, 3)

    def expect(vals: list[int], w: int) -> list[float]:
        return [sum(vals[i : i + w]) / w for i in range(len(vals) - w + 1)]

    a, b = rng.randint(1, 20), rng.randint(21, 40)
    names = dict(pkg=pkg, mean=mean, rolling=rolling, diffs=diffs)
    source = code(
        '''
        """Rolling statistics over numeric series."""


        def $mean(values):
            """Arithmetic mean of a non-empty sequence of numbers."""
            if not values:
                raise ValueError("$mean() of an empty sequence")
            return sum(values) / len(values)


        def $rolling(values, window):
            """Mean of every run of ``window`` consecutive values, in order.

            A series of ``n`` values has ``n - window + 1`` such runs (none when
            ``window > n``).
            """
            if window < 1:
                raise ValueError("window must be at least 1")
            means = []
            @@RANGE@@
                means.append($mean(values[start:start + window]))
            return means


        def $diffs(values):
            """Differences between consecutive values (one fewer than the input)."""
            return [b - a for a, b in zip(values, values[1:])]
        ''',
        **names,
    )
    visible = code(
        """
        import pytest

        from $pkg import $diffs, $mean, $rolling


        def test_${mean}_of_values():
            assert $mean([2, 4, 9]) == 5


        def test_${mean}_rejects_empty():
            with pytest.raises(ValueError):
                $mean([])


        def test_${diffs}():
            assert $diffs([3, 5, 4, 10]) == [2, -1, 6]


        def test_${rolling}_window_longer_than_series():
            assert $rolling([1, 2], 5) == []


        def test_${rolling}_rejects_zero_window():
            with pytest.raises(ValueError):
                $rolling([1, 2, 3], 0)
        """,
        **names,
    )
    hidden = code(
        """
        from $pkg import $rolling


        def test_${rolling}_covers_last_window():
            assert $rolling($values, $window) == $expected


        def test_${rolling}_window_equal_to_length():
            assert $rolling([$a, $b], 2) == [$ab]


        def test_${rolling}_empty_series():
            assert $rolling([], 2) == []
        """,
        values=values,
        window=window,
        expected=expect(values, window),
        a=a,
        b=b,
        ab=(a + b) / 2,
        **names,
    )
    n = len(values)
    return BugCase(
        kind="off_by_one",
        module="rolling",
        exports=(diffs, mean, rolling),
        description="Rolling statistics (means, differences) over numeric series.",
        source=source,
        edits={
            "RANGE": (
                "for start in range(len(values) - window):",
                "for start in range(len(values) - window + 1):",
            )
        },
        visible_tests=visible,
        hidden_tests=hidden,
        hidden_failing=frozenset({f"test_{rolling}_covers_last_window", f"test_{rolling}_window_equal_to_length"}),
        issue=Issue(
            title=rng.choice([f"`{rolling}` drops the last window", f"{rolling}() returns one value too few"]),
            summary=(
                f"I'm computing a {window}-point `{rolling}` over a short series and the result is "
                f"missing the final window: for {n} values I expected {n - window + 1} means."
            ),
            imports=(rolling,),
            setup=(),
            expr=f"{rolling}({values}, {window})",
            expectation="The docstring says a series of n values has n - window + 1 windows, so the last "
            "window (ending at the final value) should be included.",
        ),
    )


_SENTENCES = (
    "The quick brown fox jumps over the lazy dog",
    "Release notes for the spring update are available",
    "Please remember to water the plants on Friday",
    "Meeting moved to the large conference room upstairs",
    "Deployment finished without errors on all servers",
)


def _truncate(rng: random.Random, pkg: str) -> BugCase:
    truncate = rng.choice(["truncate", "shorten", "clip_text"])
    slug = rng.choice(["slugify", "make_slug", "to_slug"])
    words = rng.choice(["word_count", "count_words", "n_words"])
    suffix = rng.choice(["...", "~", "..", ">>"])
    text = rng.choice(_SENTENCES)
    limit = rng.randint(len(suffix) + 6, len(text) - 5)
    names = dict(pkg=pkg, truncate=truncate, slug=slug, words=words, suffix=suffix)
    source = code(
        '''
        """Small text helpers."""


        def $truncate(text, limit, suffix="$suffix"):
            """Shorten ``text`` to at most ``limit`` characters.

            Text that fits is returned unchanged. Longer text is cut and ends with
            ``suffix``; the result is then exactly ``limit`` characters long.
            """
            if limit < len(suffix):
                raise ValueError("limit is shorter than the suffix")
            if len(text) <= limit:
                return text
            @@CUT@@


        def $words(text):
            """Number of whitespace-separated words."""
            return len(text.split())


        def $slug(text):
            """Lower-case words joined by hyphens."""
            return "-".join(text.lower().split())
        ''',
        **names,
    )
    visible = code(
        """
        import pytest

        from $pkg import $slug, $truncate, $words


        def test_${truncate}_keeps_short_text():
            assert $truncate("short", 10) == "short"


        def test_${truncate}_adds_suffix():
            assert $truncate("a fairly long sentence", 10).endswith("$suffix")


        def test_${truncate}_rejects_limit_below_suffix():
            with pytest.raises(ValueError):
                $truncate("abcdef", len("$suffix") - 1)


        def test_${words}():
            assert $words("  two   words ") == 2


        def test_${slug}():
            assert $slug("Hello Big World") == "hello-big-world"
        """,
        **names,
    )
    hidden = code(
        """
        from $pkg import $truncate


        def test_${truncate}_result_has_exact_limit():
            assert len($truncate($text, $limit)) == $limit


        def test_${truncate}_exact_output():
            assert $truncate($text, $limit) == $expected


        def test_${truncate}_text_at_limit_unchanged():
            assert $truncate("x" * $limit, $limit) == "x" * $limit
        """,
        text=repr(text),
        limit=limit,
        expected=repr(text[: limit - len(suffix)] + suffix),
        **names,
    )
    return BugCase(
        kind="off_by_one",
        module="text",
        exports=(slug, truncate, words),
        description="Small text helpers: truncation, word counts and slugs.",
        source=source,
        edits={
            "CUT": (
                "return text[: limit - len(suffix) - 1] + suffix",
                "return text[: limit - len(suffix)] + suffix",
            )
        },
        visible_tests=visible,
        hidden_tests=hidden,
        hidden_failing=frozenset({f"test_{truncate}_result_has_exact_limit", f"test_{truncate}_exact_output"}),
        issue=Issue(
            title=rng.choice(
                [f"`{truncate}()` output is one character shorter than the limit", f"{truncate} off by one"]
            ),
            summary=(
                f"We use `{truncate}` to fit titles into a fixed-width column of {limit} characters, "
                "but every truncated title comes out one character short, so the column looks ragged."
            ),
            imports=(truncate,),
            setup=(f"short = {truncate}({text!r}, {limit})",),
            expr="(short, len(short))",
            expectation=f"Per the docstring a truncated result should be exactly `limit` ({limit}) characters long.",
        ),
    )


def _restock(rng: random.Random, pkg: str) -> BugCase:
    item = rng.choice(["Item", "StockItem", "Product"])
    needs = rng.choice(["needs_restock", "should_reorder", "is_low_stock"])
    report = rng.choice(["restock_list", "reorder_report", "low_stock_skus"])
    total = rng.choice(["total_units", "units_on_hand", "stock_count"])
    level = rng.randint(3, 9)
    sku = f"SKU-{rng.randint(1000, 9999)}"
    names = dict(pkg=pkg, Item=item, needs=needs, report=report, total=total, level=level, sku=sku)
    source = code(
        '''
        """Stock levels and reorder decisions."""


        class $Item:
            """A stocked product: its SKU, units on hand and reorder level."""

            def __init__(self, sku, quantity, reorder_level=$level):
                if quantity < 0:
                    raise ValueError("quantity cannot be negative")
                self.sku = sku
                self.quantity = quantity
                self.reorder_level = reorder_level

            def __repr__(self):
                return f"$Item({self.sku!r}, quantity={self.quantity}, reorder_level={self.reorder_level})"


        def $needs(item):
            """True when the item's quantity is at or below its reorder level."""
            @@CMP@@


        def $report(items):
            """Sorted SKUs of the items that need restocking."""
            return sorted(item.sku for item in items if $needs(item))


        def $total(items):
            """Units on hand across all items."""
            return sum(item.quantity for item in items)
        ''',
        **names,
    )
    visible = code(
        """
        import pytest

        from $pkg import $Item, $needs, $total


        def test_${total}():
            assert $total([$Item("a", 3), $Item("b", 4)]) == 7


        def test_${needs}_below_level():
            assert $needs($Item("a", 0, reorder_level=5))


        def test_${needs}_above_level():
            assert not $needs($Item("a", 9, reorder_level=5))


        def test_negative_quantity_rejected():
            with pytest.raises(ValueError):
                $Item("a", -1)
        """,
        **names,
    )
    hidden = code(
        """
        from $pkg import $Item, $needs, $report


        def test_${needs}_at_exact_level():
            assert $needs($Item("$sku", $level, reorder_level=$level))


        def test_${report}_includes_items_at_level():
            items = [
                $Item("c", 1, reorder_level=2),
                $Item("a", $level, reorder_level=$level),
                $Item("b", $level + 5, reorder_level=$level),
            ]
            assert $report(items) == ["a", "c"]


        def test_${report}_empty():
            assert $report([]) == []
        """,
        **names,
    )
    return BugCase(
        kind="wrong_comparison",
        module="stock",
        exports=(item, needs, report, total),
        description="Stock levels and reorder decisions for a small shop.",
        source=source,
        edits={"CMP": ("return item.quantity < item.reorder_level", "return item.quantity <= item.reorder_level")},
        visible_tests=visible,
        hidden_tests=hidden,
        hidden_failing=frozenset({f"test_{needs}_at_exact_level", f"test_{report}_includes_items_at_level"}),
        issue=Issue(
            title=rng.choice(
                [
                    f"Items exactly at their reorder level are not flagged by `{needs}`",
                    f"{needs}() misses products sitting at the reorder level",
                ]
            ),
            summary=(
                f"Our nightly reorder report skipped {sku} although its stock had dropped to the reorder "
                f"level ({level}); it only shows up once it goes below."
            ),
            imports=(item, needs),
            setup=(f"item = {item}({sku!r}, quantity={level}, reorder_level={level})",),
            expr=f"{needs}(item)",
            expectation="The docstring says an item needs restocking when its quantity is *at or below* "
            "the reorder level.",
        ),
    )


def _within(rng: random.Random, pkg: str) -> BugCase:
    within = rng.choice(["in_range", "within", "is_between"])
    clamp = rng.choice(["clamp", "bound", "limit_to"])
    span = rng.choice(["span", "range_width", "interval_width"])
    low = rng.randint(-10, 10)
    high = low + rng.randint(3, 12)
    names = dict(pkg=pkg, within=within, clamp=clamp, span=span, low=low, high=high)
    source = code(
        '''
        """Closed numeric intervals."""


        def $within(value, low, high):
            """True when ``low <= value <= high``; both ends are included."""
            if low > high:
                raise ValueError("low must not exceed high")
            @@CMP@@


        def $clamp(value, low, high):
            """``value`` limited to the closed interval [low, high]."""
            if low > high:
                raise ValueError("low must not exceed high")
            return max(low, min(value, high))


        def $span(low, high):
            """Width of the interval [low, high]."""
            return high - low
        ''',
        **names,
    )
    visible = code(
        """
        import pytest

        from $pkg import $clamp, $span, $within


        def test_${within}_middle():
            assert $within(5, 0, 10)


        def test_${within}_low_end_included():
            assert $within(0, 0, 10)


        def test_${within}_below():
            assert not $within(-1, 0, 10)


        def test_${within}_rejects_reversed_bounds():
            with pytest.raises(ValueError):
                $within(1, 5, 2)


        def test_${clamp}():
            assert [$clamp(v, 0, 10) for v in (-5, 5, 15)] == [0, 5, 10]


        def test_${span}():
            assert $span(3, 10) == 7
        """,
        **names,
    )
    hidden = code(
        """
        from $pkg import $within


        def test_${within}_high_end_included():
            assert $within($high, $low, $high)


        def test_${within}_every_integer_in_interval():
            values = list(range($low, $high + 1))
            assert [v for v in values if $within(v, $low, $high)] == values


        def test_${within}_above():
            assert not $within($above, $low, $high)
        """,
        above=high + 1,
        **names,
    )
    return BugCase(
        kind="wrong_comparison",
        module="intervals",
        exports=(clamp, span, within),
        description="Helpers for closed numeric intervals.",
        source=source,
        edits={"CMP": ("return low <= value < high", "return low <= value <= high")},
        visible_tests=visible,
        hidden_tests=hidden,
        hidden_failing=frozenset({f"test_{within}_high_end_included", f"test_{within}_every_integer_in_interval"}),
        issue=Issue(
            title=rng.choice([f"`{within}` excludes the upper bound", f"{within}(high, low, high) is False"]),
            summary=(
                f"Validating a setting that must lie in [{low}, {high}], the value {high} is rejected, "
                f"although {low} is accepted."
            ),
            imports=(within,),
            setup=(),
            expr=f"{within}({high}, {low}, {high})",
            expectation="The docstring says both ends of the interval are included.",
        ),
    )


def _username(rng: random.Random, pkg: str) -> BugCase:
    valid = rng.choice(["is_valid_username", "valid_handle", "check_username"])
    norm = rng.choice(["normalize", "canonical", "clean_username"])
    min_len = rng.randint(3, 4)
    max_len = rng.randint(12, 16)
    bad = rng.choice(["john doe!", "hello world", "root;rm"])
    names = dict(pkg=pkg, valid=valid, norm=norm, min=min_len, max=max_len)
    source = code(
        '''
        """Username rules for sign-up."""

        MIN_LENGTH = $min
        MAX_LENGTH = $max


        def _allowed_chars(name):
            return all(ch.isalnum() or ch == "_" for ch in name)


        def $valid(name):
            """True when ``name`` is MIN_LENGTH to MAX_LENGTH characters long and uses
            only letters, digits and underscores."""
            @@COND@@


        def $norm(name):
            """Lower-cased name without surrounding whitespace."""
            return name.strip().lower()
        ''',
        **names,
    )
    visible = code(
        """
        from $pkg import $norm, $valid


        def test_${valid}_accepts_plain_name():
            assert $valid("alice_99")


        def test_${valid}_rejects_short_name_with_symbols():
            assert not $valid("a!")


        def test_${norm}():
            assert $norm("  Alice ") == "alice"
        """,
        **names,
    )
    hidden = code(
        """
        from $pkg import $valid


        def test_${valid}_rejects_too_long():
            assert not $valid("x" * ($max + 1))


        def test_${valid}_rejects_symbols():
            assert not $valid($bad)


        def test_${valid}_rejects_too_short():
            assert not $valid("a" * ($min - 1))


        def test_${valid}_accepts_underscores():
            assert $valid("bob_smith")
        """,
        bad=repr(bad),
        **names,
    )
    return BugCase(
        kind="wrong_boolean_operator",
        module="usernames",
        exports=(norm, valid),
        description="Username validation rules for a sign-up form.",
        source=source,
        edits={
            "COND": (
                "return MIN_LENGTH <= len(name) <= MAX_LENGTH or _allowed_chars(name)",
                "return MIN_LENGTH <= len(name) <= MAX_LENGTH and _allowed_chars(name)",
            )
        },
        visible_tests=visible,
        hidden_tests=hidden,
        hidden_failing=frozenset(
            {f"test_{valid}_rejects_too_long", f"test_{valid}_rejects_symbols", f"test_{valid}_rejects_too_short"}
        ),
        issue=Issue(
            title=rng.choice(
                ["Sign-up accepts usernames with spaces and punctuation", f"`{valid}` lets invalid names through"]
            ),
            summary=f"A user managed to register as {bad!r}. I checked `{valid}` directly and it accepts it.",
            imports=(valid,),
            setup=(),
            expr=f"{valid}({bad!r})",
            expectation=f"Usernames must be {min_len}-{max_len} characters long *and* use only letters, digits "
            "and underscores, as the docstring says; names that are too long or too short pass too.",
        ),
    )


_FILE_NAMES = ("README.md", "setup.py", "notes.txt", "main.c", "photo.jpg", "Makefile", "data.csv")
_DOT_NAMES = (".git", ".env", ".bashrc", ".cache", ".DS_Store")


def _listing(rng: random.Random, pkg: str) -> BugCase:
    vis = rng.choice(["visible_entries", "list_visible", "shown_names"])
    ext = rng.choice(["extension", "file_ext", "suffix_of"])
    sort = rng.choice(["sort_names", "natural_order", "sorted_listing"])
    plain = rng.sample(_FILE_NAMES, 3)
    dots = rng.sample(_DOT_NAMES, 2)
    names_list = plain + dots
    rng.shuffle(names_list)
    expected = [n for n in names_list if not n.startswith(".")]
    names = dict(pkg=pkg, vis=vis, ext=ext, sort=sort)
    source = code(
        '''
        """Directory listing helpers (names only, no filesystem access)."""


        def $vis(names, include_hidden=False):
            """Names to show in a listing, in their original order.

            Hidden entries (names starting with ".") are left out unless
            ``include_hidden`` is true.
            """
            return [name for name in names if @@COND@@]


        def $ext(name):
            """Extension without the dot ("" when there is none; a dotfile has none)."""
            base = name.lstrip(".")
            return base.rsplit(".", 1)[1] if "." in base else ""


        def $sort(names):
            """Names sorted case-insensitively."""
            return sorted(names, key=str.lower)
        ''',
        **names,
    )
    visible = code(
        """
        from $pkg import $ext, $sort, $vis


        def test_${vis}_include_hidden_keeps_everything():
            names = ["a.txt", ".git", "b"]
            assert $vis(names, include_hidden=True) == names


        def test_${ext}():
            assert [$ext(n) for n in ("archive.tar.gz", ".bashrc", "README")] == ["gz", "", ""]


        def test_${sort}():
            assert $sort(["b", "A", "c"]) == ["A", "b", "c"]
        """,
        **names,
    )
    hidden = code(
        """
        from $pkg import $vis


        def test_${vis}_hides_dotfiles_by_default():
            assert $vis($names_list) == $expected


        def test_${vis}_only_hidden_entries():
            assert $vis([".git", ".env"]) == []


        def test_${vis}_empty():
            assert $vis([]) == []
        """,
        names_list=names_list,
        expected=expected,
        **names,
    )
    return BugCase(
        kind="negated_condition",
        module="listing",
        exports=(ext, sort, vis),
        description="Helpers for showing directory listings.",
        source=source,
        edits={"COND": ('include_hidden or name.startswith(".")', 'include_hidden or not name.startswith(".")')},
        visible_tests=visible,
        hidden_tests=hidden,
        hidden_failing=frozenset({f"test_{vis}_hides_dotfiles_by_default", f"test_{vis}_only_hidden_entries"}),
        issue=Issue(
            title=rng.choice(
                [f"`{vis}` shows only the hidden files", "Default listing returns dotfiles instead of files"]
            ),
            summary=f"With the default arguments `{vis}` returns exactly the entries it should hide.",
            imports=(vis,),
            setup=(),
            expr=f"{vis}({names_list})",
            expectation="By default, names starting with a dot should be left out and everything else kept, "
            "in order.",
        ),
    )


def _bbox(rng: random.Random, pkg: str) -> BugCase:
    bbox = rng.choice(["bounding_box", "bbox", "extent"])
    centroid = rng.choice(["centroid", "center_of", "mean_point"])
    shift = rng.choice(["translate", "shift", "offset_points"])
    while True:
        points = [(rng.randint(-20, 20), rng.randint(-20, 20)) for _ in range(4)]
        xs, ys = [x for x, _ in points], [y for _, y in points]
        if max(xs) != max(ys):
            break
    expected = (min(xs), min(ys), max(xs), max(ys))
    px, py = rng.randint(1, 9), rng.randint(10, 19)
    names = dict(pkg=pkg, bbox=bbox, centroid=centroid, shift=shift)
    source = code(
        '''
        """2-D point helpers; a point is an (x, y) tuple."""


        def $bbox(points):
            """Smallest axis-aligned box around the points, as (min_x, min_y, max_x, max_y)."""
            if not points:
                raise ValueError("no points")
            xs = [x for x, _ in points]
            ys = [y for _, y in points]
            @@RET@@


        def $centroid(points):
            """Mean of the points."""
            if not points:
                raise ValueError("no points")
            n = len(points)
            return (sum(x for x, _ in points) / n, sum(y for _, y in points) / n)


        def $shift(points, dx, dy):
            """The points moved by (dx, dy)."""
            return [(x + dx, y + dy) for x, y in points]
        ''',
        **names,
    )
    visible = code(
        """
        import pytest

        from $pkg import $bbox, $centroid, $shift


        def test_${bbox}_of_square():
            assert $bbox([(0, 0), (3, 3), (1, 2)]) == (0, 0, 3, 3)


        def test_${bbox}_rejects_empty():
            with pytest.raises(ValueError):
                $bbox([])


        def test_${centroid}():
            assert $centroid([(0, 0), (4, 2)]) == (2.0, 1.0)


        def test_${shift}():
            assert $shift([(1, 1)], 2, -3) == [(3, -2)]
        """,
        **names,
    )
    hidden = code(
        """
        from $pkg import $bbox


        def test_${bbox}_of_scattered_points():
            assert $bbox($points) == $expected


        def test_${bbox}_of_single_point():
            assert $bbox([($px, $py)]) == ($px, $py, $px, $py)


        def test_${bbox}_of_diagonal_points():
            assert $bbox([(2, 2), (5, 5)]) == (2, 2, 5, 5)
        """,
        points=points,
        expected=expected,
        px=px,
        py=py,
        **names,
    )
    return BugCase(
        kind="wrong_return_value",
        module="points",
        exports=(bbox, centroid, shift),
        description="Helpers for 2-D points: bounding boxes, centroids, translation.",
        source=source,
        edits={
            "RET": ("return (min(xs), min(ys), max(xs), max(xs))", "return (min(xs), min(ys), max(xs), max(ys))")
        },
        visible_tests=visible,
        hidden_tests=hidden,
        hidden_failing=frozenset({f"test_{bbox}_of_scattered_points", f"test_{bbox}_of_single_point"}),
        issue=Issue(
            title=rng.choice([f"`{bbox}` returns a wrong max_y", f"{bbox}() box is clipped vertically"]),
            summary=f"Boxes drawn from `{bbox}` are cut off or too tall; the last coordinate looks wrong.",
            imports=(bbox,),
            setup=(),
            expr=f"{bbox}({points})",
            expectation="The result should be (min_x, min_y, max_x, max_y) of the points.",
        ),
    )


def _ledger(rng: random.Random, pkg: str) -> BugCase:
    running = rng.choice(["running_balance", "balances", "cumulative_totals"])
    total = rng.choice(["net_total", "sum_amounts", "net_change"])
    fmt = rng.choice(["format_cents", "as_money", "cents_to_str"])
    amounts = [rng.choice([-1, 1]) * rng.randint(100, 5000) for _ in range(4)]
    opening = rng.randint(0, 20) * 100
    expected, balance = [], opening
    for amount in amounts:
        balance += amount
        expected.append(balance)
    single = rng.randint(1, 999)
    names = dict(pkg=pkg, running=running, total=total, fmt=fmt)
    source = code(
        '''
        """Ledger arithmetic on integer amounts in cents."""


        def $running(amounts, opening=0):
            """Balance after each amount is applied in turn, starting from ``opening``."""
            balance = opening
            history = []
            for amount in amounts:
                @@ACC@@
                history.append(balance)
            return history


        def $total(amounts):
            """Net change of all amounts."""
            return sum(amounts)


        def $fmt(cents):
            """Amount in cents as a string with two decimals, e.g. -1050 -> "-10.50"."""
            sign = "-" if cents < 0 else ""
            return f"{sign}{abs(cents) // 100}.{abs(cents) % 100:02d}"
        ''',
        **names,
    )
    visible = code(
        """
        from $pkg import $fmt, $running, $total


        def test_${running}_no_amounts():
            assert $running([]) == []


        def test_${running}_zero_amounts_keep_opening():
            assert $running([0, 0], opening=500) == [500, 500]


        def test_${total}():
            assert $total([100, -30, 5]) == 75


        def test_${fmt}():
            assert [$fmt(-1050), $fmt(7)] == ["-10.50", "0.07"]
        """,
        **names,
    )
    hidden = code(
        """
        from $pkg import $running


        def test_${running}_accumulates():
            assert $running($amounts, opening=$opening) == $expected


        def test_${running}_single_amount():
            assert $running([$single]) == [$single]


        def test_${running}_empty_with_opening():
            assert $running([], opening=100) == []
        """,
        amounts=amounts,
        opening=opening,
        expected=expected,
        single=single,
        **names,
    )
    return BugCase(
        kind="missing_statement",
        module="ledger",
        exports=(fmt, running, total),
        description="Ledger arithmetic on amounts in cents.",
        source=source,
        edits={"ACC": ("", "balance += amount")},
        visible_tests=visible,
        hidden_tests=hidden,
        hidden_failing=frozenset({f"test_{running}_accumulates", f"test_{running}_single_amount"}),
        issue=Issue(
            title=rng.choice([f"`{running}` never changes the balance", f"{running}() ignores the amounts"]),
            summary=f"The balance column of our statement stays at the opening balance for every row. "
            f"`{running}` seems to ignore the amounts.",
            imports=(running,),
            setup=(),
            expr=f"{running}({amounts}, opening={opening})",
            expectation="Each entry should be the balance after applying that amount.",
        ),
    )


_SETTINGS = (
    ("name", "demo"),
    ("host", "localhost"),
    ("port", "8080"),
    ("mode", "fast"),
    ("user", "admin"),
    ("theme", "dark"),
    ("region", "eu-west"),
    ("level", "debug"),
)


def _settings(rng: random.Random, pkg: str) -> BugCase:
    parse = rng.choice(["parse_config", "load_settings", "read_pairs"])
    dump = rng.choice(["dump_config", "format_settings", "write_pairs"])
    pairs = rng.sample(_SETTINGS, 2)
    keys = [key for key, _ in pairs]
    values = [value for _, value in pairs]
    text = f"{keys[0]} = {values[0]}\n{keys[1]} ={values[1]}\n"
    expected = {keys[0]: values[0], keys[1]: values[1]}
    names = dict(pkg=pkg, parse=parse, dump=dump)
    source = code(
        '''
        """Read and write simple ``key = value`` settings files."""


        def $parse(text):
            """Parse settings text into a dict of strings.

            One ``key = value`` pair per line; blank lines and lines starting with
            "#" are ignored, and whitespace around keys and values is not significant.
            """
            settings = {}
            for lineno, raw in enumerate(text.splitlines(), start=1):
                line = raw.strip()
                if not line or line.startswith("#"):
                    continue
                key, sep, value = line.partition("=")
                if not sep:
                    raise ValueError(f"line {lineno}: expected key = value")
                @@STRIP@@
                settings[key.strip()] = value
            return settings


        def $dump(settings):
            """Settings as text, one ``key=value`` per line, keys sorted."""
            return "".join(f"{key}={settings[key]}\\n" for key in sorted(settings))
        ''',
        **names,
    )
    visible = code(
        """
        import pytest

        from $pkg import $dump, $parse


        def test_${parse}_compact_pairs():
            assert $parse("a=1\\nb=two\\n") == {"a": "1", "b": "two"}


        def test_${parse}_skips_comments_and_blank_lines():
            assert $parse("# comment\\n\\nx=1\\n") == {"x": "1"}


        def test_${parse}_rejects_line_without_equals():
            with pytest.raises(ValueError):
                $parse("novalue")


        def test_${dump}_round_trip():
            settings = {"b": "2", "a": "1"}
            assert $dump(settings) == "a=1\\nb=2\\n"
            assert $parse($dump(settings)) == settings
        """,
        **names,
    )
    hidden = code(
        """
        from $pkg import $parse


        def test_${parse}_strips_spaces_around_values():
            assert $parse($text) == $expected


        def test_${parse}_spaced_equals():
            assert $parse("  $key  =  $value  ") == {"$key": "$value"}


        def test_${parse}_empty_text():
            assert $parse("") == {}
        """,
        text=repr(text),
        expected=expected,
        key=keys[1],
        value=values[1],
        **names,
    )
    return BugCase(
        kind="missing_statement",
        module="settings",
        exports=(dump, parse),
        description="Read and write simple key = value settings files.",
        source=source,
        edits={"STRIP": ("", "value = value.strip()")},
        visible_tests=visible,
        hidden_tests=hidden,
        hidden_failing=frozenset({f"test_{parse}_strips_spaces_around_values", f"test_{parse}_spaced_equals"}),
        issue=Issue(
            title=rng.choice([f"`{parse}` keeps a leading space in values", "Values parsed with surrounding spaces"]),
            summary=f"Settings written as `key = value` (with spaces, as in our docs) come back from "
            f"`{parse}` with a leading space, so comparisons like `settings[{keys[0]!r}] == {values[0]!r}` fail.",
            imports=(parse,),
            setup=(),
            expr=f"{parse}({text!r})",
            expectation="Whitespace around keys and values should not be significant, per the docstring.",
        ),
    )


def _units(rng: random.Random, pkg: str) -> BugCase:
    convert = rng.choice(["convert", "convert_length", "change_unit"])
    to_m = rng.choice(["to_metres", "in_metres", "as_metres"])
    total = rng.choice(["total_length", "sum_lengths", "combined_length"])
    km = rng.randint(2, 9)
    a, b = rng.randint(1, 5), rng.randint(10, 900)
    names = dict(pkg=pkg, convert=convert, to_m=to_m, total=total)
    source = code(
        '''
        """Length conversions between metric units."""

        _METRES_PER_UNIT = {"mm": 0.001, "cm": 0.01, "m": 1.0, "km": 1000.0}


        def $convert(value, from_unit, to_unit):
            """``value`` given in ``from_unit``, expressed in ``to_unit``."""
            try:
                return value * _METRES_PER_UNIT[from_unit] / _METRES_PER_UNIT[to_unit]
            except KeyError as exc:
                raise ValueError(f"unknown unit: {exc.args[0]}") from None


        def $to_m(value, unit):
            """``value`` given in ``unit``, expressed in metres."""
            @@CALL@@


        def $total(lengths):
            """Sum of (value, unit) pairs, in metres."""
            return sum($to_m(value, unit) for value, unit in lengths)
        ''',
        **names,
    )
    visible = code(
        """
        import pytest

        from $pkg import $convert, $to_m, $total


        def test_${convert}_km_to_m():
            assert $convert(2, "km", "m") == 2000


        def test_${convert}_cm_to_m():
            assert $convert(250, "cm", "m") == pytest.approx(2.5)


        def test_${convert}_unknown_unit():
            with pytest.raises(ValueError):
                $convert(1, "mile", "m")


        def test_${to_m}_metres_unchanged():
            assert $to_m(7, "m") == 7


        def test_${total}_in_metres():
            assert $total([(1, "m"), (2, "m")]) == 3
        """,
        **names,
    )
    hidden = code(
        """
        import pytest

        from $pkg import $to_m, $total


        def test_${to_m}_from_km():
            assert $to_m($km, "km") == pytest.approx($km_m)


        def test_${total}_mixed_units():
            assert $total([($a, "km"), ($b, "m")]) == pytest.approx($ab)


        def test_${to_m}_from_m():
            assert $to_m(3, "m") == 3
        """,
        km=km,
        km_m=km * 1000,
        a=a,
        b=b,
        ab=a * 1000 + b,
        **names,
    )
    return BugCase(
        kind="swapped_arguments",
        module="lengths",
        exports=(convert, to_m, total),
        description="Length conversions between metric units.",
        source=source,
        edits={"CALL": (f'return {convert}(value, "m", unit)', f'return {convert}(value, unit, "m")')},
        visible_tests=visible,
        hidden_tests=hidden,
        hidden_failing=frozenset({f"test_{to_m}_from_km", f"test_{total}_mixed_units"}),
        issue=Issue(
            title=rng.choice([f"`{to_m}` converts the wrong way", f"{to_m}({km}, 'km') is not {km * 1000}"]),
            summary=f"`{to_m}` gives tiny numbers for kilometres, and `{total}` is wrong for anything "
            "that is not already in metres.",
            imports=(to_m,),
            setup=(),
            expr=f'{to_m}({km}, "km")',
            expectation=f"{km} km is {km * 1000} metres.",
        ),
    )


def _day_seconds(rng: random.Random, pkg: str) -> BugCase:
    to_sec = rng.choice(["to_seconds", "duration_seconds", "as_seconds"])
    fmt = rng.choice(["format_duration", "humanize", "fmt_duration"])
    bad = rng.choice([84600, 86000, 864000])
    days = rng.randint(1, 6)
    hours, minutes = rng.randint(1, 23), rng.randint(1, 59)
    long_total = 86400 + hours * 3600 + minutes * 60
    names = dict(pkg=pkg, to_sec=to_sec, fmt=fmt)
    source = code(
        '''
        """Durations in seconds."""

        SECONDS_PER_MINUTE = 60
        SECONDS_PER_HOUR = 60 * SECONDS_PER_MINUTE
        @@DAY@@


        def $to_sec(days=0, hours=0, minutes=0, seconds=0):
            """Total seconds of a duration given in days, hours, minutes and seconds."""
            return days * SECONDS_PER_DAY + hours * SECONDS_PER_HOUR + minutes * SECONDS_PER_MINUTE + seconds


        def $fmt(total_seconds):
            """``"HH:MM:SS"``, prefixed with ``"<days>d "`` for a day or more."""
            days, rest = divmod(int(total_seconds), SECONDS_PER_DAY)
            hours, rest = divmod(rest, SECONDS_PER_HOUR)
            minutes, seconds = divmod(rest, SECONDS_PER_MINUTE)
            clock = f"{hours:02d}:{minutes:02d}:{seconds:02d}"
            return f"{days}d {clock}" if days else clock
        ''',
        **names,
    )
    visible = code(
        """
        from $pkg import $fmt, $to_sec


        def test_${to_sec}_hours_minutes_seconds():
            assert $to_sec(hours=2, minutes=3, seconds=4) == 7384


        def test_${fmt}_under_a_day():
            assert $fmt(7384) == "02:03:04"


        def test_${fmt}_seconds_only():
            assert $fmt(59) == "00:00:59"
        """,
        **names,
    )
    hidden = code(
        """
        from $pkg import $fmt, $to_sec


        def test_${to_sec}_days():
            assert $to_sec(days=$days) == $days_s


        def test_${fmt}_more_than_a_day():
            assert $fmt($long_total) == "1d $clock"


        def test_${fmt}_one_hour():
            assert $fmt(3600) == "01:00:00"
        """,
        days=days,
        days_s=days * 86400,
        long_total=long_total,
        clock=f"{hours:02d}:{minutes:02d}:00",
        **names,
    )
    return BugCase(
        kind="wrong_constant",
        module="durations",
        exports=(fmt, to_sec),
        description="Conversions and formatting for durations in seconds.",
        source=source,
        edits={"DAY": (f"SECONDS_PER_DAY = {bad}", "SECONDS_PER_DAY = 24 * SECONDS_PER_HOUR")},
        visible_tests=visible,
        hidden_tests=hidden,
        hidden_failing=frozenset({f"test_{to_sec}_days", f"test_{fmt}_more_than_a_day"}),
        issue=Issue(
            title=rng.choice([f"`{to_sec}(days=...)` is wrong", "Durations longer than a day are miscalculated"]),
            summary=f"Anything involving whole days is off: `{to_sec}(days={days})` does not give "
            f"{days} x 86400 seconds, and `{fmt}` prints odd results past 24 hours.",
            imports=(to_sec,),
            setup=(),
            expr=f"{to_sec}(days={days})",
            expectation=f"A day has 86400 seconds, so {days} days are {days * 86400} seconds.",
        ),
    )


def _page_size(rng: random.Random, pkg: str) -> BugCase:
    paginate = rng.choice(["paginate", "page_of", "get_page"])
    pages = rng.choice(["page_count", "num_pages", "total_pages"])
    size = rng.choice([10, 25, 50])
    bad = rng.choice([n for n in (20, 30, 100) if n != size])
    n_items = rng.randint(3, 6) * size + rng.randint(1, size - 1)
    names = dict(pkg=pkg, paginate=paginate, pages=pages, size=size)
    source = code(
        '''
        """Split result lists into pages."""

        DEFAULT_PAGE_SIZE = $size


        def $pages(n_items, per_page=DEFAULT_PAGE_SIZE):
            """Number of pages needed for ``n_items`` (at least 1)."""
            if per_page < 1:
                raise ValueError("per_page must be at least 1")
            return max(1, -(-n_items // per_page))


        def $paginate(items, page=1, per_page=@@DEFAULT@@):
            """The items on ``page`` (numbered from 1), ``per_page`` per page.

            ``per_page`` defaults to DEFAULT_PAGE_SIZE, like ``$pages``.
            """
            if page < 1:
                raise ValueError("pages are numbered from 1")
            start = (page - 1) * per_page
            return items[start:start + per_page]
        ''',
        **names,
    )
    visible = code(
        """
        import pytest

        from $pkg import $pages, $paginate


        def test_${paginate}_explicit_page_size():
            assert $paginate(list(range(10)), page=2, per_page=3) == [3, 4, 5]


        def test_${paginate}_rejects_page_zero():
            with pytest.raises(ValueError):
                $paginate([1, 2, 3], page=0)


        def test_${pages}_empty():
            assert $pages(0) == 1


        def test_${pages}_explicit_page_size():
            assert $pages(10, per_page=3) == 4
        """,
        **names,
    )
    hidden = code(
        """
        from $pkg import DEFAULT_PAGE_SIZE, $pages, $paginate


        def test_${paginate}_default_page_size():
            assert len($paginate(list(range($n_items)))) == DEFAULT_PAGE_SIZE


        def test_${paginate}_pages_agree_with_${pages}():
            items = list(range($n_items))
            chunks = [$paginate(items, page=p) for p in range(1, $pages(len(items)) + 1)]
            assert [len(chunk) for chunk in chunks] == $lengths
            assert sum(chunks, []) == items


        def test_${pages}_default():
            assert $pages($n_items) == $n_pages
        """,
        n_items=n_items,
        n_pages=-(-n_items // size),
        lengths=[size] * (n_items // size) + [n_items % size],
        **names,
    )
    return BugCase(
        kind="wrong_constant",
        module="pagination",
        exports=("DEFAULT_PAGE_SIZE", pages, paginate),
        description="Pagination of result lists.",
        source=source,
        edits={"DEFAULT": (str(bad), "DEFAULT_PAGE_SIZE")},
        visible_tests=visible,
        hidden_tests=hidden,
        hidden_failing=frozenset({f"test_{paginate}_default_page_size", f"test_{paginate}_pages_agree_with_{pages}"}),
        issue=Issue(
            title=rng.choice(
                [f"`{paginate}` ignores DEFAULT_PAGE_SIZE", f"{paginate}() and {pages}() disagree on page size"]
            ),
            summary=f"Our UI asks `{pages}` how many pages there are and then fetches each with "
            f"`{paginate}` (both with default arguments), but the pages have the wrong length: either the "
            "last items never show up or the last pages come back empty.",
            imports=(paginate, "DEFAULT_PAGE_SIZE"),
            setup=(f"page = {paginate}(list(range({n_items})))",),
            expr="(len(page), DEFAULT_PAGE_SIZE)",
            expectation="Without `per_page`, a page should hold DEFAULT_PAGE_SIZE items, as documented.",
        ),
    )


def _registry(rng: random.Random, pkg: str) -> BugCase:
    reg = rng.choice(["Registry", "PluginRegistry", "Catalog"])
    get_or = rng.choice(["get_or_default", "lookup", "find"])
    known, missing = rng.sample(["csv", "json", "yaml", "toml", "xml", "ini"], 2)
    names = dict(pkg=pkg, Reg=reg, get_or=get_or, known=known, missing=missing)
    source = code(
        '''
        """A registry of objects by unique name."""


        class $Reg:
            """Objects registered under unique names."""

            def __init__(self):
                self._items = {}

            def register(self, name, obj):
                """Register ``obj`` as ``name``; ValueError if the name is taken."""
                if name in self._items:
                    raise ValueError(f"{name!r} is already registered")
                self._items[name] = obj

            def get(self, name):
                """The object registered as ``name``; KeyError when there is none."""
                try:
                    return self._items[name]
                except KeyError:
                    @@RAISE@@

            def $get_or(self, name, default=None):
                """The object registered as ``name``, or ``default`` when there is none."""
                try:
                    return self.get(name)
                except KeyError:
                    return default

            def names(self):
                """Registered names, sorted."""
                return sorted(self._items)
        ''',
        **names,
    )
    visible = code(
        """
        import pytest

        from $pkg import $Reg


        def test_register_and_get():
            reg = $Reg()
            reg.register("$known", 1)
            assert reg.get("$known") == 1


        def test_duplicate_name_rejected():
            reg = $Reg()
            reg.register("a", 1)
            with pytest.raises(ValueError):
                reg.register("a", 2)


        def test_names_sorted():
            reg = $Reg()
            for name in ("b", "a"):
                reg.register(name, name)
            assert reg.names() == ["a", "b"]


        def test_${get_or}_known_name():
            reg = $Reg()
            reg.register("x", 5)
            assert reg.$get_or("x", 0) == 5
        """,
        **names,
    )
    hidden = code(
        """
        import pytest

        from $pkg import $Reg


        def test_get_unknown_raises_key_error():
            with pytest.raises(KeyError):
                $Reg().get("$missing")


        def test_${get_or}_unknown_returns_default():
            reg = $Reg()
            reg.register("$known", 1)
            assert reg.$get_or("$missing", "fallback") == "fallback"


        def test_get_known_after_register():
            reg = $Reg()
            reg.register("$missing", 2)
            assert reg.get("$missing") == 2
        """,
        **names,
    )
    return BugCase(
        kind="wrong_exception_type",
        module="registry",
        exports=(reg,),
        description="A registry of objects by unique name.",
        source=source,
        edits={
            "RAISE": ('raise ValueError(f"unknown name: {name!r}") from None', "raise KeyError(name) from None")
        },
        visible_tests=visible,
        hidden_tests=hidden,
        hidden_failing=frozenset({"test_get_unknown_raises_key_error", f"test_{get_or}_unknown_returns_default"}),
        issue=Issue(
            title=rng.choice(
                [f"`{reg}.{get_or}` raises instead of returning the default", f"{reg}.get raises the wrong exception"]
            ),
            summary=f"`{reg}.{get_or}` crashes for names that are not registered instead of returning the "
            "default; the traceback comes from `get`.",
            imports=(reg,),
            setup=(f"reg = {reg}()", f"reg.register({known!r}, 'reader')"),
            expr=f"reg.{get_or}({missing!r}, 'fallback')",
            expectation="`get` is documented to raise KeyError for unknown names, and "
            f"`{get_or}` should then return the default.",
        ),
    )


def _cart(rng: random.Random, pkg: str) -> BugCase:
    add = rng.choice(["add_item", "add_to_cart", "put_item"])
    count = rng.choice(["item_count", "count_of", "quantity_of"])
    total = rng.choice(["cart_total", "order_total", "total_price"])
    first, second = rng.sample(["apple", "bread", "milk", "eggs", "tea", "rice"], 2)
    names = dict(pkg=pkg, add=add, count=count, total=total, first=first, second=second)
    source = code(
        '''
        """Shopping-cart helpers; a cart is a list of item names."""


        def $add(item, cart=@@DEFAULT@@):
            """Append ``item`` to ``cart`` and return the cart.

            Without a ``cart`` argument a new, empty cart is started.
            """
            @@INIT@@
            cart.append(item)
            return cart


        def $count(cart, item):
            """How many times ``item`` is in ``cart``."""
            return cart.count(item)


        def $total(cart, prices):
            """Sum of the prices of the items in ``cart``; KeyError for an unknown item."""
            return sum(prices[item] for item in cart)
        ''',
        **names,
    )
    visible = code(
        """
        import pytest

        from $pkg import $add, $count, $total


        def test_${add}_to_existing_cart():
            assert $add("b", ["a"]) == ["a", "b"]


        def test_${count}():
            assert $count(["a", "b", "a"], "a") == 2


        def test_${total}():
            assert $total(["a", "b", "a"], {"a": 2, "b": 5}) == 9


        def test_${total}_unknown_item():
            with pytest.raises(KeyError):
                $total(["zzz"], {})
        """,
        **names,
    )
    hidden = code(
        """
        from $pkg import $add


        def test_${add}_starts_new_cart_each_call():
            first = $add("$first")
            second = $add("$second")
            assert second == ["$second"]
            assert first == ["$first"]


        def test_${add}_default_carts_are_distinct():
            assert $add("x") is not $add("y")


        def test_${add}_explicit_empty_cart():
            assert $add("q", []) == ["q"]
        """,
        **names,
    )
    return BugCase(
        kind="mutable_default_argument",
        module="cart",
        exports=(add, count, total),
        description="Shopping-cart helpers.",
        source=source,
        edits={"DEFAULT": ("[]", "None"), "INIT": ("", "if cart is None:\n    cart = []")},
        visible_tests=visible,
        hidden_tests=hidden,
        hidden_failing=frozenset({f"test_{add}_starts_new_cart_each_call", f"test_{add}_default_carts_are_distinct"}),
        issue=Issue(
            title=rng.choice(
                [f"New carts from `{add}` contain items from earlier carts", "Carts leak items between customers"]
            ),
            summary=f"When two customers each start a cart with `{add}` (no cart argument), the second "
            "customer's cart already holds the first customer's item.",
            imports=(add,),
            setup=(f"alice = {add}({first!r})",),
            expr=f"{add}({second!r})",
            expectation="Calling it without a cart should start a new, empty cart every time.",
        ),
    )


TEMPLATES: tuple[Template, ...] = (
    Template("off_by_one", ("series", "signals", "metrics", "timeseries"), _rolling_mean),
    Template("off_by_one", ("textkit", "strtools", "captions", "textutils"), _truncate),
    Template("wrong_comparison", ("inventory", "stockroom", "warehouse", "pantry"), _restock),
    Template("wrong_comparison", ("intervals", "bounds", "ranges", "limits"), _within),
    Template("wrong_boolean_operator", ("accounts", "signup", "userdb", "members"), _username),
    Template("negated_condition", ("filetree", "listing", "dirview", "pathtools"), _listing),
    Template("wrong_return_value", ("geometry", "shapes", "plotting", "vectors"), _bbox),
    Template("missing_statement", ("ledger", "billing", "finance", "accounting"), _ledger),
    Template("missing_statement", ("confparse", "settings", "envfile", "inifile"), _settings),
    Template("swapped_arguments", ("units", "measures", "metric", "lengths"), _units),
    Template("wrong_constant", ("timeutils", "durations", "clockwork", "schedule"), _day_seconds),
    Template("wrong_constant", ("paging", "pager", "resultsets", "listings"), _page_size),
    Template("wrong_exception_type", ("registry", "plugins", "catalog", "lookup"), _registry),
    Template("mutable_default_argument", ("shopping", "cart", "orders", "basket"), _cart),
)


def bug_kinds() -> list[str]:
    """The distinct bug kinds the templates cover, sorted."""
    return sorted({t.kind for t in TEMPLATES})


# ---------------------------------------------------------------- assembly

_REPRO_HEADINGS = ("To reproduce:", "Minimal example:", "Steps to reproduce:", "Reproducer:")
_ACTUAL_LABELS = ("Actual output:", "What I get:", "Observed:")
_EXPECTED_LABELS = ("Expected output:", "What I expected:", "Expected:")
_CLOSINGS = (
    "",
    f"Seen with version {PACKAGE_VERSION} from a fresh checkout.",
    "Happy to provide more details if needed.",
    "Thanks for looking into this!",
)


def render_issue(pkg: str, issue: Issue, actual: str, expected: str, rng: random.Random) -> str:
    """The problem statement in the style of a GitHub issue (never mentions the fix)."""
    lines = [f"from {pkg} import {', '.join(issue.imports)}", *issue.setup, f"print({issue.expr})"]
    parts = [
        issue.title,
        "",
        issue.summary,
        "",
        rng.choice(_REPRO_HEADINGS),
        "",
        "```python",
        *lines,
        "```",
        "",
        rng.choice(_ACTUAL_LABELS),
        "",
        "```",
        actual,
        "```",
        "",
        rng.choice(_EXPECTED_LABELS),
        "",
        "```",
        expected,
        "```",
        "",
        issue.expectation,
    ]
    closing = rng.choice(_CLOSINGS)
    if closing:
        parts += ["", closing]
    return "\n".join(parts) + "\n"


def _readme(pkg: str, description: str) -> str:
    return code(
        """
        # $pkg

        $description

        ## Development

        Run the test suite from the repository root:

            python -m pytest
        """,
        pkg=pkg,
        description=description,
    )


def _pyproject(pkg: str) -> str:
    # pythonpath lets a plain `pytest` (not only `python -m pytest`) import the package.
    return code(
        """
        [project]
        name = "$pkg"
        version = "$version"
        requires-python = ">=3.9"

        [tool.pytest.ini_options]
        testpaths = ["tests"]
        pythonpath = ["."]
        """,
        pkg=pkg,
        version=PACKAGE_VERSION,
    )


# Keeps caches out of `git add -A` (and so out of patches taken from a sandbox).
_GITIGNORE = "__pycache__/\n*.pyc\n.pytest_cache/\n"


def _init_module(pkg: str, module: str, exports: tuple[str, ...], description: str) -> str:
    names = sorted(exports)
    return (
        f'"""{description}"""\n\n'
        f"from {pkg}.{module} import {', '.join(names)}\n\n"
        f"__all__ = {names!r}\n"
        f'__version__ = "{PACKAGE_VERSION}"\n'
    )


def assemble(template: Template, rng: random.Random, index: int) -> TaskSpec:
    """Render ``template`` with ``rng`` into task number ``index``.

    Raises:
        ValueError: the template is inconsistent (bug not visible in the
            reproducer, unknown hidden test names): a bug in this module.
    """
    pkg = rng.choice(template.packages)
    case = template.render(rng, pkg)
    buggy = apply_edits(case.source, case.edits, 0)
    fixed = apply_edits(case.source, case.edits, 1)
    actual = run_reproducer(buggy, case.issue.setup, case.issue.expr)
    expected = run_reproducer(fixed, case.issue.setup, case.issue.expr)
    if buggy == fixed or actual == expected:
        raise ValueError(f"template {template.kind}/{case.module}: the bug does not show in the reproducer")
    hidden_names = test_names(case.hidden_tests)
    if not case.hidden_failing or not case.hidden_failing <= set(hidden_names):
        raise ValueError(f"template {template.kind}/{case.module}: hidden_failing names unknown tests")

    module_path = f"{pkg}/{case.module}.py"
    visible_path = f"tests/test_{case.module}.py"
    hidden_path = f"tests/test_{case.module}_hidden.py"
    base_files = {
        ".gitignore": _GITIGNORE,
        "README.md": _readme(pkg, case.description),
        "pyproject.toml": _pyproject(pkg),
        f"{pkg}/__init__.py": _init_module(pkg, case.module, case.exports, case.description),
        module_path: buggy,
        visible_path: case.visible_tests,
    }
    fail_to_pass = tuple(f"{hidden_path}::{n}" for n in hidden_names if n in case.hidden_failing)
    pass_to_pass = tuple(f"{visible_path}::{n}" for n in test_names(case.visible_tests)) + tuple(
        f"{hidden_path}::{n}" for n in hidden_names if n not in case.hidden_failing
    )
    return TaskSpec(
        instance_id=f"simple__{pkg}-{index}",
        package=pkg,
        bug_kind=template.kind,
        problem_statement=render_issue(pkg, case.issue, actual, expected, rng),
        base_files=base_files,
        fixed_files={module_path: fixed},
        hidden_test_files={hidden_path: case.hidden_tests},
        fail_to_pass=fail_to_pass,
        pass_to_pass=pass_to_pass,
    )


def generate_specs(seed: int, num_tasks: int) -> list[TaskSpec]:
    """``num_tasks`` task specs, deterministic for ``seed``.

    Bug kinds are dealt round-robin in a seed-shuffled order, so any
    ``num_tasks >= len(bug_kinds())`` covers every kind; within a kind the
    template variant, package name, identifiers and data come from a
    per-task RNG seeded with ``(seed, index)``.
    """
    if num_tasks < 0:
        raise ValueError("num_tasks must be >= 0")
    kinds = bug_kinds()
    random.Random(f"simple-kinds:{seed}").shuffle(kinds)
    specs = []
    for index in range(num_tasks):
        rng = random.Random(f"simple-task:{seed}:{index}")
        kind = kinds[index % len(kinds)]
        template = rng.choice([t for t in TEMPLATES if t.kind == kind])
        specs.append(assemble(template, rng, index))
    return specs
