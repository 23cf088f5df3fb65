"""SWE-agent for real: `sweagent run` subprocesses (the vendored SWE-agent 1.1.0, installed by
example/install_sweagent.sh) through the loop, the proxy, the local deployment's nested jails and
the hidden-test grader.

Skipped when SWE-agent is not installed, unless SWE_RL_REQUIRE_SWEAGENT=1 (CI sets it: tests/run.sh
installs the vendored source there) makes that a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

import recipe.runners.swe_agent as swe_agent_runner
from recipe.outcome import ExitStatus
from recipe.runners.swe_agent import sweagent_available
from recipe.swe_agent_loop import SWEAgentLoop
from recipe.worker_resources import WorkerResources
from sandbox.jail import bwrap_available
from sandbox.local import OWNER_FILE, ROLLOUT_MARKER_ENV, find_marked_processes, reap_stale_sandboxes

ROOT = Path(__file__).resolve().parents[2]

if not sweagent_available() and os.environ.get("SWE_RL_REQUIRE_SWEAGENT") == "1":
    raise RuntimeError("SWE_RL_REQUIRE_SWEAGENT=1 but SWE-agent is not installed (bash example/install_sweagent.sh)")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sweagent_available(), reason="SWE-agent is not installed (bash example/install_sweagent.sh)"),
    pytest.mark.skipif(not bwrap_available(), reason="the local deployment runs in bubblewrap"),
]

SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "logprobs": True}


def rows_of(tasks_dir: Path, n: int) -> list[dict]:
    rows = pq.read_table(tasks_dir / "test.parquet").to_pylist() + pq.read_table(tasks_dir / "train.parquet").to_pylist()
    return rows[:n]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(autouse=True)
async def _close_worker_resources():
    yield
    await WorkerResources.close_for_running_loop()


def make_loop(tokenizer, parent: Path, **swe_agent) -> SWEAgentLoop:
    agent = {"backend": "swe_agent", "sweagent_deployment": "local", **swe_agent.pop("agent", {})}
    return SWEAgentLoop.standalone(
        tokenizer=tokenizer, hf_model_type="qwen2", prompt_length=8192, response_length=4096,
        swe_agent={"sandbox": {"parent_dir": str(parent), "isolation": "bwrap"}, "agent": agent, **swe_agent},
    )


async def run_rows(tokenizer, parent: Path, rows: list[dict], **swe_agent):
    return await asyncio.gather(*(make_loop(tokenizer, parent, **swe_agent).run(
        dict(SAMPLING), raw_prompt=row["prompt"], extra_info=row["extra_info"]) for row in rows))


def assert_nothing_left(outputs, parent: Path) -> None:
    for out in outputs:
        assert find_marked_processes(out.extra_fields["rollout_id"]) == []
    assert not parent.exists() or list(parent.iterdir()) == []


def observations(out) -> str:
    return "\n".join(str(m.get("content")) for m in out.extra_fields["messages"] if m.get("role") == "tool")


@pytest.mark.parametrize("tasks", ["simple", "smith"])
async def test_reference_policy_resolves_through_real_sweagent(tasks, simple_tasks_dir, smith_tasks_dir, tokenizer,
                                                               tmp_path):
    rows = rows_of(simple_tasks_dir if tasks == "simple" else smith_tasks_dir, 2)
    outputs = await run_rows(tokenizer, tmp_path / "boxes", rows, policy="reference")
    for out in outputs:
        extra = out.extra_fields
        assert extra["exit_status"] == ExitStatus.SUBMITTED.value, (extra["error"], extra["agent_exit_status"])
        assert extra["agent_exit_status"] == "submitted"
        assert extra["resolved"] and out.reward_score == 1.0, extra["grade"]
        # The patch is the work tree's change, where SWE-agent edited, not an untouched copy.
        assert extra["model_patch"].strip() and "diff --git" in extra["model_patch"]
        # Append-only history: one token segment, the sampled turns in the loss mask.
        assert extra["num_segments"] == 1 and sum(out.response_mask) > 0
        assert len(out.response_mask) == len(out.response_ids) == len(out.response_logprobs)
        # SWE-agent's own tools and prompts, through function calling; its submit asks once more.
        assert "<uploaded_files>\n/testbed" in str(extra["messages"][1]["content"])
        assert extra["num_llm_calls"] >= 3
    assert_nothing_left(outputs, tmp_path / "boxes")


async def test_empty_policy_resolves_nothing(simple_tasks_dir, tokenizer, tmp_path):
    outputs = await run_rows(tokenizer, tmp_path / "boxes", rows_of(simple_tasks_dir, 2), policy="empty")
    for out in outputs:
        extra = out.extra_fields
        assert extra["exit_status"] == ExitStatus.SUBMITTED.value, extra["error"]
        assert not extra["resolved"] and out.reward_score == 0.0 and extra["model_patch"] == ""
    assert_nothing_left(outputs, tmp_path / "boxes")


async def test_call_limit_is_our_step_limit(simple_tasks_dir, tokenizer, tmp_path):
    outputs = await run_rows(tokenizer, tmp_path / "boxes", rows_of(simple_tasks_dir, 1), policy="script",
                             script=str(_script(tmp_path, ["ls", "ls", "ls", "ls"])), agent={"step_limit": 2})
    extra = outputs[0].extra_fields
    assert extra["agent_exit_status"].endswith("exit_cost)") or extra["agent_exit_status"] == "exit_cost"
    assert extra["exit_status"] == ExitStatus.STEP_LIMIT.value and extra["masked"]


def _script(tmp_path: Path, commands: list[str]) -> Path:
    path = tmp_path / "script.sh"
    path.write_text("\n".join(commands) + "\n")
    return path


async def test_policy_commands_cannot_reach_the_harness_or_make_it_run_their_git_config(
        simple_tasks_dir, tokenizer, tmp_path):
    """The policy's shell: no network, no view of SWE-agent's processes, files or session key; a git
    config it plants (global safe.directory, a repository fsmonitor) never runs as the harness when
    SWE-agent autosubmits after the call limit (it runs `git add -A && git diff` itself)."""
    commands = [
        "git config --global safe.directory '*' && git config core.fsmonitor 'id -u > /testbed/hook_uid.txt; false'",
        "echo uid=$(id -u) pids=$(ls /proc | grep -c '^[0-9]') ifaces=$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | tr '\\n' ,)",
        "grep -rl swe-policy / --include=*.yaml 2>/dev/null | head -3; echo searched",
        "ls",
    ]
    outputs = await run_rows(tokenizer, tmp_path / "boxes", rows_of(simple_tasks_dir, 1), policy="script",
                             script=str(_script(tmp_path, commands)), agent={"step_limit": 4})
    extra = outputs[0].extra_fields
    seen = observations(outputs[0])
    assert "ifaces=lo," in seen, seen
    uid = int(seen.split("uid=", 1)[1].split()[0])
    pids = int(seen.split("pids=", 1)[1].split()[0])
    assert uid != 0 and pids < 10, seen  # its own PID namespace: bash, a few children
    assert "training.yaml" not in seen and "searched" in seen  # the harness's config is out of sight
    # SWE-agent autosubmitted (call limit) with its own git: that git must not have run the hook as root.
    assert extra["agent_exit_status"].startswith(("submitted (exit_cost", "exit_cost")), extra["agent_exit_status"]
    # No git runs in the policy's shell here, so the hook's file exists only if the harness ran it.
    assert "hook_uid.txt" not in extra["model_patch"], extra["model_patch"]
    assert_nothing_left(outputs, tmp_path / "boxes")


async def test_cache_control_markers_moving_between_messages_keep_one_segment(
        simple_tasks_dir, tokenizer, tmp_path, monkeypatch):
    """SWE-agent's default history processor marks the last 2 messages with cache_control each turn
    (and unmarks older ones): the proxy drops the markers, so the history stays append-only."""
    monkeypatch.setattr(swe_agent_runner, "TRAINING_HISTORY_PROCESSORS",
                        [{"type": "cache_control", "last_n_messages": 2}])
    outputs = await run_rows(tokenizer, tmp_path / "boxes", rows_of(simple_tasks_dir, 1), policy="reference")
    extra = outputs[0].extra_fields
    assert extra["exit_status"] == ExitStatus.SUBMITTED.value and extra["resolved"], extra["error"]
    assert extra["num_segments"] == 1


def _marked(rollout_ids: set[str], name: str | None = None) -> list[psutil.Process]:
    """Live processes carrying one of the rollouts' marker (named ``name``); ones that exit while
    they are looked at are left out."""
    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if (p.environ().get(ROLLOUT_MARKER_ENV) in rollout_ids and p.status() != psutil.STATUS_ZOMBIE
                    and (name is None or p.name() == name)):
                out.append(p)
        except (psutil.Error, OSError):
            continue
    return out


@pytest.mark.timeout(900)
def test_a_killed_sweagent_run_leaves_no_process(simple_tasks_dir, tmp_path):
    """SIGKILL the rollout command while SWE-agent's shell runs a policy command: the harness, its
    jails and the command die; the next start-up's reaper removes the directories."""
    parent = tmp_path / "boxes"
    script = _script(tmp_path, ["sleep 300"])
    cmd = [sys.executable, "-m", "recipe.rollout", f"data={simple_tasks_dir / 'test.parquet'}", "policy=script",
           f"script={script}", "limit=2", "concurrency=2", f"out_dir={tmp_path / 'out'}",
           "swe_agent.agent.backend=swe_agent", "swe_agent.agent.sweagent_deployment=local",
           "swe_agent.sandbox.isolation=bwrap", f"swe_agent.sandbox.parent_dir={parent}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rollout_ids: set[str] = set()
    sleepers: list[psutil.Process] = []
    try:
        # SWE-agent's start (imports, tool install) takes ~30 s alone and minutes on a loaded machine.
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None and len(sleepers) < 2:
            for owner in parent.glob(f"*/{OWNER_FILE}") if parent.exists() else []:
                try:
                    rollout_ids.add(json.loads(owner.read_text())["rollout_id"])
                except (OSError, ValueError, KeyError):
                    pass
            sleepers = _marked(rollout_ids, name="sleep")
            time.sleep(0.3)
        assert len(sleepers) == 2, "the policy's commands never started"
        with contextlib.suppress(psutil.NoSuchProcess):
            assert all(p.uids().real != 0 for p in sleepers)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _marked(rollout_ids):
        time.sleep(0.2)
    left = _marked(rollout_ids)
    assert left == [], f"processes left: {[(p.pid, p.name()) for p in left]}"
    reap_stale_sandboxes(parent)
    assert list(parent.iterdir()) == []
