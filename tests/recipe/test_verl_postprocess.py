"""Our outputs through verl's own post-processing (padding to prompt_length/response_length), per exit status.

The loop is built the way verl's ``AgentLoopWorker`` builds it (agent-loop YAML in
the registry, ``hydra.utils.instantiate``, the ``swe_agent`` section from the
trainer config) and generates through verl's server-manager interface.
``AgentLoopWorker._agent_loop_postprocess`` then turns each output into the padded
tensors the trainer sees. Stand-ins, because GPU servers cannot run here: the
server manager wraps local backends (the tiny random model, scripted turns), and
the worker is made without ``__init__`` with only the attributes post-processing
reads (tokenizer, rollout lengths, no processor, no reward workers, no distillation).
"""

from __future__ import annotations

from types import SimpleNamespace

import shutil
from pathlib import Path

import hydra
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer
from omegaconf import OmegaConf
from verl.experimental.agent_loop.agent_loop import (
    AgentLoopWorker,
    DictConfigWrap,
    ToolListWrap,
    _agent_loop_registry,
)
from verl.workers.rollout.replica import TokenOutput

from model_proxy.backends.base import GenerationOutput
from model_proxy.backends.scripted import ScriptedPolicyBackend
from recipe.worker_resources import WorkerResources
from recipe.outcome import ExitStatus
from core.task import SWETask
from recipe.swe_agent_loop import SWEAgentLoop, reference_commands

PROMPT_LENGTH, RESPONSE_LENGTH = 4096, 2048
CONFIGS = Path(__file__).resolve().parents[2] / "configs"

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


class ServerManager:
    """verl's server-manager interface (``generate(request_id, *, prompt_ids, sampling_params)``
    -> ``TokenOutput``) over a local backend: the GPU servers cannot exist here."""

    def __init__(self, backend):
        self.backend = backend

    async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs) -> TokenOutput:
        out = await self.backend.generate(request_id, prompt_ids, sampling_params)
        return TokenOutput(token_ids=out.token_ids, log_probs=out.logprobs,
                           stop_reason="aborted" if out.stop_reason == "abort" else "completed")


class RepoVanishesBackend:
    """Edits a file, then submits; the task's repository is deleted meanwhile (a data volume
    gone mid-run), so grading the non-empty patch fails."""

    def __init__(self, tokenizer, repo):
        self.scripted = ScriptedPolicyBackend(tokenizer, ["echo edit >> README.md"])
        self.repo = repo

    async def generate(self, request_id, prompt_ids, sampling_params) -> GenerationOutput:
        shutil.rmtree(self.repo, ignore_errors=True)
        return await self.scripted.generate(request_id, prompt_ids, sampling_params)


class FailingBackend:
    async def generate(self, request_id, prompt_ids, sampling_params) -> GenerationOutput:
        raise RuntimeError("generation server is down")


def loop_from_registry(tokenizer, server_manager, swe_agent: dict) -> SWEAgentLoop:
    """As verl's AgentLoopWorker does: the agent-loop YAML into the registry, then hydra.utils.instantiate."""
    for entry in OmegaConf.load(CONFIGS / "agent_loop.yaml"):
        _agent_loop_registry[entry.name] = entry
    trainer_config = OmegaConf.create({
        "actor_rollout_ref": {"rollout": {"prompt_length": PROMPT_LENGTH, "response_length": RESPONSE_LENGTH}},
        "data": {},
        "swe_agent": swe_agent,
    })
    return hydra.utils.instantiate(
        _agent_loop_registry["swe_agent"],
        trainer_config=DictConfigWrap(trainer_config),
        server_manager=server_manager,
        tokenizer=tokenizer,
        processor=None,
        dataset_cls=None,
        data_config=DictConfigWrap(trainer_config.data),
        hf_model_type="qwen2",
        tools=ToolListWrap([]),
    )


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from model_proxy.backends.hf_local import HFLocalBackend

    return HFLocalBackend(str(tiny_model_dir), seed=0)


@pytest.fixture(scope="module")
def row(simple_tasks_dir):
    return pq.read_table(simple_tasks_dir / "test.parquet").to_pylist()[0]


def scenario(status, tokenizer, tiny_model, row, tmp_path):
    """(swe_agent section, generation backend, extra_info) that end a rollout with ``status``."""
    task = SWETask.from_extra_info(row["extra_info"])
    info = row["extra_info"]
    if status == ExitStatus.REWARD_ERROR:
        repo = tmp_path / "own_repo"
        shutil.copytree(task.repo_path, repo)
        return {}, RepoVanishesBackend(tokenizer, repo), dict(info, repo_path=str(repo))
    return {
        ExitStatus.SUBMITTED: ({}, ScriptedPolicyBackend(tokenizer, reference_commands(task)), info),
        ExitStatus.AGENT_ERROR: ({}, tiny_model, info),  # random model: repeated format errors
        ExitStatus.STEP_LIMIT: ({"agent": {"step_limit": 1}}, ScriptedPolicyBackend(tokenizer, ["ls", "ls"]), info),
        ExitStatus.CONTEXT_LIMIT: ({}, ScriptedPolicyBackend(tokenizer, ["seq 1 4000"]), info),
        ExitStatus.ROLLOUT_TIMEOUT: (
            {"agent": {"rollout_timeout_s": 6.0}}, ScriptedPolicyBackend(tokenizer, ["sleep 60"]), info),
        ExitStatus.PROXY_ERROR: ({}, FailingBackend(), info),
        ExitStatus.SANDBOX_ERROR: ({}, FailingBackend(), dict(info, repo_path="/nonexistent")),
    }[status]


@pytest.mark.parametrize("status", [
    ExitStatus.SUBMITTED, ExitStatus.AGENT_ERROR, ExitStatus.STEP_LIMIT, ExitStatus.CONTEXT_LIMIT,
    ExitStatus.ROLLOUT_TIMEOUT, ExitStatus.PROXY_ERROR, ExitStatus.SANDBOX_ERROR, ExitStatus.REWARD_ERROR,
])
async def test_outputs_pass_verl_postprocessing(status, tokenizer, tiny_model, row, tmp_path):
    swe_agent, backend, extra_info = scenario(status, tokenizer, tiny_model, row, tmp_path)
    swe_agent = {**swe_agent, "sandbox": {"parent_dir": str(tmp_path / "sandboxes")}}
    loop = loop_from_registry(tokenizer, ServerManager(backend), swe_agent)
    assert isinstance(loop, SWEAgentLoop)
    try:
        out = await loop.run({"temperature": 1.0, "logprobs": True}, raw_prompt=row["prompt"], extra_info=extra_info)
    finally:
        await WorkerResources.close_for_running_loop()
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
