"""Warm agent start (``recipe.runners.warm_start``): a child forked from the worker's pre-imported
server must be, to the rollout, what a cold ``python -P -m MODULE`` start gives -- same session and
process group, working directory, environment (and the marker the sandbox finds its processes by in
``/proc/<pid>/environ``), descriptors, log -- and must die with the server, the rollout timeout or a
kill, as a cold one does.

A real server process forks a probe module (written here, found through ``PYTHONPATH``) that
reports what it sees; the same probe started cold is the reference.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from core.gitrepo import GIT_ENV
from core.task import SWETask
from recipe.runners.base import agent_environment, spawn_agent, warm_server_environment
from recipe.runners.warm_start import AgentForkServer, WarmStartError, WarmStartPool
from sandbox.local import LocalSandbox, find_marked_processes

PROBE = '''
import json, os, signal, sys, time

def warm_imports():
    return ["decimal"]

if __name__ == "__main__":
    out, mode = sys.argv[1], sys.argv[2]
    fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
    with open("/proc/self/environ", "rb") as fh:
        proc_env = dict(v.split("=", 1) for v in fh.read().decode().split("\\0") if "=" in v)
    info = {"pid": os.getpid(), "pgid": os.getpgid(0), "sid": os.getsid(0), "cwd": os.getcwd(),
            "env": dict(os.environ), "argv": sys.argv[1:], "fds": fds, "stdin": os.readlink("/proc/self/fd/0"),
            "proc_marker": proc_env.get("SWE_ROLLOUT_ID"), "decimal_loaded": "decimal" in sys.modules,
            "signals": [str(signal.getsignal(s)) for s in (signal.SIGPIPE, signal.SIGINT, signal.SIGTERM)]}
    with open(out, "w") as fh:
        json.dump(info, fh)
    print("probe ran", flush=True)
    if mode == "sleep":
        time.sleep(600)
    sys.exit(int(mode) if mode.isdigit() else 0)
'''
BROKEN = "raise RuntimeError('this agent cannot be imported')\n"


@pytest.fixture
def probe_dir(tmp_path):
    d = tmp_path / "probe"
    d.mkdir()
    (d / "probe_agent.py").write_text(PROBE)
    (d / "broken_agent.py").write_text(BROKEN)
    return d


@pytest.fixture
async def sandbox(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "a.py").write_text("x = 1\n")
    env = {**os.environ, **GIT_ENV}
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "base"]):
        subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, env=env)
    base = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    task = SWETask(instance_id="t-1", repo="local/t", base_commit=base, problem_statement="p", repo_path=str(repo))
    box = await LocalSandbox.create(task, parent_dir=str(tmp_path / "boxes"))
    yield box
    await box.teardown()


def env_of(probe_dir: Path):
    variables = {"PYTHONPATH": str(probe_dir), "AGENT_SETTING": "on"}
    return variables, (lambda home: warm_server_environment(home, variables))


@pytest.fixture
async def server(probe_dir):
    _, for_home = env_of(probe_dir)
    server = await AgentForkServer.start("probe_agent", for_home, timeout_s=120)
    yield server
    await server.aclose()


def argv(out: Path, mode: str) -> list[str]:
    return [sys.executable, "-P", "-m", "probe_agent", str(out), mode]


async def probe(sandbox, probe_dir, tmp_path, *, warm, mode="0", name="probe.json", timeout_s=120.0):
    variables, _ = env_of(probe_dir)
    out = tmp_path / name
    log = sandbox.runner_dir / f"{name}.log"
    code, timed_out, _ = await spawn_agent(sandbox, argv(out, mode), env=agent_environment(sandbox, variables),
                                           log_path=log, timeout_s=timeout_s, warm=warm)
    info = json.loads(out.read_text()) if out.exists() else None
    return code, timed_out, info, log.read_text()


async def test_a_forked_agent_is_what_a_cold_start_gives(sandbox, probe_dir, tmp_path, server):
    cold_code, _, cold, cold_log = await probe(sandbox, probe_dir, tmp_path, warm=None, name="cold.json")
    warm_code, _, warm, warm_log = await probe(sandbox, probe_dir, tmp_path, warm=server, name="warm.json")
    assert cold_code == warm_code == 0
    assert warm["pid"] != cold["pid"]
    for info in (cold, warm):
        assert info["pgid"] == info["sid"] == info["pid"], "its own session and process group"
        assert info["cwd"] == str(sandbox.runner_dir)
        assert info["stdin"] == "/dev/null"
        assert info["proc_marker"] == sandbox.rollout_id, "the sandbox finds it by /proc/<pid>/environ"
    assert warm["env"] == cold["env"] == agent_environment(sandbox, env_of(probe_dir)[0])
    assert warm["argv"][1:] == cold["argv"][1:] == ["0"]
    assert warm["fds"] == cold["fds"], "no descriptor of the server leaks into the child"
    assert warm["signals"] == cold["signals"], "SIGPIPE ignored and SIGINT a KeyboardInterrupt, as in a cold start"
    assert "probe ran" in cold_log and "probe ran" in warm_log
    assert warm["decimal_loaded"] and not cold["decimal_loaded"], "the warm child has the server's imports"


async def test_exit_codes_timeouts_and_kills_reach_the_rollout(sandbox, probe_dir, tmp_path, server):
    code, timed_out, _, _ = await probe(sandbox, probe_dir, tmp_path, warm=server, mode="3")
    assert (code, timed_out) == (3, False)

    code, timed_out, info, _ = await probe(sandbox, probe_dir, tmp_path, warm=server, mode="sleep",
                                           name="slow.json", timeout_s=3.0)
    assert timed_out
    assert not psutil.pid_exists(info["pid"]) or psutil.Process(info["pid"]).status() == psutil.STATUS_ZOMBIE

    job = asyncio.create_task(probe(sandbox, probe_dir, tmp_path, warm=server, mode="sleep", name="killed.json"))
    while not (tmp_path / "killed.json").exists():
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    killed = json.loads((tmp_path / "killed.json").read_text())["pid"]
    assert [p.pid for p in await asyncio.to_thread(find_marked_processes, sandbox.rollout_id)] == [killed]
    os.kill(killed, 9)
    code, timed_out, _, _ = await job
    assert (code, timed_out) == (-9, False)


async def test_a_cancelled_rollout_kills_its_forked_agent(sandbox, probe_dir, tmp_path, server):
    job = asyncio.create_task(probe(sandbox, probe_dir, tmp_path, warm=server, mode="sleep"))
    while not (tmp_path / "probe.json").exists():
        await asyncio.sleep(0.05)
    pid = json.loads((tmp_path / "probe.json").read_text())["pid"]
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    deadline = time.monotonic() + 10
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the forked agent outlived its cancelled rollout"
        await asyncio.sleep(0.05)


async def test_children_die_with_the_server_and_rollouts_then_start_cold(sandbox, probe_dir, tmp_path, server):
    job = asyncio.create_task(probe(sandbox, probe_dir, tmp_path, warm=server, mode="sleep"))
    while not (tmp_path / "probe.json").exists():
        await asyncio.sleep(0.05)
    pid = json.loads((tmp_path / "probe.json").read_text())["pid"]
    await server.aclose()
    code, timed_out, _, _ = await asyncio.wait_for(job, 30)
    assert code is None and not timed_out, "the server's end is reported as an exit without a code"
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    with pytest.raises(WarmStartError):
        await server.spawn(["x", "0"], env={}, cwd=str(tmp_path), log_path=str(tmp_path / "l"), marker="1" * 32)
    code, _, info, _ = await probe(sandbox, probe_dir, tmp_path, warm=server, name="after.json")
    assert code == 0 and info["proc_marker"] == sandbox.rollout_id and not info["decimal_loaded"]


async def test_a_server_that_cannot_start_means_cold_starts(probe_dir, caplog):
    pool = WarmStartPool(timeout_s=60)
    _, for_home = env_of(probe_dir)
    try:
        assert await pool.server("broken_agent", for_home) is None
        assert "this agent cannot be imported" in caplog.text
        assert await pool.server("broken_agent", for_home) is None  # reported once, not retried
        working = await pool.server("probe_agent", for_home)
        assert working is not None and working.running
    finally:
        await pool.aclose()
    assert not working.running and not working.socket_path.parent.exists()


async def test_a_child_whose_asker_goes_away_is_killed(sandbox, probe_dir, tmp_path, server):
    """A rollout cancelled between asking for its agent and tracking it: closing the connection
    kills the child, so nothing runs that no rollout will kill."""
    variables, _ = env_of(probe_dir)
    out = tmp_path / "orphan.json"
    reader, writer = await asyncio.open_unix_connection(str(server.socket_path))
    request = {"args": [str(out), "sleep"], "env": agent_environment(sandbox, variables),
               "cwd": str(sandbox.runner_dir), "log_path": str(tmp_path / "orphan.log"), "marker": sandbox.rollout_id}
    writer.write((json.dumps(request) + "\n").encode())
    pid = json.loads(await reader.readline())["pid"]
    while not out.exists():
        await asyncio.sleep(0.05)
    writer.close()
    deadline = time.monotonic() + 10
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the child outlived the connection that asked for it"
        await asyncio.sleep(0.05)


async def test_the_server_refuses_a_bad_request_without_forking(server, tmp_path):
    with pytest.raises(WarmStartError, match="marker"):
        await server.spawn(["out", "0"], env={}, cwd=str(tmp_path), log_path=str(tmp_path / "l"), marker="short")
    assert psutil.Process(server._proc.pid).children() == []
