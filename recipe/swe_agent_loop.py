"""``SWEAgentLoop``: verl agent loop that runs a coding agent in a sandbox through the ModelProxy.

One instance per sample (verl makes a new loop object per sample; all of a
worker's rollouts share one event loop and one ModelProxy server). ``run``:

1. rebuilds the task from the row's ``extra_info`` and makes a sandbox;
2. opens a proxy session whose backend is verl's server manager (training) or a
   backend handed in (CPU rollouts, scripted harness checks);
3. runs the agent subprocess against the session until it exits or times out;
4. extracts the patch from the sandbox and grades it on a pristine copy;
5. returns an ``AgentLoopOutput`` with the session's exact tokens, mask and logprobs.

Whatever happens, the sandbox (with every process the rollout started) and the
session are gone when ``run`` returns or is cancelled.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf
from verl.utils.tokenizer.continuous_token_wiring import create_continuous_token_builder
from verl.experimental.agent_loop.agent_loop import (
    AgentLoopBase,
    AgentLoopMetrics,
    AgentLoopOutput,
    DictConfigWrap,
    register,
)

from model_proxy.backends.base import GenerationBackend
from model_proxy.backends.scripted import (
    EXPERT_SUBMIT_THOUGHT,
    GenerationLatency,
    ScriptedPolicyBackend,
    expert_steps,
    reference_with_tests_commands,
)
from model_proxy.backends.verl_server import VerlServerBackend
from model_proxy.server import SessionConfig, SessionResult, SessionStop
from core.task import SWETask
from recipe.config import Policy, SWEAgentConfig, load_swe_agent_config
from recipe.outcome import ExitStatus
from recipe.phases import PhaseClock
from recipe.runners.base import AgentRequest, AgentRun, run_agent
from recipe.runners.mini_swe_agent import MiniSweAgent
from recipe.runners.swe_agent import docker_deployment, swe_agent_for
from recipe.trajectory import TrajectoryRecord, append_record
from recipe.worker_resources import WorkerResources
from sandbox.docker_limits import bind_container_limits
from sandbox.docker_rollout import DockerRolloutSandbox, image_tree_copier
from sandbox.local import LocalSandbox, PatchTooLarge, SandboxError

logger = logging.getLogger(__name__)

def reference_commands(task: SWETask) -> list[str]:
    """Bash commands that apply the task's reference patch, for the scripted harness check.

    The patch travels base64-encoded on one line, so no content of the patch can end
    the command early in either agent mode (a here-document terminator, or a line of
    backticks closing mini-swe-agent's text-mode action block).
    """
    encoded = base64.b64encode(task.patch.encode()).decode()
    return [f"echo {encoded} | base64 -d | git apply --whitespace=nowarn -", "git status --short"]


def script_commands(path: str) -> list[str]:
    """The bash commands of a script file: one per line, blank lines and ``#`` comments skipped.

    Raises:
        OSError: the file cannot be read.
    """
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]


@dataclass
class RolloutInfo:
    """Per-rollout facts carried in ``AgentLoopOutput.extra_fields`` (same keys every time).

    Times are seconds. ``masked``: no row of the trajectory trains (every segment's
    response_mask is all 0: the masking policy zeroed it, or nothing was sampled). Each
    row's ``extra_fields`` add ``segment`` (its index) and ``segment_masked`` (that row's
    mask is all 0).
    """

    instance_id: str = ""
    rollout_id: str = ""
    exit_status: str = ExitStatus.AGENT_ERROR.value
    agent_exit_status: str = ""
    masked: bool = False
    resolved: bool = False
    reward: float = 0.0
    # "model_patch", not "patch": verl's reward manager merges extra_fields into
    # extra_info, where "patch" is the task's reference patch.
    model_patch: str = ""
    error: str = ""
    num_llm_calls: int = 0
    generation_s: float = 0.0
    tool_s: float = 0.0
    total_s: float = 0.0
    grade: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, Any]] = field(default_factory=list)
    # GRPO group (verl's prompt uid; the instance id outside the trainer) and trainer step (-1 outside).
    group_id: str = ""
    global_step: int = -1
    # Token segments of the rollout (a rewritten history starts a new one) and this output's index.
    num_segments: int = 1
    segment: int = 0
    # Oldest and newest policy versions (verl trainer steps of the server's weights) that sampled
    # a turn; verl's v1 trainer reads them for its staleness metrics and needs integers.
    min_global_steps: int | None = None
    max_global_steps: int | None = None
    # The task row's split (extra_info["split"]): tells validation rollouts from training ones.
    split: str = ""
    # Sandbox limits the agent's commands hit ("command_timeout", "output_truncated", "workdir_bytes",
    # "patch_bytes", "oom_kill": one per process the OOM killer ended in the rollout's container).
    limits_hit: list[str] = field(default_factory=list)
    # Seconds per phase of the rollout (recipe.phases.PHASES), summing to "total" (= total_s).
    phases: dict[str, float] = field(default_factory=dict)
    # What the resource shim did (sandbox.shim.ShimRolloutSummary.to_dict); empty with the shim off.
    shim: dict[str, Any] = field(default_factory=dict)


def reward_extra_info(extra: dict[str, Any]) -> dict[str, float]:
    """Numeric per-rollout facts for verl's ``reward_extra_info`` (same keys every time).

    verl averages these in validation metrics, and its DAPO group filter
    (``algorithm.filter_groups.metric``) can read any of them, e.g. ``resolved``.
    """
    info = {
        "resolved": float(extra["resolved"]),
        "masked": float(extra["masked"]),
        "num_llm_calls": float(extra["num_llm_calls"]),
        "generation_s": float(extra["generation_s"]),
        "tool_s": float(extra["tool_s"]),
    }
    for status in ExitStatus:
        info[f"exit_{status.value}"] = float(extra["exit_status"] == status.value)
    return info


@register("swe_agent")
class SWEAgentLoop(AgentLoopBase):
    """Agent loop running mini-swe-agent against the ModelProxy (see module docstring).

    Extra constructor arguments (beyond ``AgentLoopBase``'s):
        swe_agent: overrides for the ``swe_agent`` config section (dict), e.g.
            from the agent-loop YAML; merged over the trainer config's
            ``swe_agent`` section and the schema defaults.
        backend: a generation backend to use instead of verl's server manager
            (CPU rollouts); ignored for the scripted policies.
        resources: the worker's proxy server, resource shim and graders
            (``WorkerResources``); None = the running event loop's
            (``WorkerResources.for_running_loop``, as under verl's AgentLoopWorker).
        tools: verl passes its tool list to every loop; unused here.

    Raises:
        ValueError: a setting is invalid, or differs from ``resources``' on a shared part.
    """

    def __init__(
        self,
        *args: Any,
        swe_agent: dict[str, Any] | None = None,
        backend: GenerationBackend | None = None,
        resources: WorkerResources | None = None,
        tools: Any = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        section = self.config.get("swe_agent") if isinstance(self.config, DictConfig) else None
        self.swe_config: SWEAgentConfig = load_swe_agent_config(section, swe_agent)
        if self.swe_config.proxy.token_builder != "auto":
            # verl picks the builder from model_type alone; a ChatML model of another type needs it named.
            self.continuous_token_builder = create_continuous_token_builder(
                self.tokenizer, model_family=self.swe_config.proxy.token_builder,
                chat_template_kwargs=self.apply_chat_template_kwargs,
            )
        self.backend = backend
        if resources is not None:
            resources.check(self.swe_config)
        self._resources = resources
        self.response_length: int = int(self.rollout_config.response_length)

    @classmethod
    def standalone(
        cls,
        *,
        tokenizer: Any,
        hf_model_type: str | None,
        prompt_length: int,
        response_length: int,
        swe_agent: dict[str, Any] | None = None,
        backend: GenerationBackend | None = None,
        resources: WorkerResources | None = None,
    ) -> SWEAgentLoop:
        """A loop outside verl's AgentLoopWorker (rollout CLI, evaluation, tests).

        Builds the minimal trainer config ``AgentLoopBase`` reads
        (``actor_rollout_ref.rollout.{prompt,response}_length`` in tokens, ``data``).
        With ``policy=model`` a ``backend`` is required (there is no server manager).
        """
        cfg = OmegaConf.create(
            {
                "actor_rollout_ref": {"rollout": {"prompt_length": prompt_length, "response_length": response_length}},
                "data": {},
            }
        )
        return cls(
            trainer_config=DictConfigWrap(cfg),
            server_manager=None,
            tokenizer=tokenizer,
            processor=None,
            dataset_cls=None,
            data_config=DictConfigWrap(cfg.data),
            hf_model_type=hf_model_type,
            swe_agent=swe_agent,
            backend=backend,
            resources=resources,
        )

    async def run(
        self, sampling_params: dict[str, Any], **kwargs: Any
    ) -> AgentLoopOutput | list[AgentLoopOutput]:
        """Run one rollout; never raises for task, agent, proxy or grading failures.

        ``kwargs`` are the dataset row's fields (``raw_prompt``, ``extra_info``...) plus,
        under verl's trainer, ``uid`` (the GRPO group) and ``global_steps``.

        Returns:
            AgentLoopOutput (a list of them, one per token segment, when the agent
            rewrote its history: verl's v1 trainer accepts that) with
            ``len(response_ids) == len(response_mask) ==
            len(response_logprobs) <= rollout.response_length``, the ``RolloutInfo``
            fields in ``extra_fields`` and ``extra_fields["reward_extra_info"]``.
            With ``trajectory_dir`` set, the rollout's ``TrajectoryRecord`` is
            appended to ``trajectory_dir/rollouts/step_<global_step>.<pid>.jsonl``.

        Raises:
            asyncio.CancelledError: after the sandbox and session are cleaned up and the
                rollout's record is written (status ``rollout_timeout``, error ``cancelled``).
        """
        clock = PhaseClock()
        info = RolloutInfo(rollout_id=uuid.uuid4().hex)
        try:
            output = await self._rollout(info, clock, sampling_params, **kwargs)
        except asyncio.CancelledError:
            # verl cancels rollouts it timed out or no longer needs: keep the record.
            info.exit_status = ExitStatus.ROLLOUT_TIMEOUT.value
            info.error = "cancelled by the trainer"
            info.masked = True
            info.phases = clock.finish()
            info.total_s = info.phases["total"]
            _, response_ids, mask, logprobs = self._placeholder_tokens()
            output = AgentLoopOutput(prompt_ids=[], response_ids=response_ids, response_mask=mask,
                                     response_logprobs=logprobs, reward_score=0.0, metrics=AgentLoopMetrics(),
                                     extra_fields=asdict(info))
            await asyncio.shield(self._finish(output, kwargs))
            raise
        return await self._finish(output, kwargs)

    async def _finish(
        self, output: AgentLoopOutput | list[AgentLoopOutput], kwargs: dict[str, Any]
    ) -> AgentLoopOutput | list[AgentLoopOutput]:
        """Add the GRPO group, step and ``reward_extra_info`` to every segment; append the record."""
        outputs = output if isinstance(output, list) else [output]
        step = int(kwargs.get("global_steps", -1))
        for out in outputs:
            extra = out.extra_fields
            extra["group_id"] = str(kwargs.get("uid") or extra["instance_id"])
            extra["global_step"] = step
            if step >= 0 and extra.get("max_global_steps") is None:
                # Nothing was sampled: the weights in force are the previous step's (verl's convention).
                extra["min_global_steps"] = extra["max_global_steps"] = max(0, step - 1)
            extra["reward_extra_info"] = reward_extra_info(extra)
        if self.swe_config.trajectory_dir:
            record = TrajectoryRecord.from_output(
                outputs, data_source=str(kwargs.get("data_source", "")), policy=self.swe_config.policy
            )
            await asyncio.to_thread(append_record, Path(self.swe_config.trajectory_dir), record)
        return output

    async def _rollout(
        self, info: RolloutInfo, clock: PhaseClock, sampling_params: dict[str, Any], **kwargs: Any
    ) -> AgentLoopOutput:
        raw_prompt = list(kwargs.get("raw_prompt") or [])
        try:
            task = SWETask.from_extra_info(kwargs.get("extra_info") or {})
        except Exception as exc:
            info.exit_status = ExitStatus.SANDBOX_ERROR.value
            info.error = f"broken task row: {exc}"
            logger.warning("%s", info.error)
            return await self._output_without_session(raw_prompt, info, clock)
        info.instance_id = task.instance_id
        info.split = str((kwargs.get("extra_info") or {}).get("split", ""))

        sandbox: LocalSandbox | None = None
        resources = self._worker_resources()
        proxy = await resources.proxy()
        session_id: str | None = None
        session: SessionResult | None = None
        agent: AgentRun | None = None
        # Which part failed decides the status of an unexpected exception.
        stage = ExitStatus.SANDBOX_ERROR
        cleanup = contextlib.AsyncExitStack()
        lease = None
        try:
            # The shim admits the rollout from its memory pool (waiting, not OOMing, when short).
            lease = await cleanup.enter_async_context(resources.shim().rollout(info.rollout_id))
            clock.lap("admission")
            settings = self.swe_config.sandbox
            trees = None if settings.work_tree == "clone" else resources.sandbox_trees()
            work_tree = "auto" if settings.work_tree == "clone" else settings.work_tree
            if settings.backend == "docker":
                sandbox = await DockerRolloutSandbox.create_in_docker(
                    task, factory=await resources.docker(), parent_dir=settings.parent_dir,
                    rollout_id=info.rollout_id, jail=settings.jail_spec(), trees=trees, work_tree=work_tree,
                    memory_bytes=lease.container_limit_bytes(settings.docker.memory_bytes),
                    oom_kill_disable=lease.pauses_at_limit,
                )
                # From here the shim moves the container's limit with the agent's phase.
                await bind_container_limits(lease, sandbox.container, settings.docker.memory_bytes)
            elif self._sweagent_in_docker:
                # SWE-ReX's container gets the host tree mounted; its commands run there, as its root.
                sandbox = await LocalSandbox.create(
                    task, parent_dir=settings.parent_dir, rollout_id=info.rollout_id, isolation="none",
                    jail=settings.jail_spec(), copy_tree=image_tree_copier(task, await resources.docker()),
                    trees=trees, work_tree=work_tree,
                )
            else:
                sandbox = await LocalSandbox.create(
                    task, parent_dir=settings.parent_dir, rollout_id=info.rollout_id,
                    isolation=settings.isolation, jail=settings.jail_spec(), trees=trees, work_tree=work_tree,
                )
            clock.lap("sandbox")

            stage = ExitStatus.PROXY_ERROR
            handle = proxy.open_session(
                SessionConfig(
                    backend=self._backend_for(task, int(kwargs.get("session_id") or 0)),
                    tokenizer=self.tokenizer,
                    token_builder=self.continuous_token_builder,
                    sampling_params=dict(sampling_params),
                    max_response_tokens=self.response_length,
                    # verl pads every prompt to rollout.prompt_length: a longer first prompt cannot train.
                    max_prompt_tokens=int(self.rollout_config.prompt_length),
                    tool_parser=self.swe_config.proxy.tool_parser,
                    model_name=self.swe_config.proxy.model_name,
                    request_id=info.rollout_id,
                    on_history_rewrite=self.swe_config.proxy.on_history_rewrite,
                    profile_log_dir=self.swe_config.proxy.profile_log_dir,
                    max_turn_tokens=self.swe_config.proxy.max_turn_tokens,
                    on_phase=lease.on_phase,
                )
            )
            session_id = handle.session_id
            stage = ExitStatus.AGENT_ERROR
            agent = await self._run_agent(sandbox, task, handle.base_url, handle.api_key, info.rollout_id,
                                          wrap_argv=lease.wrap_argv)
            session = proxy.close_session(session_id)
            session_id = None
            # From the session's opening to its close; what the session's figures leave is the
            # agent's exit after its last response.
            clock.lap("agent_exit")
            clock.split("agent_exit", {"agent_start": session.agent_start_s, "generation": session.generation_s,
                                       "proxy": session.request_s - session.generation_s, "tool": session.tool_s})
            info.exit_status = _resolve_status(agent, session).value
            info.agent_exit_status = agent.raw_exit_status
            info.num_llm_calls = agent.n_calls
            info.limits_hit = list(agent.limits_hit)
            if isinstance(sandbox, DockerRolloutSandbox):
                # The engine's State.OOMKilled misses exec'd commands: the container's cgroup counts them.
                info.limits_hit += ["oom_kill"] * await sandbox.oom_kills()
            info.error = agent.error or (session.error or "")
            stage = ExitStatus.SANDBOX_ERROR
            try:
                info.model_patch = await sandbox.extract_patch(max_bytes=self.swe_config.reward.max_patch_bytes)
            except PatchTooLarge as exc:  # graded as no patch (the grader would refuse it too)
                info.model_patch, info.error = "", str(exc)
                info.limits_hit = [*info.limits_hit, "patch_bytes"]
            clock.lap("patch")
        except SandboxError as exc:
            info.exit_status = ExitStatus.SANDBOX_ERROR.value
            info.error = str(exc)
            logger.warning("%s", exc)
        except Exception as exc:  # a bug or an infrastructure failure: keep the run going
            info.exit_status = stage.value
            info.error = f"{type(exc).__name__}: {exc}"
            logger.exception("rollout %s of %s failed", info.rollout_id, task.instance_id)
        finally:
            if session_id is not None:
                proxy.close_session(session_id)
            clock.lap("other")
            if sandbox is not None:
                await sandbox.teardown()
            await asyncio.shield(cleanup.aclose())  # release the cgroup and pool bytes last
            clock.lap("teardown")
            if lease is not None and lease.active:
                info.shim = lease.summary.to_dict()
                # Commands the shim ended at the hard cap (the container's OOM killer is off under it).
                info.limits_hit += ["oom_kill"] * lease.summary.memory_kills
        if session is None or agent is None:
            return await self._output_without_session(raw_prompt, info, clock)

        # One grader per worker and reward config: a GRPO group's identical patches
        # (often empty) are graded once (reward.cache).
        grade = await resources.grader(self.swe_config.reward).grade(task, info.model_patch)
        info.grade = grade.to_dict()
        if grade.is_infra_error:
            info.exit_status = ExitStatus.REWARD_ERROR.value
            info.error = info.error or f"grading failed: {grade.error}"
        info.resolved = grade.resolved
        info.reward = grade.reward
        clock.lap("grading")
        return self._output_from_session(session, agent, info, clock)

    # -- helpers ---------------------------------------------------------------------------------

    @property
    def _sweagent_in_docker(self) -> bool:
        agent = self.swe_config.agent
        return agent.backend == "swe_agent" and agent.sweagent_deployment == "docker"

    def _worker_resources(self) -> WorkerResources:
        """The resources given at construction, else the running event loop's worker's."""
        if self._resources is None:
            self._resources = WorkerResources.for_running_loop(self.swe_config)
        return self._resources

    async def _run_agent(
        self,
        sandbox: LocalSandbox,
        task: SWETask,
        api_base: str,
        api_key: str,
        rollout_id: str,
        wrap_argv: Callable[[list[str]], list[str]] | None = None,
    ) -> AgentRun:
        settings = self.swe_config.agent
        request = AgentRequest(task_text=task.problem_statement, api_base=api_base, api_key=api_key,
                               model_name=self.swe_config.proxy.model_name)
        if self._sweagent_in_docker:
            async with docker_deployment(sandbox, await self._worker_resources().docker()) as deployment:
                adapter = swe_agent_for(sandbox, request, settings, deployment)
                return await run_agent(adapter, sandbox, settings, wrap_argv=wrap_argv)
        if settings.backend == "swe_agent":
            adapter = swe_agent_for(sandbox, request, settings)
        else:
            adapter = MiniSweAgent(request, trajectory_path=self._trajectory_path(task, rollout_id))
        warm = self._worker_resources().warm_starts() if settings.warm_start else None
        return await run_agent(adapter, sandbox, settings, wrap_argv=wrap_argv, warm=warm)

    def _backend_for(self, task: SWETask, session: int = 0) -> GenerationBackend:
        """The policy's backend; ``session`` is the rollout's index in its GRPO group."""
        policy = self.swe_config.policy
        scripted = self.swe_config.scripted
        latency = GenerationLatency(
            per_token_s=scripted.latency_per_token_s,
            first_token_s=scripted.latency_first_token_s,
            min_turn_tokens=scripted.latency_min_turn_tokens,
            jitter_sigma=scripted.latency_jitter_sigma,
        )
        stall = ["echo waiting"] * (self.swe_config.agent.step_limit + 5)
        scripts = {
            Policy.REFERENCE: reference_commands,
            Policy.REFERENCE_WITH_TESTS: reference_with_tests_commands,
            Policy.EMPTY: lambda _: [],
            Policy.GROUP_CHECK: lambda t: [reference_commands(t), [], stall][session % 3],
            Policy.SCRIPT: lambda _: script_commands(self.swe_config.script or ""),
            Policy.EXPERT: expert_steps,
        }
        # SWE-agent calls tools (function calling only) and submits with its own `submit` tool.
        sweagent = self.swe_config.agent.backend == "swe_agent"
        for scripted_policy, commands in scripts.items():
            if policy == scripted_policy:
                return ScriptedPolicyBackend(self.tokenizer, commands(task),
                                             mode="tool_call" if sweagent else self.swe_config.agent.mode,
                                             latency=latency, submit_tool="submit" if sweagent else None,
                                             submit_thought=EXPERT_SUBMIT_THOUGHT if policy == Policy.EXPERT else None)
        if self.backend is not None:
            return self.backend
        if self.server_manager is None:
            raise ValueError("policy=model needs verl's server manager or a backend (SWEAgentLoop.standalone)")
        return VerlServerBackend(self.server_manager, self.tokenizer)

    def _trajectory_path(self, task: SWETask, rollout_id: str) -> str | None:
        if not self.swe_config.trajectory_dir:
            return None
        # Absolute: the agent process runs in the work tree, where a relative path would land in the patch.
        return str(Path(self.swe_config.trajectory_dir).resolve() / task.instance_id / f"{rollout_id}.traj.json")

    def _masked(self, status: ExitStatus) -> bool:
        return status.is_infra_failure or (status.is_limit and self.swe_config.masking.mask_limit_exits)

    def _output_from_session(
        self,
        session: SessionResult,
        agent: AgentRun,
        info: RolloutInfo,
        clock: PhaseClock,
    ) -> AgentLoopOutput | list[AgentLoopOutput]:
        """One output per token segment (a rewritten history starts a new one; verl's v1
        trainer takes the list), or a single output in the usual one-segment case."""
        status = ExitStatus(info.exit_status)
        info.generation_s = session.generation_s
        info.tool_s = session.tool_s
        info.min_global_steps = session.min_weight_version
        info.max_global_steps = session.max_weight_version
        info.messages = [m for seg in session.segments for m in seg.messages] or session.messages or agent.messages
        segments = [(seg.prompt_ids, seg.response_ids, seg.response_mask, seg.response_logprobs)
                    for seg in session.segments] or [
            (session.prompt_ids, session.response_ids, session.response_mask, session.response_logprobs)]
        info.num_segments = len(segments)
        info.phases = clock.finish()
        info.total_s = info.phases["total"]
        reward = 0.0 if status.is_infra_failure else info.reward
        status_masked = self._masked(status)
        rows = []
        for prompt_ids, response_ids, mask, logprobs in segments:
            n = self.response_length
            if not prompt_ids or not response_ids:
                # Nothing was sampled (the agent never reached the model): nothing to train on.
                placeholder_prompt, response_ids, mask, logprobs = self._placeholder_tokens()
                prompt_ids = prompt_ids or placeholder_prompt
            else:
                logprobs = (logprobs or [0.0] * len(response_ids))[:n]
                response_ids, mask = response_ids[:n], mask[:n]
            if status_masked:
                mask = [0] * len(mask)
            rows.append((prompt_ids, response_ids, mask, logprobs))
        # A row is masked when its mask trains nothing; the trajectory when every row is.
        info.masked = all(not any(mask) for _, _, mask, _ in rows)
        outputs = [
            AgentLoopOutput(
                prompt_ids=list(prompt_ids),
                response_ids=list(response_ids),
                response_mask=list(mask),
                response_logprobs=list(logprobs),
                reward_score=reward,
                num_turns=len(info.messages),
                metrics=AgentLoopMetrics(generate_sequences=info.generation_s, tool_calls=info.tool_s),
                extra_fields=dict(asdict(info), segment=index, segment_masked=not any(mask)),
            )
            for index, (prompt_ids, response_ids, mask, logprobs) in enumerate(rows)
        ]
        return outputs if len(outputs) > 1 else outputs[0]

    async def _output_without_session(
        self, raw_prompt: list[dict[str, Any]], info: RolloutInfo, clock: PhaseClock
    ) -> AgentLoopOutput:
        """A fully masked output for a rollout that failed before any generation."""
        prompt_ids = await self.ct_build_initial_tokens(raw_prompt) if raw_prompt else []
        _, response_ids, mask, logprobs = self._placeholder_tokens()
        if not prompt_ids:
            prompt_ids = list(response_ids)
        info.masked = True
        info.phases = clock.finish()
        info.total_s = info.phases["total"]
        return AgentLoopOutput(
            prompt_ids=list(prompt_ids),
            response_ids=response_ids,
            response_mask=mask,
            response_logprobs=logprobs,
            reward_score=0.0,
            num_turns=0,
            metrics=AgentLoopMetrics(),
            extra_fields=dict(asdict(info), segment=0, segment_masked=True),
        )

    def _placeholder_tokens(self) -> tuple[list[int], list[int], list[int], list[float]]:
        # verl puts the reward on the last response position, so the response
        # cannot be empty; one masked end-of-turn token carries it without loss.
        eos = self.tokenizer.eos_token_id
        token = int(eos if eos is not None else 0)
        return [], [token], [0], [0.0]


def _resolve_status(agent: AgentRun, session: SessionResult) -> ExitStatus:
    """The rollout's status: the proxy knows about budget exhaustion before the agent does."""
    if session.stop == SessionStop.CONTEXT_LIMIT:
        return ExitStatus.CONTEXT_LIMIT
    if session.stop == SessionStop.ABORTED:  # the generation server aborted a turn (e.g. a weight sync)
        return ExitStatus.PROXY_ERROR
    if session.error and agent.exit_status != ExitStatus.SUBMITTED:
        return ExitStatus.PROXY_ERROR
    return agent.exit_status
