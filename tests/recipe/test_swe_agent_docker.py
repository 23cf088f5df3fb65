"""SWE-agent's Docker deployment on a real engine: `sweagent run` subprocesses whose SWE-ReX
container is made from the task's image with SWE-ReX built in, without a network (SWE-ReX reaches
its server through a loopback relay and a Unix socket), the work tree mounted at /testbed.

Skipped without an engine unless SWE_RL_REQUIRE_DOCKER=1, and without SWE-agent unless
SWE_RL_REQUIRE_SWEAGENT=1 (CI sets both).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from recipe.config import load_swe_agent_config
from recipe.runners.swe_agent import sweagent_available
from recipe.swe_agent_loop import SWEAgentLoop
from recipe.worker_resources import WorkerResources
from sandbox.docker_sandbox import LABEL_ROLLOUT, LABEL_SANDBOX, docker_engine_available, owner_id, reap_containers
from sandbox.local import OWNER_FILE, reap_stale_sandboxes
from sandbox.overlay import mounts_below

ROOT = Path(__file__).resolve().parents[2]
ENGINE, WHY = docker_engine_available()
if not ENGINE and os.environ.get("SWE_RL_REQUIRE_DOCKER") == "1":
    raise RuntimeError(f"SWE_RL_REQUIRE_DOCKER=1 but {WHY}")
if not sweagent_available() and os.environ.get("SWE_RL_REQUIRE_SWEAGENT") == "1":
    raise RuntimeError("SWE_RL_REQUIRE_SWEAGENT=1 but SWE-agent is not installed (bash example/install_sweagent.sh)")
pytestmark = [
    pytest.mark.docker, pytest.mark.slow,
    pytest.mark.skipif(not ENGINE, reason=WHY),
    pytest.mark.skipif(not sweagent_available(), reason="SWE-agent is not installed (bash example/install_sweagent.sh)"),
]

SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "logprobs": True}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def rows_of(tasks_dir: Path, n: int) -> list[dict]:
    rows = pq.read_table(tasks_dir / "test.parquet").to_pylist() + pq.read_table(tasks_dir / "train.parquet").to_pylist()
    return rows[:n]


async def run_rows(tokenizer, tmp_path: Path, rows: list[dict], **swe_agent) -> list[dict]:
    swe_agent = {"sandbox": {"parent_dir": str(tmp_path / "boxes")},
                 "agent": {"backend": "swe_agent", "sweagent_deployment": "docker", **swe_agent.pop("agent", {})},
                 **swe_agent}
    async with WorkerResources(load_swe_agent_config(swe_agent)) as resources:
        loops = [SWEAgentLoop.standalone(tokenizer=tokenizer, hf_model_type="qwen2", prompt_length=8192,
                                         response_length=4096, swe_agent=swe_agent, resources=resources)
                 for _ in rows]
        outputs = await asyncio.gather(*(loop.run(dict(SAMPLING), raw_prompt=list(row["prompt"]),
                                                  extra_info=row["extra_info"]) for loop, row in zip(loops, rows)))
    return [o.extra_fields for o in outputs]


def labelled_containers() -> list:
    import docker

    client = docker.from_env()
    try:
        return client.containers.list(all=True, filters={"label": f"{LABEL_SANDBOX}=1"})
    finally:
        client.close()


def policy_sleeps(container) -> bool:
    """Whether the policy's `sleep` runs in `container`; False once it has stopped (a container listed as
    running can exit before the exec reaches it)."""
    import docker

    try:
        return b"sleep" in container.exec_run(["sh", "-c", "cat /proc/[0-9]*/comm"]).output
    except docker.errors.APIError:
        return False


def assert_nothing_left(tmp_path: Path) -> None:
    assert labelled_containers() == []
    boxes = tmp_path / "boxes"
    assert not boxes.exists() or list(boxes.iterdir()) == []


@pytest.mark.parametrize("tasks", ["repository", "image"])
async def test_reference_resolves_and_empty_does_not_in_sweagent_containers(tasks, simple_tasks_dir,
                                                                          simple_image_tasks_dir, tokenizer, tmp_path):
    rows = rows_of(simple_tasks_dir if tasks == "repository" else simple_image_tasks_dir, 2)
    reference = await run_rows(tokenizer, tmp_path, rows, policy="reference")
    for extra in reference:
        assert extra["exit_status"] == "submitted" and extra["agent_exit_status"] == "submitted", extra["error"]
        assert extra["resolved"] and extra["model_patch"].startswith("diff --git"), extra["grade"]
        assert extra["num_segments"] == 1
    empty = await run_rows(tokenizer, tmp_path, rows, policy="empty")
    assert [(e["exit_status"], e["resolved"], e["model_patch"]) for e in empty] == [("submitted", False, "")] * 2
    assert_nothing_left(tmp_path)


async def test_policy_commands_in_the_container_have_no_network_or_capabilities(simple_tasks_dir, tokenizer,
                                                                                tmp_path):
    script = tmp_path / "script.sh"
    script.write_text(
        "echo cwd=$(pwd) ifaces=$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | tr '\\n' ,)"
        " caps=$(grep CapEff /proc/self/status | tr -d '\\t')\n"
        "python3 -c \"import socket; s=socket.socket(); s.settimeout(3); print('egress', s.connect_ex(('8.8.8.8', 53)))\"\n"
        "grep -rl swe-policy / --include=*.yaml 2>/dev/null | head -3; echo searched\n")
    extra = (await run_rows(tokenizer, tmp_path, rows_of(simple_tasks_dir, 1), policy="script",
                            script=str(script)))[0]
    seen = "\n".join(str(m.get("content")) for m in extra["messages"] if m.get("role") == "tool")
    assert "cwd=/testbed" in seen and "ifaces=lo," in seen, seen
    assert "caps=CapEff:0000000000000000" in seen, seen
    assert "egress 0" not in seen and "egress" in seen, seen
    assert "training.yaml" not in seen and "searched" in seen
    assert_nothing_left(tmp_path)


@pytest.mark.timeout(900)
def test_a_killed_run_leaves_containers_only_to_the_reaper(simple_tasks_dir, tmp_path):
    """SIGKILL the rollout command while SWE-agent's containers run a policy command: SWE-agent dies
    with it (pdeathsig); its containers carry the dead owner's label and the next start-up's reaper
    removes them."""
    script = tmp_path / "script.sh"
    script.write_text("sleep 300\n")
    parent = tmp_path / "boxes"
    cmd = [sys.executable, "-m", "recipe.rollout", f"data={simple_tasks_dir / 'test.parquet'}", "policy=script",
           f"script={script}", "limit=2", "concurrency=2", f"out_dir={tmp_path / 'out'}",
           "swe_agent.agent.backend=swe_agent", "swe_agent.agent.sweagent_deployment=docker",
           f"swe_agent.sandbox.parent_dir={parent}"]
    log = tmp_path / "rollout.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)
    rollout_ids: set[str] = set()
    try:
        # SWE-agent's start (imports, tool install) takes ~30 s alone and minutes on a loaded machine.
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            for owner in parent.glob(f"*/{OWNER_FILE}") if parent.exists() else []:
                try:
                    rollout_ids.add(json.loads(owner.read_text())["rollout_id"])
                except (OSError, ValueError, KeyError):
                    pass
            running = [c for c in labelled_containers() if c.labels.get(LABEL_ROLLOUT) in rollout_ids
                       and c.status == "running"]
            if len(running) == 2 and all(policy_sleeps(c) for c in running):
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"the policy's commands never started; the rollout printed:\n{log.read_text()[-4000:]}")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    time.sleep(2)
    sweagents = subprocess.run(["pgrep", "-f", f"sweagent run .*{parent}"], capture_output=True, text=True)
    assert sweagents.stdout.strip() == "", "SWE-agent outlived the rollout command"
    import docker

    client = docker.from_env()
    try:
        removed = reap_containers(client, owner_id())  # what the next start-up's factory does
    finally:
        client.close()
    assert set(removed) == rollout_ids
    assert [c for c in labelled_containers() if c.labels.get(LABEL_ROLLOUT) in rollout_ids] == []
    # ...and its sandboxes (their work trees' overlays included) go to the same start-up's reaper.
    assert len(reap_stale_sandboxes(parent)) == 2
    assert mounts_below(parent) == [] and list(parent.iterdir()) == []
