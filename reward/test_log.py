"""Per-test outcomes from a pytest log.

Pytest run with ``-rA`` ends with a "short test summary info" section holding one
line per test: ``PASSED tests/x.py::t``, ``FAILED tests/x.py::t - AssertionError``,
``ERROR tests/x.py::t - ...``, ``XFAIL tests/x.py::t - reason``,
``XPASS tests/x.py::t``. This is the same source SWE-bench's ``parse_log_pytest``
reads (``swebench/harness/log_parsers``); verbose (``-v``) progress lines
``tests/x.py::t PASSED [ 50%]`` are read as well, so either style works.
"""

from __future__ import annotations

import re
from enum import Enum


class TestStatus(str, Enum):
    """A test's outcome as pytest prints it (SWE-bench's ``TestStatus`` values)."""

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


def parse_pytest_log(log: str) -> dict[str, TestStatus]:
    """Map each test's node id to its outcome, read from a pytest log.

    Args:
        log: pytest's combined stdout/stderr, best run with ``-rA``.

    Returns:
        ``{node_id: TestStatus}``, node ids as pytest prints them (relative to its
        rootdir, e.g. ``tests/test_x.py::test_y[1-2]``). A collection error of a
        whole module appears under the module path (``tests/test_x.py``) as
        ERROR. ``SKIPPED [1] file:line: reason`` summary lines name no test and
        are ignored. When a test appears more than once (verbose line and summary
        line), the last line wins. Tests absent from the log are absent here.
    """
    outcomes: dict[str, TestStatus] = {}
    for raw in log.splitlines():
        line = _ANSI.sub("", raw).rstrip()
        match = _SUMMARY.match(line)
        if match:
            status, node_id = match.group(1), match.group(2)
            if status == TestStatus.SKIPPED.value and node_id.startswith("["):
                continue  # "SKIPPED [1] path:line: reason" names no node id
            outcomes[node_id] = TestStatus(status)
            continue
        match = _VERBOSE.match(line)
        if match:
            outcomes[match.group(1)] = TestStatus(match.group(2))
    return outcomes
