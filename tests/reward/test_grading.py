"""grade_patch on real git repositories and real pytest runs."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from reward.config import RewardConfig
from reward.grading import grade_patch


def new_file_patch(path: str, content: str) -> str:
    """A git-style diff creating ``path`` with ``content`` (ends with a newline)."""
    lines = content.splitlines()
    body = "".join(f"+{line}\n" for line in lines)
    return (
        f"diff --git a/{path} b/{path}\nnew file mode 100644\n--- /dev/null\n+++ b/{path}\n"
        f"@@ -0,0 +1,{len(lines)} @@\n{body}"
    )


async def test_reference_patch_resolves(calc_task, tmp_path):
    result = await grade_patch(calc_task, calc_task.patch, work_root=str(tmp_path))
    assert result.error is None, result.log_tail
    assert result.resolved and result.reward == 1.0 and result.patch_applied
    assert sorted(result.tests["FAIL_TO_PASS"]["success"]) == sorted(calc_task.FAIL_TO_PASS)
    assert sorted(result.tests["PASS_TO_PASS"]["success"]) == sorted(calc_task.PASS_TO_PASS)
    assert result.tests["FAIL_TO_PASS"]["failure"] == [] and result.removed_test_files == []
    assert list(tmp_path.iterdir()) == []  # temp copy removed
    assert set(result.to_dict()) >= {"instance_id", "resolved", "reward", "error", "tests", "log_tail"}


async def test_empty_patch_runs_tests_and_fails(calc_task):
    result = await grade_patch(calc_task, "")
    assert result.error is None and not result.resolved and result.reward == 0.0
    assert not result.patch_applied
    assert sorted(result.tests["FAIL_TO_PASS"]["failure"]) == sorted(calc_task.FAIL_TO_PASS)
    assert sorted(result.tests["PASS_TO_PASS"]["success"]) == sorted(calc_task.PASS_TO_PASS)


async def test_empty_patch_skipped(calc_task):
    result = await grade_patch(calc_task, "  \n", skip_empty=True)
    assert result.error == "empty_patch" and result.reward == 0.0
    assert result.tests["FAIL_TO_PASS"] == {"success": [], "failure": []}


async def test_patch_that_does_not_apply(calc_task, tmp_path):
    bad = calc_task.patch.replace("for value in values", "for item in items")
    result = await grade_patch(calc_task, bad, work_root=str(tmp_path))
    assert result.error == "patch_apply_failed"
    assert not result.patch_applied and not result.resolved and result.reward == 0.0
    assert "patch" in result.log_tail
    assert list(tmp_path.iterdir()) == []


async def test_unparsable_patch(calc_task):
    result = await grade_patch(calc_task, "please fix the bug, thanks\n")
    assert result.error == "patch_parse_error" and result.reward == 0.0


async def test_missing_repo(calc_task, tmp_path):
    missing = calc_task.model_copy(update={"repo_path": str(tmp_path / "nope")})
    result = await grade_patch(missing, calc_task.patch)
    assert result.error == "repo_missing" and result.reward == 0.0
    no_path = calc_task.model_copy(update={"repo_path": None})
    # No repository: an image task, graded in a container; with no engine given that is the grader's failure.
    no_engine = await grade_patch(no_path, calc_task.patch)
    assert no_engine.error == "sandbox_error" and no_engine.is_infra_error
    local = await grade_patch(no_path, calc_task.patch, config=RewardConfig(backend="local", fail_fast=False))
    assert local.error == "repo_missing" and local.is_infra_error


async def test_unknown_base_commit(calc_task, tmp_path):
    wrong = calc_task.model_copy(update={"base_commit": "0" * 40})
    result = await grade_patch(wrong, calc_task.patch, work_root=str(tmp_path))
    assert result.error == "repo_missing"
    assert list(tmp_path.iterdir()) == []


async def test_test_file_changes_are_stripped_and_counted(calc_task):
    # The fix plus an edit to a visible test and a conftest that would skip everything.
    import subprocess

    target = Path(calc_task.repo_path) / "tests" / "test_ops.py"
    original = target.read_text()
    target.write_text(original.replace("== 0\n", "== 0 or True\n", 1))
    try:
        edit_visible = subprocess.run(["git", "-C", calc_task.repo_path, "diff"], capture_output=True, text=True,
                                      check=True).stdout
    finally:
        target.write_text(original)
    conftest = new_file_patch("conftest.py", "import pytest\ncollect_ignore_glob = ['tests/*']\n")
    result = await grade_patch(calc_task, calc_task.patch + edit_visible + conftest)
    assert sorted(result.removed_test_files) == ["conftest.py", "tests/test_ops.py"]  # git's order
    assert result.resolved and result.patch_applied, result.log_tail

    # A patch that only "adds" the hidden tests itself is stripped to nothing.
    cheat = new_file_patch("tests/test_ops_hidden.py", "def test_sum():\n    pass\n")
    result = await grade_patch(calc_task, cheat)
    assert result.removed_test_files == ["tests/test_ops_hidden.py"]
    # It applied; then git reported the protected path and it was put back: the hidden tests fail.
    assert not result.resolved and result.patch_applied and result.error is None
    skipped = await grade_patch(calc_task, cheat, skip_empty=True)
    assert skipped.error == "empty_patch"


def _hanging_task(calc_task, marker: str):
    # The test run lives in the grader's jail (its own PID namespace and file system): the
    # test finds its processes on the host by a unique command line, not by pid files.
    hang = (
        "import subprocess, time\n"
        "\n"
        "def test_hang():\n"
        f"    subprocess.Popen(['sleep', {marker!r}], start_new_session=True)\n"
        "    time.sleep(300)\n"
    )
    return calc_task.model_copy(
        update={
            "test_patch": calc_task.test_patch + new_file_patch("tests/test_hang.py", hang),
            "FAIL_TO_PASS": ["tests/test_hang.py::test_hang"],
        }
    )


def _running(marker: str) -> list[int]:
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if marker in (proc.info["cmdline"] or []):
            found.append(proc.info["pid"])
    return found


async def _until_gone(marker: str, within_s: float = 10.0) -> list[int]:
    deadline = time.monotonic() + within_s
    while _running(marker) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return _running(marker)


async def test_hanging_suite_times_out(calc_task, tmp_path):
    marker = "301.0137"
    work = tmp_path / "work"
    work.mkdir()
    task = _hanging_task(calc_task, marker)
    start = time.monotonic()
    result = await grade_patch(task, calc_task.patch, timeout_s=4.0, work_root=str(work))
    assert time.monotonic() - start < 30
    assert result.error == "timeout" and not result.resolved and result.reward == 0.0
    assert "killed after" in result.log_tail
    assert list(work.iterdir()) == []
    # The detached child (its own session) went with the test run.
    assert await _until_gone(marker) == []


async def test_cancel_cleans_up(calc_task, tmp_path):
    marker = "302.0137"
    work = tmp_path / "work"
    work.mkdir()
    task = _hanging_task(calc_task, marker)
    grading = asyncio.create_task(grade_patch(task, calc_task.patch, timeout_s=120.0, work_root=str(work)))
    deadline = time.monotonic() + 30
    while not _running(marker):
        assert time.monotonic() < deadline and not grading.done()
        await asyncio.sleep(0.05)
    grading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await grading
    assert list(work.iterdir()) == []
    assert await _until_gone(marker) == []


async def test_test_patch_that_does_not_apply(calc_task):
    broken = calc_task.model_copy(update={"test_patch": calc_task.patch})  # fix already applied -> conflict
    result = await grade_patch(broken, calc_task.patch)
    assert result.error == "test_error" and "test_patch" in result.log_tail


async def test_collection_error_is_test_error(calc_task):
    syntax_error = calc_task.patch.replace("+    for value in values:", "+    for value in values")
    result = await grade_patch(calc_task, syntax_error)
    assert result.patch_applied
    assert result.error == "test_error" and not result.resolved
    assert set(result.tests["FAIL_TO_PASS"]["failure"]) == set(calc_task.FAIL_TO_PASS)



# -- bad patches: rejected before anything runs ---------------------------------------------


def _symlink_patch(path: str, target: str) -> str:
    return (
        f"diff --git a/{path} b/{path}\nnew file mode 120000\n--- /dev/null\n+++ b/{path}\n"
        f"@@ -0,0 +1 @@\n+{target}\n\\ No newline at end of file\n"
    )


@pytest.mark.parametrize(
    "patch_factory, error",
    [
        (lambda ref: ref + new_file_patch("../outside.py", "x = 1\n"), "path_outside_repo"),
        (lambda ref: ref.replace("a/calc/ops.py", "a/calc/../../ops.py"), "path_outside_repo"),
        (lambda ref: "--- /dev/null\n+++ /tmp/evil.py\n@@ -0,0 +1 @@\n+x = 1\n", "path_outside_repo"),
        (lambda ref: ref + _symlink_patch("calc/etc", "/etc"), "path_outside_repo"),
        (lambda ref: ref + _symlink_patch("calc/up", "../../.."), "path_outside_repo"),
        (lambda ref: ref + "diff --git a/calc/x.bin b/calc/x.bin\nindex 1..2 100644\n"
                     "Binary files a/calc/x.bin and b/calc/x.bin differ\n", "binary_patch"),
        (lambda ref: ref + new_file_patch("calc/data.py", "x = 1\n" * 300), "patch_too_large"),
    ],
    ids=["dotdot-new-file", "dotdot-in-header", "absolute", "symlink-absolute", "symlink-up", "binary", "too-large"],
)
async def test_unsafe_patches_are_rejected(calc_task, tmp_path, patch_factory, error):
    from reward.config import RewardConfig

    patch = patch_factory(calc_task.patch)
    result = await grade_patch(calc_task, patch, work_root=str(tmp_path), config=RewardConfig(max_patch_bytes=1500))
    assert result.error == error, result.log_tail
    assert result.reward == 0.0 and not result.resolved and not result.patch_applied
    assert list(tmp_path.iterdir()) == []  # rejected before any copy was made


async def test_symlink_inside_repo_is_fine(calc_task):
    result = await grade_patch(calc_task, calc_task.patch + _symlink_patch("calc/alias.py", "ops.py"))
    assert result.resolved, result.log_tail


async def test_binary_allowed_when_configured(calc_task):
    from reward.config import RewardConfig
    from test_evaluate import _binary_patch

    result = await grade_patch(calc_task, calc_task.patch + _binary_patch(calc_task), config=RewardConfig(allow_binary=True))
    assert result.resolved and result.error is None, result.log_tail


# -- the test run is off the network ------------------------------------------------------------

NET_TEST = """\
import errno
import os
import socket


def test_no_route_out():
    s = socket.socket()
    s.settimeout(5)
    assert s.connect_ex(("192.0.2.1", 80)) in (errno.ENETUNREACH, errno.EHOSTUNREACH)


def test_loopback_works():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    client = socket.create_connection(server.getsockname(), timeout=5)
    client.close()


def test_proxies_point_nowhere():
    assert os.environ["https_proxy"] == "http://127.0.0.1:9" and os.environ["PIP_NO_INDEX"] == "1"
"""


async def test_tests_run_without_network(calc_task):
    from reward.isolation import NetworkPolicy

    policy = NetworkPolicy("auto")
    if policy.effective != "unshare":
        pytest.skip("unprivileged network namespaces are not available here: only the env-level block applies")
    task = calc_task.model_copy(update={
        "test_patch": calc_task.test_patch + new_file_patch("tests/test_net.py", NET_TEST),
        "FAIL_TO_PASS": ["tests/test_net.py::test_no_route_out", "tests/test_net.py::test_loopback_works",
                         "tests/test_net.py::test_proxies_point_nowhere"],
    })
    result = await grade_patch(task, calc_task.patch, network=policy, timeout_s=60)
    assert result.network == "unshare"
    assert result.resolved, result.log_tail
    # The same tests with only the env-level block: a raw socket is not stopped by it.
    env_only = await grade_patch(task, calc_task.patch, network=NetworkPolicy("env"), timeout_s=60)
    assert env_only.network == "env"
    assert "tests/test_net.py::test_proxies_point_nowhere" in env_only.tests["FAIL_TO_PASS"]["success"]


async def test_unusable_work_root_is_an_infra_error(calc_task, tmp_path):
    result = await grade_patch(calc_task, calc_task.patch, work_root=str(tmp_path / "missing"))
    assert result.error == "workdir_error" and result.is_infra_error and result.reward == 0.0
    assert not (await grade_patch(calc_task, "x", work_root=str(tmp_path))).is_infra_error


# -- the test run is jailed like the agent ------------------------------------------------------

JAIL_TEST = """\
import os
import subprocess


def test_no_trainer_secrets():
    assert "WANDB_API_KEY" not in os.environ and "SWE_TEST_SECRET" not in os.environ


def test_grader_files_are_out_of_sight():
    # The task repository (with its history) and the grader's home are not in the jail.
    assert not os.path.exists(os.environ["SWE_TASK_REPO"])
    # /root holds at most the bound interpreter installation (pyenv keeps Pythons there).
    assert not os.path.isdir("/root") or set(os.listdir("/root")) <= {".pyenv"}


def test_no_privileges():
    if os.environ["SWE_GRADER_IS_ROOT"] == "1":
        assert os.geteuid() != 0
    status = open("/proc/self/status").read()
    assert "CapEff:\\t0000000000000000" in status and "NoNewPrivs:\\t1" in status


def test_process_limit():
    started, refused = [], False
    try:
        for _ in range(200):
            started.append(subprocess.Popen(["sleep", "5"]))
    except (BlockingIOError, OSError):
        refused = True
    finally:
        for proc in started:
            proc.kill()
    assert refused
"""


async def test_tests_run_jailed(calc_task, monkeypatch):
    from reward.config import RewardConfig
    from reward.isolation import grading_policy

    monkeypatch.setenv("WANDB_API_KEY", "secret-key")
    monkeypatch.setenv("SWE_TEST_SECRET", "1")
    task = calc_task.model_copy(update={
        "test_patch": calc_task.test_patch + new_file_patch("tests/test_jail.py", JAIL_TEST),
        "FAIL_TO_PASS": [f"tests/test_jail.py::{name}" for name in (
            "test_no_trainer_secrets", "test_grader_files_are_out_of_sight", "test_no_privileges",
            "test_process_limit")],
        # Passed in through the command line, the way a task's test_cmd sets variables.
        "test_cmd": f"SWE_TASK_REPO={calc_task.repo_path} SWE_GRADER_IS_ROOT={int(os.geteuid() == 0)} "
                    + calc_task.test_cmd,
    })
    config = RewardConfig(max_processes=64)
    policy = grading_policy(config)
    if policy.effective != "unshare":
        pytest.skip("namespaces are not available here")
    result = await grade_patch(task, calc_task.patch, config=config, network=policy, timeout_s=60)
    assert result.resolved, result.log_tail
