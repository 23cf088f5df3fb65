"""Bubblewrap isolation of the agent's commands, and the reaper for sandboxes of crashed runs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from prepare.task import SWETask
from recipe.runners.mini_swe_agent_entry import isolated_environment
from sandbox.bwrap import bwrap_argv, probe_bwrap
from sandbox.gitrepo import GIT_ENV
from sandbox.local import OWNER_FILE, LocalSandbox, SandboxError, find_marked_processes, reap_stale_sandboxes
from sandbox.process import run_command

PROBE = probe_bwrap()
needs_bwrap = pytest.mark.skipif(not PROBE.available, reason=f"bubblewrap unusable here: {PROBE.reason}")


def _git(cwd, *args):
    subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True, env={**os.environ, **GIT_ENV})


@pytest.fixture
def task(tmp_path):
    """A task repo under data/repos/, with hidden tests in data/hidden/ (as the grader keeps them)."""
    data = tmp_path / "data"
    repo = data / "repos" / "t1"
    repo.mkdir(parents=True)
    (repo / "pkg.py").write_text("X = 1\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "base")
    base = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    hidden = data / "hidden"
    hidden.mkdir()
    (hidden / "test_hidden.py").write_text("SECRET_HIDDEN_TEST = 1\n")
    return SWETask(instance_id="t1", repo="local/t1", base_commit=base, problem_statement="p", repo_path=str(repo))


@pytest.fixture
def loopback_server():
    """A TCP server on 127.0.0.1 that the host can reach and a sandboxed command must not."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    yield srv.getsockname()[1]
    srv.close()


CONNECT = "python -c \"import socket,sys; s=socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=3); print('CONNECTED')\" {port}"


@needs_bwrap
async def test_bwrap_command_has_no_network_and_sees_no_hidden_files(task, tmp_path, loopback_server):
    boxes = tmp_path / "boxes"
    hidden_dir = tmp_path / "data" / "hidden"
    a = await LocalSandbox.create(task, parent_dir=str(boxes), isolation="bwrap", hide_paths=[str(hidden_dir)])
    b = await LocalSandbox.create(task, parent_dir=str(boxes), isolation="bwrap", hide_paths=[str(hidden_dir)])
    try:
        assert a.isolated and a.isolation == "bwrap"
        (b.workdir / "other_rollout.txt").write_text("B's work")
        # The host reaches the server; the sandboxed command does not.
        host = await run_command(CONNECT.format(port=loopback_server), timeout_s=20)
        assert "CONNECTED" in host.output
        inside = await run_command(a.wrap_command(CONNECT.format(port=loopback_server)), env=a.env(), timeout_s=20)
        assert inside.returncode != 0 and "CONNECTED" not in inside.output
        probe = "; ".join([
            f"cat {hidden_dir}/test_hidden.py",
            f"ls {task.repo_path}",
            f"cat {b.workdir}/other_rollout.txt",
            "echo written > pkg_new.py && echo WROTE_WORKTREE",
            "echo x > /tmp/t && echo WROTE_TMP",
            f"echo x > {sys.prefix}/evil 2>&1 || echo HOST_READONLY",
            "true",
        ])
        res = await run_command(a.wrap_command(probe), env=a.env(), timeout_s=20)
        assert "SECRET_HIDDEN_TEST" not in res.output
        assert "pkg.py" not in res.output.replace("pkg_new.py", "")  # the task repo directory is empty inside
        assert "B's work" not in res.output
        assert "WROTE_WORKTREE" in res.output and "WROTE_TMP" in res.output and "HOST_READONLY" in res.output
        assert (a.workdir / "pkg_new.py").read_text() == "written\n"
        assert not (tmp_path / "t").exists() and not os.path.exists(f"{sys.prefix}/evil")
        # The patch sees the sandboxed write, owned by us (no uid mapping surprises).
        assert "pkg_new.py" in await a.extract_patch()
    finally:
        await a.teardown()
        await b.teardown()
    assert list(boxes.iterdir()) == []


@needs_bwrap
def test_mini_swe_agent_environment_runs_commands_isolated(tmp_path, loopback_server):
    from minisweagent.environments.local import LocalEnvironment

    work = tmp_path / "work"
    work.mkdir()
    prefix = bwrap_argv(PROBE.executable, writable=[work], chdir=work)
    env = isolated_environment(LocalEnvironment, prefix)(cwd=str(work), timeout=20)
    out = env.execute({"command": "echo 'quoted $HOME' > f.txt; cat f.txt; " + CONNECT.format(port=loopback_server)})
    assert out["output"].startswith("quoted ") and "CONNECTED" not in out["output"] and out["returncode"] != 0
    assert (work / "f.txt").exists()


def test_bwrap_refuses_to_hide_the_interpreter(tmp_path):
    with pytest.raises(ValueError, match="would hide"):
        bwrap_argv("bwrap", writable=[tmp_path], hide=[sys.prefix])


async def test_without_bwrap_the_sandbox_works_and_says_unisolated(task, tmp_path, caplog):
    box = await LocalSandbox.create(task, parent_dir=str(tmp_path / "boxes"), isolation="none")
    try:
        assert not box.isolated and box.command_prefix == []
        res = await run_command(box.wrap_command("echo hi"), cwd=box.workdir, timeout_s=10)
        assert res.output == "hi\n"
    finally:
        await box.teardown()
    from sandbox.bwrap import BwrapProbe

    missing = BwrapProbe(False, None, "bwrap not found on PATH")
    box = await LocalSandbox.create(task, parent_dir=str(tmp_path / "boxes"), isolation="auto", bwrap=missing)
    try:
        assert not box.isolated
        assert "NOT isolated (bwrap not found on PATH)" in caplog.text
    finally:
        await box.teardown()
    with pytest.raises(SandboxError, match="bwrap not found"):
        await LocalSandbox.create(task, parent_dir=str(tmp_path / "boxes"), isolation="bwrap", bwrap=missing)
    assert list((tmp_path / "boxes").iterdir()) == []


CRASHING_OWNER = textwrap.dedent("""
    import asyncio, json, subprocess, sys, time
    from prepare.task import SWETask
    from sandbox.local import LocalSandbox

    async def main():
        task = SWETask.model_validate_json(sys.argv[1])
        box = await LocalSandbox.create(task, parent_dir=sys.argv[2])
        # A command that escaped into its own session, as mini-swe-agent's do.
        subprocess.Popen(["setsid", "sleep", "300"], env=box.env())
        print(json.dumps({"root": str(box.root), "rollout_id": box.rollout_id}), flush=True)
        time.sleep(300)

    asyncio.run(main())
""")


async def test_reaper_cleans_up_after_a_killed_owner(task, tmp_path):
    boxes = tmp_path / "boxes"
    owner = subprocess.Popen(
        [sys.executable, "-c", CRASHING_OWNER, task.model_dump_json(), str(boxes)],
        stdout=subprocess.PIPE, text=True, cwd=os.getcwd(),
    )
    info = json.loads(owner.stdout.readline())
    live = await LocalSandbox.create(task, parent_dir=str(boxes))  # ours: alive, must stay
    try:
        deadline = time.monotonic() + 10
        while not await asyncio.to_thread(find_marked_processes, info["rollout_id"]):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        assert reap_stale_sandboxes(boxes) == []  # the owner is alive: nothing to reap
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        removed = await asyncio.to_thread(reap_stale_sandboxes, boxes)
        assert [str(p) for p in removed] == [info["root"]]
        assert await asyncio.to_thread(find_marked_processes, info["rollout_id"]) == []
        assert live.root.exists() and json.loads((live.root / OWNER_FILE).read_text())["pid"] == os.getpid()
    finally:
        await live.teardown()
    assert list(boxes.iterdir()) == []


async def test_reaper_ignores_young_ownerless_dirs_and_other_names(tmp_path):
    boxes = tmp_path / "boxes"
    (boxes / "swe-sandbox-halfmade").mkdir(parents=True)
    (boxes / "unrelated").mkdir()
    assert reap_stale_sandboxes(boxes) == []
    old = time.time() - 3600
    os.utime(boxes / "swe-sandbox-halfmade", (old, old))
    assert [p.name for p in reap_stale_sandboxes(boxes)] == ["swe-sandbox-halfmade"]
    assert (boxes / "unrelated").exists()
    assert psutil.pid_exists(os.getpid())
