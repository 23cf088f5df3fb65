"""``swe_agent.sandbox.backend=docker`` through ``SWEAgentLoop`` on a real engine.

The scripted reference policy resolves every simple task with mini-swe-agent's commands
running in per-rollout containers (the patch still taken through the sandbox's trusted
git directory), the empty policy resolves none, a memory burst past the container's limit
is an OOM kill in the rollout's record, the commands really ran in a container without
network, and nothing is left: no container labelled by the project, no sandbox directory.
Skipped without an engine unless ``SWE_RL_REQUIRE_DOCKER=1`` (CI), like
``tests/sandbox/test_docker_engine.py``.
"""

from __future__ import annotations

import asyncio
import os

import pandas as pd
import pytest
from transformers import AutoTokenizer

from recipe.config import load_swe_agent_config
from recipe.swe_agent_loop import SWEAgentLoop
from recipe.worker_resources import WorkerResources
from sandbox.docker_sandbox import LABEL_SANDBOX, docker_engine_available

ENGINE, WHY = docker_engine_available()
if not ENGINE and os.environ.get("SWE_RL_REQUIRE_DOCKER") == "1":
    raise RuntimeError(f"SWE_RL_REQUIRE_DOCKER=1 but {WHY}")
pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.skipif(not ENGINE, reason=WHY)]

SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "logprobs": True}


@pytest.fixture(scope="module")
def rows(simple_tasks_dir):
    frame = pd.concat([pd.read_parquet(simple_tasks_dir / f) for f in ("train.parquet", "test.parquet")])
    return frame.to_dict("records")[:4]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


async def _run(tokenizer, rows, tmp_path, **swe_agent):
    swe_agent = {"sandbox": {"backend": "docker", "parent_dir": str(tmp_path / "sandboxes"),
                             **swe_agent.pop("sandbox", {})}, **swe_agent}
    config = load_swe_agent_config(swe_agent)
    async with WorkerResources(config) as resources:
        loops = [SWEAgentLoop.standalone(tokenizer=tokenizer, hf_model_type="qwen2", prompt_length=8192,
                                         response_length=8192, swe_agent=swe_agent, resources=resources)
                 for _ in rows]
        outputs = await asyncio.gather(*(loop.run(dict(SAMPLING), raw_prompt=list(row["prompt"]),
                                                  extra_info=row["extra_info"]) for loop, row in zip(loops, rows)))
    return [o.extra_fields for o in outputs]


def _nothing_left(tmp_path):
    import docker

    client = docker.from_env()
    try:
        assert client.containers.list(all=True, filters={"label": f"{LABEL_SANDBOX}=1"}) == []
    finally:
        client.close()
    sandboxes = tmp_path / "sandboxes"
    assert not sandboxes.exists() or list(sandboxes.iterdir()) == []


async def test_reference_resolves_and_empty_does_not_with_commands_in_containers(rows, tokenizer, tmp_path):
    reference = await _run(tokenizer, rows, tmp_path, policy="reference")
    assert [e["resolved"] for e in reference] == [True] * len(rows), [e["error"] for e in reference]
    assert all(e["exit_status"] == "submitted" and e["model_patch"].startswith("diff --git") for e in reference)
    # The resource shim is on by default for Docker sandboxes: each container's limit moved with
    # the agent's phase through the engine, and nothing was killed for memory.
    assert all(e["shim"]["policy"] == "phase" and e["shim"]["limit_changes"] >= 2 for e in reference), \
        [e["shim"] for e in reference]
    assert all(e["shim"]["memory_kills"] == 0 and "oom_kill" not in e["limits_hit"] for e in reference)
    empty = await _run(tokenizer, rows, tmp_path, policy="empty")
    assert [e["resolved"] for e in empty] == [False] * len(rows)
    _nothing_left(tmp_path)


async def test_commands_run_in_the_container_and_a_burst_is_an_oom_kill(rows, tokenizer, tmp_path):
    script = tmp_path / "commands.sh"
    script.write_text("ls /sys/class/net > seen_net.txt; cat /proc/1/cgroup > seen_cgroup.txt\n"
                      "python -c \"b = bytearray(512 << 20)\"\n")
    extras = await _run(tokenizer, rows[:1], tmp_path, policy="script", script=str(script),
                        sandbox={"docker": {"memory_bytes": 192 << 20}})
    extra = extras[0]
    assert extra["exit_status"] == "submitted", extra["error"]
    assert extra["limits_hit"].count("oom_kill") == 1  # recorded, not a hang and not a silent 0
    assert extra["shim"]["memory_kills"] == 1  # at the container's cap, by the shim (its OOM killer is off)
    # The agent is told its command was killed, not that it timed out.
    assert "command_timeout" not in extra["limits_hit"]
    assert any("was killed (SIGKILL)" in str(m.get("content")) for m in extra["messages"])
    patch = extra["model_patch"]
    assert "seen_net.txt" in patch and "+lo" in patch and "eth0" not in patch  # no network in there
    assert "docker" in patch  # the commands' cgroup is the container's
    _nothing_left(tmp_path)


def test_kill_9_of_16_concurrent_docker_rollouts_then_a_new_start_leaves_no_container(
        simple_tasks_dir, tiny_model_dir, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    import docker

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    data = f"{simple_tasks_dir / 'train.parquet'},{simple_tasks_dir / 'test.parquet'}"
    common = [sys.executable, "-m", "recipe.rollout", f"data={data}", f"model_path={tiny_model_dir}",
              "swe_agent.sandbox.backend=docker", f"swe_agent.sandbox.parent_dir={tmp_path / 'sandboxes'}"]
    # 8 tasks x 2, all at once, each waiting 30 s for its first token: every container is up when killed.
    run = subprocess.Popen([*common, f"out_dir={tmp_path / 'killed'}", "policy=reference", "n=2", "concurrency=16",
                            "swe_agent.scripted.latency_first_token_s=30"], cwd=root,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = docker.from_env()
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            up = client.containers.list(all=True, filters={"label": f"{LABEL_SANDBOX}=1"})
            if len(up) >= 16 or run.poll() is not None:
                break
            time.sleep(1)
        assert len(up) == 16, f"{len(up)} containers up (run exited: {run.poll()})"
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=60)
        assert len(client.containers.list(all=True, filters={"label": f"{LABEL_SANDBOX}=1"})) == 16  # leaked...
        again = subprocess.run([*common, f"out_dir={tmp_path / 'again'}", "policy=empty", "limit=1"], cwd=root,
                               capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-2000:]
        # ...until the next start: the dead owner's containers are reaped, the new run's own at its exit.
        assert client.containers.list(all=True, filters={"label": f"{LABEL_SANDBOX}=1"}) == []
        assert list((tmp_path / "sandboxes").iterdir()) == []
    finally:
        if run.poll() is None:
            run.kill()
        client.close()


async def test_image_tasks_run_from_their_image_at_testbed_and_grade_in_a_fresh_container(
        simple_image_tasks_dir, tokenizer, tmp_path):
    frame = pd.concat([pd.read_parquet(simple_image_tasks_dir / f) for f in ("train.parquet", "test.parquet")])
    image_rows = frame.to_dict("records")[:3]
    assert all(row["extra_info"]["repo_path"] == "" and row["extra_info"]["image_name"] for row in image_rows)
    reference = await _run(tokenizer, image_rows, tmp_path, policy="reference")
    assert [e["resolved"] for e in reference] == [True] * len(image_rows), [e["error"] for e in reference]
    empty = await _run(tokenizer, image_rows, tmp_path, policy="empty")
    assert [e["resolved"] for e in empty] == [False] * len(image_rows)
    script = tmp_path / "where.sh"
    script.write_text("pwd > seen_cwd.txt; git log --oneline | wc -l > seen_history.txt\n")
    seen = (await _run(tokenizer, image_rows[:1], tmp_path, policy="script", script=str(script)))[0]
    assert "+/testbed" in seen["model_patch"]  # the image's work directory, where its environment expects it
    assert "seen_history.txt" in seen["model_patch"] and "\n+1\n" in seen["model_patch"]  # one commit, no history
    _nothing_left(tmp_path)
