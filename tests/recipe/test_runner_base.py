"""The runner base every agent goes through (``recipe.runners.base.run_agent``).

A minimal adapter (a real Python subprocess in a real sandbox) shows what every agent
gets the same way: its exit read through the adapter, a process that leaves no result
becoming ``agent_error`` with its log tail, the rollout timeout killing its process
group, the runner environment without trainer secrets, and the shim's wrap placed by
the adapter's ``wrap_scope``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from core.gitrepo import GIT_ENV
from core.task import SWETask
from recipe.config import AgentSettings
from recipe.outcome import ExitStatus
from recipe.runners.base import AgentAdapter, AgentRun, run_agent
from sandbox.local import LocalSandbox



@dataclass
class ScriptAgent(AgentAdapter):
    code: str
    scope: str = "agent"

    name = "script-agent"

    @property
    def wrap_scope(self):  # type: ignore[override]
        return self.scope

    def log_path(self, sandbox: LocalSandbox) -> Path:
        return sandbox.runner_dir / "script.log"

    def environment(self, sandbox, settings):
        return {"SCRIPT_AGENT": "1"}

    async def prepare(self, sandbox, settings, wrap_command):
        self.wrapped_command = wrap_command(["cmd"]) if wrap_command else None
        return [sys.executable, "-c", self.code, str(sandbox.runner_dir / "result.json")]

    async def read_result(self, sandbox, exit_code, duration_s, log_tail):
        path = sandbox.runner_dir / "result.json"
        if not path.exists():
            return None
        return AgentRun(ExitStatus.SUBMITTED, json.loads(path.read_text())["status"], 1, duration_s, log_tail=log_tail)


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


WRITES_RESULT = (
    "import json, os, sys; print('agent ran', os.environ.get('SCRIPT_AGENT'), os.environ.get('SECRET_TOKEN'));"
    "json.dump({'status': 'Submitted'}, open(sys.argv[1], 'w'))"
)


async def test_the_adapters_result_with_the_runner_environment(sandbox, monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "trainer-secret")
    run = await run_agent(ScriptAgent(WRITES_RESULT), sandbox, AgentSettings())
    assert run.exit_status is ExitStatus.SUBMITTED and run.raw_exit_status == "Submitted"
    assert "agent ran 1 None" in run.log_tail  # its own variable, no trainer secret


async def test_no_result_is_an_agent_error_with_the_log(sandbox):
    run = await run_agent(ScriptAgent("import sys; print('boom'); sys.exit(3)"), sandbox, AgentSettings())
    assert run.exit_status is ExitStatus.AGENT_ERROR and run.raw_exit_status == "crashed"
    assert "code 3 without a result" in run.error and "boom" in run.log_tail


async def test_the_rollout_timeout_kills_the_agent(sandbox):
    settings = AgentSettings(rollout_timeout_s=1.0)
    run = await run_agent(ScriptAgent("import time; time.sleep(60)"), sandbox, settings)
    assert run.exit_status is ExitStatus.ROLLOUT_TIMEOUT and "rollout_timeout_s=1.0" in run.error


@pytest.mark.parametrize("scope", ["agent", "command"])
async def test_the_shims_wrap_goes_where_the_adapter_says(sandbox, tmp_path, scope):
    marker = tmp_path / "wrapped"

    def wrap(argv):
        return ["sh", "-c", f'echo wrapped >> "{marker}"; exec "$@"', "sh", *argv]

    agent = ScriptAgent(WRITES_RESULT, scope=scope)
    run = await run_agent(agent, sandbox, AgentSettings(), wrap_argv=wrap)
    assert run.exit_status is ExitStatus.SUBMITTED
    if scope == "agent":
        assert marker.read_text() == "wrapped\n" and agent.wrapped_command is None
    else:  # in front of each tool command, not the agent process
        assert not marker.exists() and agent.wrapped_command[:2] == ["sh", "-c"]
