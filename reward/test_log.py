"""Per-test outcomes from pytest and unittest logs, compatible with SWE-bench's parsers.

Pytest run with ``-rA`` ends with a "short test summary info" section holding one
line per test: ``PASSED tests/x.py::t``, ``FAILED tests/x.py::t - AssertionError``,
``ERROR tests/x.py::t - ...``, ``XFAIL tests/x.py::t - reason``,
``XPASS tests/x.py::t``. This is the source SWE-bench's ``parse_log_pytest``
reads (``swebench/harness/log_parsers/python.py``); verbose (``-v``) progress
lines ``tests/x.py::t PASSED [ 50%]`` are read as well when a log has no summary.

Differences from ``parse_log_pytest`` (checked in ``tests/reward``): node ids
holding spaces (``t[a b]``) are kept whole, and also stored under SWE-bench's
truncated key (``t[a``) so instances whose test lists were made with SWE-bench's
parser still match; ``XPASS`` is a status here (SWE-bench ignores the line, and
both count the test as not passed). Only the last summary section is read, up to
pytest's final statistics line: status lines printed by the code under test
(captured output shown before the summary, or prints at interpreter exit after
it) cannot pose as results.

Unittest (``python -m unittest -v``) prints ``test_x (mod.Class.test_x) ... ok``;
``parse_unittest_log`` maps ``test_x (mod.Class.test_x)`` to its outcome exactly
like SWE-bench's ``parse_log_django`` (the parser SWE-bench uses for unittest
runners) does for these lines.
"""

from __future__ import annotations

import re
from enum import Enum


class TestStatus(str, Enum):
    """A test's outcome as pytest prints it (SWE-bench's ``TestStatus`` values plus XPASS)."""

    __test__ = False  # not a pytest test class despite the name

    PASSED = "PASSED"
    FAILED = "FAILED"
    ERROR = "ERROR"
    SKIPPED = "SKIPPED"
    XFAIL = "XFAIL"
    XPASS = "XPASS"


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_STATUSES = "|".join(s.value for s in TestStatus)
# Summary line: STATUS <node id>[ - message]. A node id may hold spaces only inside
# its parametrization brackets, so it is "no spaces" optionally followed by "[...]".
_SUMMARY = re.compile(rf"^({_STATUSES}) (\S+?(?:\[.*?\])?)(?: - .*| .*)?$")
# Verbose progress line: <node id> STATUS [ NN%] (the percentage is optional).
_VERBOSE = re.compile(rf"^(\S+::\S+?(?:\[.*?\])?) ({_STATUSES})(?: .*)?$")
_SUMMARY_HEADER = re.compile(r"^=+ short test summary info =+$")
# pytest's last line: "===== 1 failed, 2 passed in 0.12s =====" (bare with -q),
# "no tests ran in 0.01s", or with an "(0:01:02)" duration suffix.
_STATS_LINE = re.compile(
    r"^=*\s*(?:(?:\d+ (?:passed|failed|errors?|skipped|xfailed|xpassed|deselected|warnings?|rerun)"
    r"(?:, )?)+|no tests ran)\b.* in [0-9.]+s\b.*$"
)


def _clean_lines(log: str) -> list[str]:
    return [_ANSI.sub("", raw).rstrip() for raw in log.splitlines()]


def _summary_bounds(lines: list[str]) -> tuple[int, int] | None:
    """(header index, end index) of the last short-summary section, end = the statistics line."""
    start = None
    for i, line in enumerate(lines):
        if _SUMMARY_HEADER.match(line):
            start = i
    if start is None:
        return None
    end = start + 1
    while end < len(lines) and not _STATS_LINE.match(lines[end]):
        end += 1
    return start, end


def _add(outcomes: dict[str, TestStatus], node_id: str, status: TestStatus) -> None:
    outcomes[node_id] = status
    if any(ch.isspace() for ch in node_id):
        # SWE-bench's parse_log_pytest splits on whitespace: "t[a b]" is "t[a" there.
        outcomes.setdefault(node_id.split()[0], status)


def parse_pytest_log(log: str) -> dict[str, TestStatus]:
    """Map each test's node id to its outcome, read from a pytest log.

    Args:
        log: pytest's combined stdout/stderr, best run with ``-rA``.

    Returns:
        ``{node_id: TestStatus}``, node ids as pytest prints them (relative to its
        rootdir, e.g. ``tests/test_x.py::test_y[1-2]``). A collection error of a
        whole module appears under the module path (``tests/test_x.py``) as
        ERROR. ``SKIPPED [1] file:line: reason`` summary lines name no test and
        are ignored. With a summary section, only it is read (see the module
        docstring); without one, summary-style and verbose lines anywhere count
        and the last line for a test wins. Tests absent from the log are absent.
    """
    lines = _clean_lines(log)
    bounds = _summary_bounds(lines)
    outcomes: dict[str, TestStatus] = {}
    if bounds is None:
        verbose, summary = lines, lines
    else:
        # Progress lines come before the summary; summary lines only inside it.
        verbose, summary = lines[: bounds[0]], lines[bounds[0] + 1 : bounds[1]]
    for line in verbose:
        match = _VERBOSE.match(line)
        if match:
            _add(outcomes, match.group(1), TestStatus(match.group(2)))
    for line in summary:
        match = _SUMMARY.match(line)
        if match:
            status, node_id = match.group(1), match.group(2)
            if status == TestStatus.SKIPPED.value and node_id.startswith("["):
                continue  # "SKIPPED [1] path:line: reason" names no node id
            _add(outcomes, node_id, TestStatus(status))
    return outcomes


# unittest -v result words after " ... " (unittest/runner.py TextTestResult).
# "expected failure" / "unexpected success" are left out, as SWE-bench's parser
# leaves them out: such tests count as not passed in both graders.
_UNITTEST_WORDS = {"ok": TestStatus.PASSED, "FAIL": TestStatus.FAILED, "ERROR": TestStatus.ERROR}
_UNITTEST_LINE = re.compile(r"^(.+?) \.\.\. (ok|OK|FAIL|ERROR|skipped\b.*)$")
# "FAIL: test_x (mod.Class.test_x)" headers of the failure details.
_UNITTEST_DETAIL = re.compile(r"^(FAIL|ERROR): (\S+)")


def parse_unittest_log(log: str) -> dict[str, TestStatus]:
    """Map each unittest test to its outcome, read from ``python -m unittest -v`` output.

    Args:
        log: the runner's output (unittest writes to stderr; pass both streams).

    Returns:
        ``{"test_x (mod.Class.test_x)": TestStatus}`` for each ``... ok`` /
        ``... FAIL`` / ``... ERROR`` / ``... skipped`` line (``expected failure``
        and ``unexpected success`` are left out, as SWE-bench's parser leaves
        them out, so both count such tests as not passed); ``FAIL:``/``ERROR:`` detail headers
        add their first word (the method name) as SWE-bench's ``parse_log_django``
        does. A test whose own output splits the line ("test ... <output>\\nok")
        is read from the ``ok`` line that follows, as SWE-bench does.
    """
    outcomes: dict[str, TestStatus] = {}
    previous: str | None = None
    for line in (raw.strip() for raw in _clean_lines(log)):
        if " ... " in line:
            previous = line.split(" ... ")[0]
        match = _UNITTEST_LINE.match(line)
        if match:
            name, word = match.group(1), match.group(2)
            outcomes[name] = TestStatus.SKIPPED if word.startswith("skipped") else _UNITTEST_WORDS[word.replace("OK", "ok")]
            continue
        match = _UNITTEST_DETAIL.match(line)
        if match:
            outcomes[match.group(2)] = TestStatus.FAILED if match.group(1) == "FAIL" else TestStatus.ERROR
            continue
        if line.startswith("ok") and previous is not None:
            outcomes[previous] = TestStatus.PASSED
    return outcomes


def has_pytest_summary(log: str) -> bool:
    """True when the log holds pytest's "short test summary info" section.

    With ``-rA`` pytest prints it whenever its session finished; a log without it
    came from a run that crashed before (status lines elsewhere may be forged).
    """
    return _summary_bounds(_clean_lines(log)) is not None


def is_unittest_command(test_cmd: str) -> bool:
    """True when ``test_cmd`` runs unittest (``-m unittest``) rather than pytest."""
    return bool(re.search(r"(?:^|\s)-m\s+unittest\b", test_cmd))


def parse_test_log(log: str, test_cmd: str) -> dict[str, TestStatus]:
    """Outcomes from a log, with the parser matching ``test_cmd`` (unittest or pytest)."""
    return parse_unittest_log(log) if is_unittest_command(test_cmd) else parse_pytest_log(log)


def unittest_selector(name: str) -> str:
    """The argument selecting a unittest test from its reported name.

    ``"test_x (mod.Class.test_x)"`` -> ``"mod.Class.test_x"`` (Python >= 3.11);
    ``"test_x (mod.Class)"`` -> ``"mod.Class.test_x"`` (older); a dotted name is
    returned as is.
    """
    match = re.match(r"^(\w+) \(([\w.]+)\)$", name.strip())
    if not match:
        return name
    method, where = match.groups()
    return where if where.endswith("." + method) else f"{where}.{method}"
