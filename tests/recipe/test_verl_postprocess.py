"""Our outputs through verl's own post-processing (padding to prompt_length/response_length), per exit status.

verl's ``AgentLoopWorker._agent_loop_postprocess`` is what turns an
``AgentLoopOutput`` into the padded tensors the trainer sees. A worker normally
lives in a Ray actor with GPU servers behind it; here one is made without
``__init__`` and given only the attributes post-processing reads (tokenizer,
rollout lengths, no processor, no reward workers, no distillation) -- the only
stand-in, because the rest cannot run without GPUs.
"""

from __future__ import annotations

from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer
from verl.experimental.agent_loop.agent_loop import AgentLoopWorker

from model_proxy.backends.base import GenerationOutput
from model_proxy.backends.scripted import ScriptedPolicyBackend
from model_proxy.server import ModelProxyServer
from recipe.outcome import ExitStatus
from recipe.swe_agent_loop import SWEAgentLoop

PROMPT_LENGTH, RESPONSE_LENGTH = 4096, 2048

pytestmark = pytest.mark.slow


def make_worker(tokenizer) -> AgentLoopWorker:
    worker = object.__new__(AgentLoopWorker)
    worker.tokenizer = tokenizer
    worker.processor = None
    worker.rollout_config = SimpleNamespace(prompt_length=PROMPT_LENGTH, response_length=RESPONSE_LENGTH)
    worker.reward_loop_worker_handles = None
    worker.distillation_enabled = False
    worker.mm_processor_kwargs = {}
    return worker


class FailingBackend:
    async def generate(self, request_id, prompt_ids, sampling_params) -> GenerationOutput:
        raise RuntimeError("generation server is down")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def row(simple_tasks_dir):
    return pq.read_table(simple_tasks_dir / "test.parquet").to_pylist()[0]


def scenarios(tokenizer, row):
    broken = dict(row["extra_info"], repo_path="/nonexistent")
    return {
        ExitStatus.SUBMITTED: ({"policy": "reference"}, None, row["extra_info"]),
        ExitStatus.STEP_LIMIT: ({"agent": {"step_limit": 1}}, ScriptedPolicyBackend(tokenizer, ["ls", "ls"]), row["extra_info"]),
        ExitStatus.CONTEXT_LIMIT: ({}, ScriptedPolicyBackend(tokenizer, ["seq 1 4000"]), row["extra_info"]),
        ExitStatus.ROLLOUT_TIMEOUT: ({"agent": {"rollout_timeout_s": 6.0}}, ScriptedPolicyBackend(tokenizer, ["sleep 60"]), row["extra_info"]),
        ExitStatus.PROXY_ERROR: ({}, FailingBackend(), row["extra_info"]),
        ExitStatus.SANDBOX_ERROR: ({"policy": "reference"}, None, broken),
    }


@pytest.mark.parametrize("status", [
    ExitStatus.SUBMITTED, ExitStatus.STEP_LIMIT, ExitStatus.CONTEXT_LIMIT,
    ExitStatus.ROLLOUT_TIMEOUT, ExitStatus.PROXY_ERROR, ExitStatus.SANDBOX_ERROR,
])
async def test_outputs_pass_verl_postprocessing(status, tokenizer, row, tmp_path):
    swe_agent, backend, extra_info = scenarios(tokenizer, row)[status]
    swe_agent = {**swe_agent, "sandbox": {"parent_dir": str(tmp_path)}}
    loop = SWEAgentLoop.standalone(tokenizer=tokenizer, hf_model_type="qwen2", prompt_length=PROMPT_LENGTH,
                                   response_length=RESPONSE_LENGTH, swe_agent=swe_agent, backend=backend)
    try:
        out = await loop.run({"temperature": 1.0, "logprobs": True}, raw_prompt=row["prompt"], extra_info=extra_info)
    finally:
        await ModelProxyServer.stop_shared()
    assert out.extra_fields["exit_status"] == status.value, out.extra_fields["error"]

    padded = await make_worker(tokenizer)._agent_loop_postprocess(out, validate=False, raw_prompt=row["prompt"])
    n_prompt, n_resp = len(out.prompt_ids), len(out.response_ids)
    assert padded.prompt_ids.shape == (1, PROMPT_LENGTH)
    assert padded.response_ids.shape == padded.response_mask.shape == (1, RESPONSE_LENGTH)
    assert padded.input_ids.shape == padded.attention_mask.shape == (1, PROMPT_LENGTH + RESPONSE_LENGTH)
    assert padded.response_logprobs.shape == (1, RESPONSE_LENGTH)
    # Left-padded prompt, right-padded response, our tokens verbatim.
    assert padded.prompt_ids[0, PROMPT_LENGTH - n_prompt:].tolist() == out.prompt_ids
    assert padded.response_ids[0, :n_resp].tolist() == out.response_ids
    assert padded.attention_mask[0].sum().item() == n_prompt + n_resp
    # The loss sees exactly our mask; padding never trains.
    assert padded.response_mask[0, :n_resp].tolist() == out.response_mask
    assert padded.response_mask[0, n_resp:].sum().item() == 0
    assert torch.allclose(padded.response_logprobs[0, :n_resp], torch.tensor(out.response_logprobs))
    masked = status.is_limit or status.is_infra_failure
    assert (padded.response_mask.sum().item() == 0) == masked
    assert padded.reward_score == out.reward_score
    assert set(out.extra_fields["reward_extra_info"]) >= {"resolved", f"exit_{status.value}"}
    assert out.extra_fields["reward_extra_info"][f"exit_{status.value}"] == 1.0
