"""SWEAgentLoop end to end: real mini-swe-agent subprocesses, real proxy, real git and pytest.

The only stand-ins are generation backends (no GPU here): the scripted harness
policies, the tiny random Qwen2 model on CPU, and a backend that raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shlex
from pathlib import Path

import hydra
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf
from transformers import AutoTokenizer
from verl.experimental.agent_loop.agent_loop import AgentLoopOutput, DictConfigWrap

from model_proxy.backends.base import GenerationOutput
from model_proxy.backends.scripted import ScriptedPolicyBackend
from recipe.worker_resources import WorkerResources
from recipe.outcome import ExitStatus
from recipe.swe_agent_loop import SWEAgentLoop
from recipe.trajectory import load_records
from recipe.phases import PHASES
from sandbox.local import find_marked_processes

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RESPONSE_LENGTH = 1024

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rows(simple_tasks_dir):
    return pq.read_table(simple_tasks_dir / "train.parquet").to_pylist() + pq.read_table(
        simple_tasks_dir / "test.parquet"
    ).to_pylist()


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def sandbox_parent(tmp_path):
    return tmp_path / "sandboxes"


def make_loop(tokenizer, sandbox_parent, *, backend=None, response_length=RESPONSE_LENGTH, resources=None,
              **swe_agent) -> SWEAgentLoop:
    swe_agent.setdefault("sandbox", {"parent_dir": str(sandbox_parent)})
    return SWEAgentLoop.standalone(
        tokenizer=tokenizer,
        hf_model_type="qwen2",
        prompt_length=8192,
        response_length=response_length,
        swe_agent=swe_agent,
        backend=backend,
        resources=resources,
    )


SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "logprobs": True}


async def run_row(loop: SWEAgentLoop, row) -> AgentLoopOutput:
    return await loop.run(dict(SAMPLING), raw_prompt=row["prompt"], extra_info=row["extra_info"])


def assert_nothing_left(outputs, sandbox_parent: Path):
    for out in outputs:
        assert find_marked_processes(out.extra_fields["rollout_id"]) == []
    assert not sandbox_parent.exists() or list(sandbox_parent.iterdir()) == []


def assert_token_invariants(out: AgentLoopOutput):
    assert 0 < len(out.response_ids) <= RESPONSE_LENGTH
    assert len(out.response_mask) == len(out.response_ids)
    assert len(out.response_logprobs) == len(out.response_ids)
    assert set(out.response_mask) <= {0, 1}


@pytest.fixture(autouse=True)
async def _close_worker_resources():
    yield
    await WorkerResources.close_for_running_loop()


@pytest.mark.parametrize("warm_start", [True, False], ids=["warm", "cold"])
async def test_reference_policy_resolves_every_task(rows, tokenizer, sandbox_parent, warm_start):
    loop = lambda: make_loop(tokenizer, sandbox_parent, policy="reference",  # noqa: E731
                             agent={"warm_start": warm_start})
    outputs = await asyncio.gather(*(run_row(loop(), row) for row in rows))
    for row, out in zip(rows, outputs):
        extra = out.extra_fields
        # The rollout's wall time, by phase: every phase named, summing to the total.
        phases = extra["phases"]
        assert set(phases) == {*PHASES, "total"}, phases
        assert sum(v for k, v in phases.items() if k != "total") == pytest.approx(phases["total"], rel=1e-6)
        assert phases["total"] == extra["total_s"]
        assert phases["other"] < 0.05 * phases["total"], phases
        assert phases["agent_start"] > 0 and phases["tool"] > 0 and phases["grading"] > 0, phases
        assert extra["exit_status"] == ExitStatus.SUBMITTED.value, (extra["instance_id"], extra["error"])
        assert extra["resolved"] and out.reward_score == 1.0, extra["grade"]
        assert extra["model_patch"].strip(), "the patch is taken from the sandbox"
        assert_token_invariants(out)
        # Scripted turns are not model samples, but they pass through the same token path.
        assert sum(out.response_mask) > 0 and not extra["masked"]
    assert_nothing_left(outputs, sandbox_parent)


async def test_reference_policy_in_text_mode(rows, tokenizer, sandbox_parent):
    """mini-swe-agent's litellm_textbased class: actions in ```mswea_bash_command blocks."""
    loop = make_loop(tokenizer, sandbox_parent, policy="reference", agent={"mode": "text"})
    out = await run_row(loop, rows[0])
    assert out.extra_fields["exit_status"] == ExitStatus.SUBMITTED.value, out.extra_fields["error"]
    assert out.extra_fields["resolved"] and out.reward_score == 1.0
    assert_token_invariants(out)
    assert_nothing_left([out], sandbox_parent)


async def test_reference_with_tests_policy_runs_tests_and_emulates_inference(rows, tokenizer, sandbox_parent):
    """The agent-like script runs the task's tests as tool calls; inference takes the configured time."""
    loop = make_loop(tokenizer, sandbox_parent, policy="reference_with_tests", response_length=16384,
                     scripted={"latency_first_token_s": 0.3})
    out = await run_row(loop, rows[0])
    extra = out.extra_fields
    assert extra["exit_status"] == ExitStatus.SUBMITTED.value, extra["error"]
    assert extra["resolved"] and out.reward_score == 1.0
    assert extra["num_llm_calls"] >= 7  # six commands, then the submission
    assert extra["generation_s"] >= 0.3 * extra["num_llm_calls"]
    assert_nothing_left([out], sandbox_parent)


async def test_resource_shim_wraps_each_tool_command_not_the_agent(rows, tokenizer, sandbox_parent, tmp_path):
    """The rollout's cgroup holds the sandbox's tool processes: the shim's wrap goes in front of every
    bash command (outside bubblewrap) and not in front of the agent harness.

    The shim is a stand-in for a cgroup v2 one (none is writable here; the real shim's wrap is
    tested over a fake cgroupfs in tests/sandbox): its wrap logs each argv instead of moving the pid.
    """
    log = tmp_path / "wrapped.log"

    class RecordingLease:
        cgroup_path = None
        active = False  # moves no limit (the loop then records no shim summary)

        def on_phase(self, phase: str) -> None:
            pass

        def wrap_argv(self, argv: list[str]) -> list[str]:
            return ["sh", "-c", f'echo "$*" >> {shlex.quote(str(log))}; exec "$@"', "sh", *argv]

    class RecordingShim:
        @contextlib.asynccontextmanager
        async def rollout(self, rollout_id: str):
            yield RecordingLease()

    class RecordingResources(WorkerResources):
        def shim(self):
            return RecordingShim()

    from recipe.config import load_swe_agent_config

    async with RecordingResources(load_swe_agent_config()) as resources:
        loop = make_loop(tokenizer, sandbox_parent, policy="reference", resources=resources)
        out = await run_row(loop, rows[0])
    assert out.extra_fields["resolved"], out.extra_fields["error"]
    wrapped = log.read_text().splitlines()
    assert len(wrapped) >= 2  # git apply, git status (and the submission)
    assert all("bash -c" in line and "mini_swe_agent_entry" not in line for line in wrapped), wrapped
    assert any("git apply" in line for line in wrapped)
    assert_nothing_left([out], sandbox_parent)


async def test_empty_policy_resolves_nothing(rows, tokenizer, sandbox_parent):
    outputs = await asyncio.gather(
        *(run_row(make_loop(tokenizer, sandbox_parent, policy="empty"), row) for row in rows[:4])
    )
    for out in outputs:
        assert out.extra_fields["exit_status"] == ExitStatus.SUBMITTED.value
        assert out.extra_fields["model_patch"] == "" and out.reward_score == 0.0
        assert not out.extra_fields["resolved"]
    assert_nothing_left(outputs, sandbox_parent)


async def test_tiny_model_rollouts_keep_exact_token_bookkeeping(rows, tokenizer, tiny_model_dir, sandbox_parent):
    from model_proxy.backends.hf_local import HFLocalBackend

    backend = HFLocalBackend(str(tiny_model_dir), seed=0)
    outputs = await asyncio.gather(
        *(run_row(make_loop(tokenizer, sandbox_parent, backend=backend), row) for row in rows[:2])
    )
    for out in outputs:
        extra = out.extra_fields
        assert extra["exit_status"] in {s.value for s in ExitStatus}
        assert extra["exit_status"] not in {ExitStatus.SANDBOX_ERROR.value, ExitStatus.PROXY_ERROR.value}, extra["error"]
        assert_token_invariants(out)
        assert extra["num_llm_calls"] >= 1
        assert out.reward_score == 0.0
    assert_nothing_left(outputs, sandbox_parent)


@pytest.mark.parametrize("warm_start", [True, False], ids=["warm", "cold"])
async def test_hanging_agent_is_killed_at_rollout_timeout(rows, tokenizer, sandbox_parent, warm_start):
    backend = ScriptedPolicyBackend(tokenizer, ["sleep 120"], mode="tool_call")
    loop = make_loop(
        tokenizer, sandbox_parent, backend=backend,
        agent={"rollout_timeout_s": 8.0, "command_timeout_s": 100, "warm_start": warm_start},
    )
    out = await run_row(loop, rows[0])
    assert out.extra_fields["exit_status"] == ExitStatus.ROLLOUT_TIMEOUT.value
    assert out.extra_fields["masked"] and sum(out.response_mask) == 0  # DeepSWE: limits are masked
    assert_token_invariants(out)
    assert_nothing_left([out], sandbox_parent)


@pytest.mark.parametrize("warm_start", [True, False], ids=["warm", "cold"])
async def test_crashed_agent_is_an_agent_error_with_a_clean_sandbox(rows, tokenizer, sandbox_parent, warm_start):
    # The agent process dies mid-rollout (as under the OOM killer) while its command runs.
    import psutil

    backend = ScriptedPolicyBackend(tokenizer, ["sleep 60"], mode="tool_call")
    loop = make_loop(tokenizer, sandbox_parent, backend=backend, agent={"warm_start": warm_start})
    job = asyncio.create_task(run_row(loop, rows[0]))
    agent_pid = None
    for _ in range(300):
        await asyncio.sleep(0.1)
        if await asyncio.to_thread(_rollouts_running, "sleep", sandbox_parent):
            agent_pid = await asyncio.to_thread(_agent_pid, sandbox_parent)
            break
    assert agent_pid, "the agent never ran its command"
    psutil.Process(agent_pid).kill()
    out = await job
    assert out.extra_fields["exit_status"] == ExitStatus.AGENT_ERROR.value, out.extra_fields
    assert "without a result" in out.extra_fields["error"]
    assert out.reward_score == 0.0 and not out.extra_fields["masked"]
    assert_token_invariants(out)
    assert_nothing_left([out], sandbox_parent)


def _agent_pid(under: Path) -> int | None:
    """The mini-swe-agent process of a rollout whose sandbox is below ``under``."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmd = proc.info["cmdline"] or []
            if "recipe.runners.mini_swe_agent_entry" in cmd and proc.cwd().startswith(str(under)):
                return proc.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return None


class FailingBackend:
    """A generation server that breaks on every request."""

    async def generate(self, request_id, prompt_ids, sampling_params) -> GenerationOutput:
        raise RuntimeError("generation server is down")


async def test_backend_failure_is_a_masked_proxy_error(rows, tokenizer, sandbox_parent):
    out = await run_row(make_loop(tokenizer, sandbox_parent, backend=FailingBackend()), rows[0])
    assert out.extra_fields["exit_status"] == ExitStatus.PROXY_ERROR.value, out.extra_fields
    assert out.extra_fields["masked"] and sum(out.response_mask) == 0
    assert out.reward_score == 0.0
    assert_token_invariants(out)
    assert_nothing_left([out], sandbox_parent)


async def test_broken_task_rows_are_reported_and_masked(rows, tokenizer, sandbox_parent):
    missing_repo = dict(rows[0]["extra_info"], repo_path="/nonexistent/repo")
    out = await make_loop(tokenizer, sandbox_parent, policy="reference").run(
        dict(SAMPLING), raw_prompt=rows[0]["prompt"], extra_info=missing_repo
    )
    assert out.extra_fields["exit_status"] == ExitStatus.SANDBOX_ERROR.value
    assert rows[0]["extra_info"]["instance_id"] in out.extra_fields["error"]
    assert out.extra_fields["masked"] and out.reward_score == 0.0
    assert_token_invariants(out)

    no_fields = await make_loop(tokenizer, sandbox_parent).run(dict(SAMPLING), raw_prompt=rows[0]["prompt"], extra_info={})
    assert no_fields.extra_fields["exit_status"] == ExitStatus.SANDBOX_ERROR.value
    assert "instance_id" in no_fields.extra_fields["error"]
    assert_nothing_left([out, no_fields], sandbox_parent)


async def test_cancelled_rollout_leaves_no_process_or_sandbox(rows, tokenizer, sandbox_parent):
    backend = ScriptedPolicyBackend(tokenizer, ["sleep 120"], mode="tool_call")
    loop = make_loop(tokenizer, sandbox_parent, backend=backend)
    job = asyncio.create_task(run_row(loop, rows[0]))
    rollout_ids: set[str] = set()
    for _ in range(300):  # until the agent's `sleep 120` runs in the sandbox (mid-tool-call)
        await asyncio.sleep(0.1)
        rollout_ids = await asyncio.to_thread(_rollouts_running, "sleep", sandbox_parent)
        if rollout_ids:
            break
    assert rollout_ids, "the agent never ran its command"
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    assert list(sandbox_parent.iterdir()) == []
    for rollout_id in rollout_ids:
        assert find_marked_processes(rollout_id) == []


class BlockingBackend:
    """A generation server that never answers (a slow GPU batch): the rollout is cancelled mid-generation."""

    def __init__(self):
        self.entered = asyncio.Event()

    async def generate(self, request_id, prompt_ids, sampling_params) -> GenerationOutput:
        self.entered.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_cancelled_mid_generation_leaves_no_process_sandbox_or_session(rows, tokenizer, sandbox_parent):
    backend = BlockingBackend()
    records = sandbox_parent.parent / "records"
    loop = make_loop(tokenizer, sandbox_parent, backend=backend, trajectory_dir=str(records))
    job = asyncio.create_task(run_row(loop, rows[0]))
    await asyncio.wait_for(backend.entered.wait(), timeout=120)
    proxy = await WorkerResources.for_running_loop(loop.swe_config).proxy()
    assert proxy.num_sessions == 1
    rollout_ids = await asyncio.to_thread(_rollouts_running, "python", sandbox_parent)  # the agent process itself
    assert rollout_ids
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    assert proxy.num_sessions == 0
    assert list(sandbox_parent.iterdir()) == []
    for rollout_id in rollout_ids:
        assert find_marked_processes(rollout_id) == []
    # The cancelled rollout is still on record, with its status.
    [record] = load_records(records)
    assert record.exit_status == ExitStatus.ROLLOUT_TIMEOUT.value and record.error == "cancelled by the trainer"
    assert record.instance_id == rows[0]["extra_info"]["instance_id"] and record.masked


def _rollouts_running(program: str, under: Path) -> set[str]:
    """Rollout ids of marked processes running ``program`` in a sandbox below ``under``.

    Other test runs on the machine may have rollouts of their own: only ours count.
    """
    import psutil

    found = set()
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmd = proc.info["cmdline"] or []
            rollout = proc.environ().get("SWE_ROLLOUT_ID")
            cwd = proc.cwd()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if rollout and cmd and Path(cmd[0]).name.startswith(program) and cwd.startswith(str(under)):
            found.add(rollout)
    return found


def test_agent_loop_yaml_instantiates_through_hydra(tokenizer, sandbox_parent):
    """verl's AgentLoopWorker path: hydra.utils.instantiate on the agent-loop YAML entry."""
    entry = OmegaConf.load(CONFIGS / "agent_loop.yaml")[0]
    assert entry.name == "swe_agent"
    # The trainer config's `swe_agent` section (a Hydra `+swe_agent.*` override) reaches the loop.
    cfg = OmegaConf.create(
        {
            "actor_rollout_ref": {"rollout": {"prompt_length": 8192, "response_length": RESPONSE_LENGTH}},
            "data": {},
            "swe_agent": {"agent": {"step_limit": 7}},
        }
    )
    loop = hydra.utils.instantiate(
        {k: v for k, v in entry.items() if k != "name"},
        trainer_config=DictConfigWrap(cfg),
        server_manager=None,
        tokenizer=tokenizer,
        processor=None,
        dataset_cls=None,
        data_config=DictConfigWrap(cfg.data),
        hf_model_type="qwen2",
    )
    assert isinstance(loop, SWEAgentLoop)
    assert loop.swe_config.agent.step_limit == 7


def test_extra_fields_are_json_serialisable(rows):
    # Trajectory files are JSONL: RolloutInfo must serialise as it is.
    from dataclasses import asdict

    from recipe.swe_agent_loop import RolloutInfo

    json.dumps(asdict(RolloutInfo(instance_id=rows[0]["extra_info"]["instance_id"])))
