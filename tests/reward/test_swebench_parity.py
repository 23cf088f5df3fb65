"""Our log parsers against the `swebench` package's, on logs of real pytest and unittest runs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from test_test_log import SAMPLE  # tests/reward is on sys.path (pytest's prepend import mode)

from reward.test_log import TestStatus, parse_pytest_log, parse_unittest_log

swebench_parsers = pytest.importorskip("swebench.harness.log_parsers.python")

UNITTEST_SAMPLE = """\
import sys
import unittest


class Calc(unittest.TestCase):
    def test_pass(self):
        self.assertEqual(1 + 1, 2)

    def test_fail(self):
        self.assertEqual(1 + 1, 3)

    def test_error(self):
        raise RuntimeError("boom")

    @unittest.skip("not today")
    def test_skip(self):
        pass

    @unittest.expectedFailure
    def test_xfail(self):
        self.assertTrue(False)

    @unittest.expectedFailure
    def test_xpass(self):
        self.assertTrue(True)

    def test_noisy(self):
        sys.stderr.write("some output\\n")  # splits "test ... ok" over two lines
        self.assertTrue(True)


class Other(unittest.TestCase):
    def test_other(self):
        pass
"""

MORE_PYTEST = """\
import unittest

import pytest


class Legacy(unittest.TestCase):
    def test_ok(self):
        self.assertTrue(True)

    def test_bad(self):
        self.assertTrue(False)


@pytest.mark.parametrize("a,b", [(1, 1), (2, 3), ("x::y", "x::y")])
def test_eq(a, b):
    assert a == b


def test_warns():
    import warnings
    warnings.warn("careful")
"""


def _run(cwd, *argv: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(PYTEST_DISABLE_PLUGIN_AUTOLOAD="1", PY_COLORS="0", PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True, env=env, timeout=120)
    return proc.stdout + proc.stderr


def _compare(ours: dict[str, TestStatus], theirs: dict[str, str], test_ids: set[str]) -> None:
    """Same status for every test SWE-bench's parser reports.

    A test only we report must be one SWE-bench's grading also counts as not
    passed (absent = failed there): XPASS (swebench has no such status), a skip
    named only by pytest's verbose line, or a whole "t[a b]" id (swebench keeps
    "t[a", which we report too and which is compared).
    """
    for name in test_ids:
        mine = ours.get(name)
        if name in theirs:
            assert (mine.value if mine else None) == theirs[name], name
        elif " " in name and "::" in name:
            assert name.split()[0] in theirs, name
        else:
            assert mine in (TestStatus.XPASS, TestStatus.SKIPPED), name


@pytest.mark.parametrize("style, n_outcomes", [("-q", 16), ("-v", 17)])
def test_pytest_logs_match_parse_log_pytest(tmp_path, style, n_outcomes):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_sample.py").write_text(SAMPLE)
    (tmp_path / "tests" / "test_more.py").write_text(MORE_PYTEST)
    (tmp_path / "tests" / "test_broken.py").write_text("import does_not_exist\n")
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    log = _run(tmp_path, "-m", "pytest", "-p", "no:cacheprovider", "-rA", "--continue-on-collection-errors",
               style, "tests")
    ours = parse_pytest_log(log)
    theirs = swebench_parsers.parse_log_pytest(log, None)
    # Every test of the run: 8 + 6 node ids, the broken module, the alias of "[a b]",
    # and with -v the skipped test (its verbose line names it; the summary line does not).
    assert len(ours) == n_outcomes, log
    test_ids = {name for name in set(ours) | set(theirs) if "::" in name or name.endswith(".py")}
    assert "tests/test_more.py::test_eq[x::y-x::y]" in test_ids
    _compare(ours, theirs, test_ids)
    # The grading verdicts agree for every test: passed (PASSED/XFAIL) or not.
    passing = {TestStatus.PASSED.value, TestStatus.XFAIL.value}
    for name in test_ids:
        if " " in name:
            continue
        assert (ours.get(name) in (TestStatus.PASSED, TestStatus.XFAIL)) == (theirs.get(name) in passing), name


def test_unittest_logs_match_swebench_unittest_parser(tmp_path):
    (tmp_path / "test_calc.py").write_text(UNITTEST_SAMPLE)
    log = _run(tmp_path, "-m", "unittest", "-v", "test_calc")
    ours = parse_unittest_log(log)
    theirs = swebench_parsers.parse_log_django(log, None)
    assert ours["test_pass (test_calc.Calc.test_pass)"] is TestStatus.PASSED, log
    assert ours["test_noisy (test_calc.Calc.test_noisy)"] is TestStatus.PASSED, log
    assert ours["test_fail (test_calc.Calc.test_fail)"] is TestStatus.FAILED
    assert ours["test_error (test_calc.Calc.test_error)"] is TestStatus.ERROR
    assert ours["test_skip (test_calc.Calc.test_skip)"] is TestStatus.SKIPPED
    assert ours["test_other (test_calc.Other.test_other)"] is TestStatus.PASSED
    assert "test_xfail (test_calc.Calc.test_xfail)" not in ours  # as in swebench: not a pass
    assert ours == {name: TestStatus(status) for name, status in theirs.items()}, log
