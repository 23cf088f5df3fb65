"""The ``reference_with_tests`` scripted policy on a real rollout, recorded by the sampler.

Real parts: the rollout loop, ModelProxy, mini-swe-agent subprocess, git, the task's
pytest runs and the hidden-test grading. Only the policy is scripted (no GPU here),
and its inference time is emulated (``GenerationLatency``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time

import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from model_proxy.backends.scripted import GenerationLatency, ScriptedPolicyBackend, reference_with_tests_commands
from recipe.worker_resources import WorkerResources
from core.task import SWETask
from recipe.swe_agent_loop import SWEAgentLoop
from sandbox.measure import TreeRecorder
from sandbox.simulate import load_recorded

pytestmark = pytest.mark.slow

FIRST_TOKEN_S = 0.4


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_generation_latency_formula_and_validation():
    lat = GenerationLatency(per_token_s=0.01, first_token_s=0.5, min_turn_tokens=100)
    assert lat.seconds(20) == pytest.approx(0.5 + 0.01 * 100)  # short scripted turns count as min_turn_tokens
    assert lat.seconds(300) == pytest.approx(0.5 + 0.01 * 300)
    jittered = GenerationLatency(first_token_s=1.0, jitter_sigma=0.3)
    assert jittered.seconds(1, "r/0") == jittered.seconds(1, "r/0") != jittered.seconds(1, "r/1")
    assert not GenerationLatency().enabled
    assert dataclasses.replace(GenerationLatency.served_7b(), jitter_sigma=0.0).seconds(40) == pytest.approx(7.0)
    with pytest.raises(ValueError, match="per_token_s"):
        GenerationLatency(per_token_s=-1)


def test_scripted_backend_waits_for_the_configured_latency(tokenizer):
    backend = ScriptedPolicyBackend(tokenizer, ["ls"], latency=GenerationLatency(first_token_s=0.3))
    t0 = time.monotonic()
    out = asyncio.run(backend.generate("r", [1, 2], {}))
    assert time.monotonic() - t0 >= 0.3 and out.token_ids[-1] == tokenizer.eos_token_id


def test_reference_with_tests_script_reproduces_fixes_and_verifies():
    task = SWETask(instance_id="x", repo="r", base_commit="0" * 40, problem_statement="p", test_cmd="python -m pytest -q",
                   patch="diff --git a/pkg/m.py b/pkg/m.py\n--- a/pkg/m.py\n+++ b/pkg/m.py\n@@ -40,1 +40,1 @@\n-a = 1\n+a = 2\n",
                   FAIL_TO_PASS=["tests/test_m.py::test_a"], PASS_TO_PASS=["tests/test_n.py::test_b"])
    cmds = reference_with_tests_commands(task)
    assert "sed -n '25,65p' pkg/m.py" in cmds[0]
    assert cmds[1].startswith("python -m pytest -q tests/test_m.py::test_a")  # reproduce
    assert "git apply" in cmds[2]  # fix
    assert cmds[3].startswith("python -m pytest -q tests/test_m.py tests/test_n.py")  # the tests' files
    assert cmds[4].startswith("python -m pytest -q 2>&1 | tail")  # the whole suite
    with pytest.raises(ValueError, match="patch and test_cmd"):
        reference_with_tests_commands(task.model_copy(update={"patch": ""}))


def test_reference_with_tests_rollout_records_a_tool_burst(tmp_path, simple_tasks_dir, tokenizer):
    row = pq.read_table(simple_tasks_dir / "train.parquet").to_pylist()[0]
    task = SWETask.from_extra_info(row["extra_info"])
    backend = ScriptedPolicyBackend(tokenizer, reference_with_tests_commands(task),
                                    latency=GenerationLatency(first_token_s=FIRST_TOKEN_S))
    loop = SWEAgentLoop.standalone(tokenizer=tokenizer, hf_model_type="qwen2", prompt_length=8192, response_length=8192,
                                   swe_agent={"policy": "model", "sandbox": {"parent_dir": str(tmp_path / "sb")}},
                                   backend=backend)
    recorder = TreeRecorder(tmp_path / "traces", root_pid=os.getpid(), hz=20, scan_s=0.1)

    async def go():
        try:
            return await loop.run({"temperature": 1.0, "logprobs": True}, raw_prompt=row["prompt"],
                                  extra_info=row["extra_info"])
        finally:
            await WorkerResources.close_for_running_loop()

    recorder.start()
    try:
        out = asyncio.run(go())
    finally:
        results = recorder.stop()
    extra = out.extra_fields
    assert extra["exit_status"] == "submitted" and extra["resolved"], extra["error"]
    # 6 scripted commands + the submit turn; each turn took at least the emulated latency.
    assert extra["num_llm_calls"] == 7
    assert extra["generation_s"] >= 7 * FIRST_TOKEN_S
    res = results[extra["rollout_id"]]
    assert len(res.tool_calls) >= 2  # the pytest runs at least (sub-50 ms commands can fall between samples)
    rows = [json.loads(line) for line in (tmp_path / "traces" / f"{extra['rollout_id']}.jsonl").read_text().splitlines()]
    inference = [r["sandbox_rss"] for r in rows if r["phase"] == "inference"]
    tool = [r["sandbox_rss"] for r in rows if r["phase"] == "tool"]
    # The sandbox holds nothing while the model "thinks"; pytest runs are a burst above that.
    assert max(inference) == 0 and max(tool) > 10 << 20
    # The agent process's own memory is recorded too (the first sample may catch it before its
    # imports, a few MB: the median is what it holds while it waits for the model).
    agent = sorted(r["agent_rss"] for r in rows if r["phase"] == "inference" and r["agent_rss"])
    assert agent and agent[len(agent) // 2] > 10 << 20
    trace = load_recorded(tmp_path / "traces", 0.01)[0]
    assert trace.mem[trace.tool].max() > trace.mem[~trace.tool].max() + 10
