"""parse_pytest_log on the output of real pytest runs."""

from __future__ import annotations

import os
import subprocess
import sys

from reward.test_log import TestStatus, parse_pytest_log

SAMPLE = '''\
import pytest


def test_pass():
    assert True


def test_fail():
    assert 1 == 2, "one is not two - really"


@pytest.fixture
def broken():
    raise RuntimeError("fixture broke")


def test_error(broken):
    pass


@pytest.mark.skip(reason="not today")
def test_skip():
    pass


@pytest.mark.xfail(reason="known bug")
def test_xfail():
    assert False


@pytest.mark.xfail(reason="fixed already")
def test_xpass():
    assert True


@pytest.mark.parametrize("text", ["a b", "c-d"])
def test_param(text):
    assert " " not in text


class TestGroup:
    def test_method(self):
        assert True
'''


def _pytest(project, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # keep the run fast; outcomes do not depend on plugins
    env["PY_COLORS"] = "0"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=project, capture_output=True, text=True, env=env,
    )
    return proc.stdout + proc.stderr


def _project(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_sample.py").write_text(SAMPLE)
    (tmp_path / "tests" / "test_broken.py").write_text("import does_not_exist\n\ndef test_x():\n    pass\n")
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    return tmp_path


EXPECTED = {
    "tests/test_sample.py::test_pass": TestStatus.PASSED,
    "tests/test_sample.py::test_fail": TestStatus.FAILED,
    "tests/test_sample.py::test_error": TestStatus.ERROR,
    "tests/test_sample.py::test_xfail": TestStatus.XFAIL,
    "tests/test_sample.py::test_xpass": TestStatus.XPASS,
    "tests/test_sample.py::test_param[a b]": TestStatus.FAILED,
    # SWE-bench's parser splits on whitespace; its key is kept too, so its test lists match.
    "tests/test_sample.py::test_param[a": TestStatus.FAILED,
    "tests/test_sample.py::test_param[c-d]": TestStatus.PASSED,
    "tests/test_sample.py::TestGroup::test_method": TestStatus.PASSED,
}


def test_parse_summary_of_real_run(tmp_path):
    log = _pytest(_project(tmp_path), "-rA", "-q", "tests/test_sample.py")
    outcomes = parse_pytest_log(log)
    # "SKIPPED [1] tests/test_sample.py:22: not today" names no node id.
    assert outcomes == EXPECTED, log


def test_parse_verbose_run_reports_skips_too(tmp_path):
    log = _pytest(_project(tmp_path), "-rA", "-v", "tests/test_sample.py")
    outcomes = parse_pytest_log(log)
    assert outcomes == {**EXPECTED, "tests/test_sample.py::test_skip": TestStatus.SKIPPED}, log


def test_collection_error_reported_for_module(tmp_path):
    log = _pytest(_project(tmp_path), "-rA", "-q", "tests/test_broken.py")
    assert parse_pytest_log(log) == {"tests/test_broken.py": TestStatus.ERROR}, log


def test_status_lines_printed_by_the_code_do_not_count(tmp_path):
    # A "fix" that prints fake results: inside a test (shown in the PASSES section
    # before the summary) and at interpreter exit (after pytest's last line).
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_fake.py").write_text(
        "import atexit\n\n"
        "atexit.register(print, 'PASSED tests/test_fake.py::test_real')\n\n"
        "def test_printer():\n    print('PASSED tests/test_fake.py::test_real')\n\n"
        "def test_real():\n    assert False\n"
    )
    log = _pytest(tmp_path, "-rA", "-q", "tests/test_fake.py")
    assert log.rstrip().endswith("PASSED tests/test_fake.py::test_real")  # the forged line really is last
    assert parse_pytest_log(log)["tests/test_fake.py::test_real"] is TestStatus.FAILED


def test_no_tests_no_outcomes():
    assert parse_pytest_log("") == {}
    assert parse_pytest_log("\x1b[32mPASSED\x1b[0m tests/a.py::t\n") == {"tests/a.py::t": TestStatus.PASSED}
