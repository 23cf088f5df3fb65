"""pytest plugin of the grader: each test's outcome, written where the tests' output never goes.

The grader passes an open file descriptor in ``SWE_RL_OUTCOMES_FD`` (its file lies in a
directory the test run cannot see) and a per-run nonce in ``SWE_RL_OUTCOMES_NONCE``; both
are removed from the environment when this module is imported (before any test module,
so neither the code under test nor its subprocesses see them). Every record carries the
nonce. Lines are JSON: ``{"test": nodeid, "outcome": ...}`` with
the outcome pytest's ``-rA`` summary would show (``PASSED``, ``FAILED``, ``ERROR``,
``SKIPPED``, ``XFAIL``, ``XPASS``), ``{"collect_error": nodeid}`` for a module that
failed to import, and a last ``{"finished": exitstatus}`` when the session ended
normally (no such line: the run crashed). Reports come from pytest's hook
``pytest_runtest_logreport``, not from anything printed, so text the tested code
writes cannot pose as an outcome.

Written for the grader only: standard library and pytest, no project imports.
"""

import json
import os

_fd = os.environ.pop("SWE_RL_OUTCOMES_FD", None)
_nonce = os.environ.pop("SWE_RL_OUTCOMES_NONCE", "")
_out = os.fdopen(int(_fd), "a", encoding="utf-8") if _fd else None  # noqa: SIM115 - open for the session
if _out is not None:
    os.set_inheritable(_out.fileno(), False)  # the tests' subprocesses do not get it
_status: dict = {}


def _emit(record: dict) -> None:
    if _out is not None:
        _out.write(json.dumps({**record, "nonce": _nonce}) + "\n")
        _out.flush()


def pytest_runtest_logreport(report) -> None:
    nodeid = report.nodeid
    xfailed = hasattr(report, "wasxfail")
    if report.failed:
        outcome = "FAILED" if report.when == "call" else "ERROR"
    elif report.skipped:
        outcome = "XFAIL" if xfailed else "SKIPPED"
    elif report.when == "call":
        outcome = "XPASS" if xfailed else "PASSED"
    else:
        return  # a passing setup or teardown says nothing on its own
    previous = _status.get(nodeid)
    # A failing teardown after a passed call makes the test an error, as pytest reports it.
    if previous in ("FAILED", "ERROR") and outcome not in ("FAILED", "ERROR"):
        return
    _status[nodeid] = outcome
    _emit({"test": nodeid, "outcome": outcome})


def pytest_collectreport(report) -> None:
    if report.failed:
        _emit({"collect_error": report.nodeid})


def pytest_sessionfinish(session, exitstatus) -> None:
    _emit({"finished": int(exitstatus)})
