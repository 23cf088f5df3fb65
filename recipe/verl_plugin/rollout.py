"""The ``hf`` rollout backend for verl: transformers generation in a Ray server actor.

verl 0.9 knows the rollout backends vllm, sglang and trtllm. A backend is three
pieces, all here, registered by ``register()`` (``recipe.verl_plugin.plugin``):

- ``HFRolloutServer``: the Ray actor verl's ``LLMServerClient`` sends token-in,
  token-out requests to (``generate(prompt_ids, sampling_params, request_id, ...)
  -> TokenOutput``), plus the control calls verl's replica and checkpoint manager
  make (sleep/wake_up, abort/resume, kv-cache release). It wraps
  ``model_proxy.backends.hf_local.HFLocalBackend`` (continuous batching and a prefix
  cache across a trajectory's turns), the engine the rollout CLI samples with too.
- ``HFReplica`` (a ``RolloutReplica``): starts one server actor per replica.
- ``HFServerAdapter`` (a ``BaseRollout``), built inside verl's actor worker: it
  receives the actor's weights from verl's checkpoint engine every step
  (``checkpoint_engine.backend=naive``: ``ActorRolloutRefWorker.update_weights`` ->
  ``rollout.update_weights(per_tensor_param)``) and loads them into the server,
  which drops its prefix cache then.

Engine limits come from ``actor_rollout_ref.rollout.engine_kwargs.hf``
(``HFRolloutSettings``); the context length is ``rollout.max_model_len`` or prompt +
response length.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import asdict, dataclass, fields
from typing import Any

import ray
import torch
from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutReplica, TokenOutput

from model_proxy.backends.hf_local import EngineSettings, HFLocalBackend
from recipe.verl_plugin.internals import ROLLOUT_NAME

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HFRolloutSettings:
    """``actor_rollout_ref.rollout.engine_kwargs.hf`` (all optional).

    Attributes:
        max_num_seqs: sequences decoded together (a decode step's batch), at most.
        prefill_chunk_tokens: prompt tokens per prefill forward pass.
        prefix_cache_bytes: memory for parked turns' keys/values, bytes.
        num_threads: torch intra-op threads of the server process.
        dtype: the server model's dtype name.
        seed: base seed of the per-request generators.
    """

    max_num_seqs: int = 8
    prefill_chunk_tokens: int = 512
    prefix_cache_bytes: int = 1 << 30
    num_threads: int = 1
    dtype: str = "float32"
    seed: int = 0

    @classmethod
    def from_engine_kwargs(cls, engine_kwargs: Any) -> HFRolloutSettings:
        """Read ``engine_kwargs.hf``.

        Raises:
            ValueError: an unknown key (named in the message).
        """
        section = dict((engine_kwargs or {}).get(ROLLOUT_NAME) or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ValueError(
                f"actor_rollout_ref.rollout.engine_kwargs.{ROLLOUT_NAME}: unknown keys {unknown}; known: {sorted(known)}"
            )
        return cls(**section)


def server_actor_name(replica_rank: int) -> str:
    """The Ray actor name of a replica's server (the adapter finds it by name)."""
    return f"swe_hf_rollout_server_{replica_rank}"


class HFRolloutServer:
    """Ray actor serving one replica (see module docstring).

    Args:
        model_path: the Hugging Face model directory (the actor's initial weights).
        max_model_len: context length in tokens.
        settings: engine limits.
        device: torch device of the model.
    """

    def __init__(self, model_path: str, max_model_len: int, settings: dict[str, Any], device: str = "cpu") -> None:
        self.settings = HFRolloutSettings(**settings)
        self.engine = HFLocalBackend(
            model_path,
            device=device,
            seed=self.settings.seed,
            num_threads=self.settings.num_threads,
            dtype=self.settings.dtype,
            settings=EngineSettings(
                max_num_seqs=self.settings.max_num_seqs,
                prefill_chunk_tokens=self.settings.prefill_chunk_tokens,
                prefix_cache_bytes=self.settings.prefix_cache_bytes,
                max_model_len=max_model_len,
            ),
        )
        self.global_steps: int | None = None
        self._paused = False
        self._reject = False
        self._resumed = asyncio.Event()
        self._resumed.set()

    async def generate(
        self,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        request_id: str,
        image_data: Any = None,
        video_data: Any = None,
        **kwargs: Any,
    ) -> TokenOutput:
        """One turn, token ids in and out (verl's server contract).

        ``stop_reason`` is ``"completed"`` (end-of-turn token or ``max_tokens``) or
        ``"aborted"``; ``log_probs`` are the sampled tokens' when
        ``sampling_params["logprobs"]`` is truthy; ``extra_fields["global_steps"]``
        is the trainer step whose weights generated it.
        """
        if image_data or video_data:
            raise ValueError("the hf rollout backend is text-only")
        while self._paused:
            if self._reject:
                return TokenOutput(token_ids=[], log_probs=[], stop_reason="aborted", num_preempted=0,
                                   extra_fields={"global_steps": self.global_steps})
            await self._resumed.wait()
        steps = self.global_steps
        output = await self.engine.generate(request_id, list(prompt_ids), dict(sampling_params))
        want_logprobs = bool(sampling_params.get("logprobs"))
        return TokenOutput(
            token_ids=output.token_ids,
            log_probs=output.logprobs if want_logprobs else None,
            stop_reason="aborted" if output.stop_reason == "abort" else "completed",
            num_preempted=0,
            extra_fields={"global_steps": steps},
        )

    # -- weights ----------------------------------------------------------------------------------

    async def update_weights(self, state_dict: dict[str, torch.Tensor], global_steps: int | None = None) -> dict:
        """Load the actor's weights; the prefix cache is dropped. Returns the load report."""
        report = await asyncio.to_thread(self.engine.load_state_dict, state_dict)
        if global_steps is not None:
            self.global_steps = int(global_steps)
        report["global_steps"] = self.global_steps
        report["checksum"] = await asyncio.to_thread(self.engine.parameter_checksum)
        # One line per weight load, in the run's log: which trainer step's weights now sample.
        logger.warning("hf rollout weights: step %s version %d checksum %.6f",
                       self.global_steps, report["version"], report["checksum"])
        return report

    async def stats(self) -> dict[str, Any]:
        """Engine counters, weight version and parameter checksum (tests and benchmarks)."""
        stats = await asyncio.to_thread(lambda: asdict(self.engine.stats))
        checksum = await asyncio.to_thread(self.engine.parameter_checksum)
        return {**stats, "weight_version": self.engine.weight_version, "checksum": checksum,
                "global_steps": self.global_steps}

    # -- control calls (verl's RolloutReplica / CheckpointEngineManager) ---------------------------

    async def wake_up(self, tags: list[str] | None = None) -> None:
        pass

    async def sleep(self) -> None:
        # No device memory to give back; the cached keys are stale after the next update anyway.
        await asyncio.to_thread(self.engine.drop_prefix_cache)

    async def clear_kv_cache(self) -> None:
        await asyncio.to_thread(self.engine.drop_prefix_cache)

    async def release_kv_cache(self) -> None:
        await asyncio.to_thread(self.engine.drop_prefix_cache)

    async def resume_kv_cache(self) -> None:
        pass

    async def abort_all_requests(self, reset_prefix_cache: bool = True, reject_request: bool = False) -> dict:
        """Pause admission and end running requests with ``aborted`` (until ``resume_generation``)."""
        self._paused, self._reject = True, bool(reject_request)
        self._resumed.clear()
        aborted = await asyncio.to_thread(self.engine.abort_all)
        if reset_prefix_cache:
            await asyncio.to_thread(self.engine.drop_prefix_cache)
        return {"aborted_count": aborted, "request_ids": []}

    async def resume_generation(self) -> None:
        self._paused = self._reject = False
        self._resumed.set()

    async def wait_for_requests_to_drain(self) -> None:
        pass

    async def start_profile(self, **kwargs: Any) -> None:
        pass

    async def stop_profile(self) -> None:
        pass


class HFReplica(RolloutReplica):
    """One ``HFRolloutServer`` per replica; the server takes no Ray GPU (it computes on the host)."""

    def rollout_worker_use_gpu(self) -> bool:
        return False

    async def launch_servers(self) -> None:
        settings = HFRolloutSettings.from_engine_kwargs(self.config.engine_kwargs)
        # verl hands the replica the model section as a DictConfig (an HFModelConfig elsewhere).
        model = self.model_config
        get = model.get if hasattr(model, "get") else lambda key: getattr(model, key, None)
        model_path = os.path.expanduser(get("local_path") or get("path"))
        max_model_len = int(self.config.max_model_len or (self.config.prompt_length + self.config.response_length))
        name = server_actor_name(self.replica_rank)
        server = (
            ray.remote(HFRolloutServer)
            .options(name=name, num_cpus=0, max_concurrency=self.max_concurrency)
            .remote(model_path=model_path, max_model_len=max_model_len, settings=asdict(settings))
        )
        self.servers = [server]
        self._server_handle = server
        self._server_address = name


class HFServerAdapter(BaseRollout):
    """Inside verl's actor worker: hands the actor's weights to this replica's server each step."""

    def __init__(self, config: Any, model_config: Any, device_mesh: Any, replica_rank: int = -1, **kwargs: Any) -> None:
        super().__init__(config, model_config, device_mesh)
        rank = int(os.environ.get("RANK", 0))
        world = (
            self.config.tensor_model_parallel_size
            * self.config.data_parallel_size
            * self.config.pipeline_model_parallel_size
        )
        self.replica_rank = rank // world if replica_rank == -1 else replica_rank
        self.is_leader_rank = rank % world == 0
        self._server: Any = None

    async def resume(self, tags: list[str]) -> None:
        pass

    async def release(self) -> None:
        pass

    @torch.no_grad()
    async def update_weights(self, weights: Any, wire_format: str = "named_tensors", **kwargs: Any) -> None:
        """Collect the full tensors (FSDP2 shards are DTensors) and load them into the server.

        Raises:
            ValueError: a wire format other than ``named_tensors`` (delta engines).
        """
        if wire_format != "named_tensors":
            raise ValueError(f"the hf rollout backend takes named_tensors weights, got {wire_format!r}")
        state_dict = {}
        for name, tensor in weights:
            if hasattr(tensor, "full_tensor"):
                tensor = tensor.full_tensor()
            state_dict[name] = tensor.detach().to("cpu").clone()
        if not self.is_leader_rank:
            return
        if self._server is None:
            self._server = ray.get_actor(server_actor_name(self.replica_rank))
        report = await self._server.update_weights.remote(state_dict, kwargs.get("global_steps"))
        if report["unexpected"]:
            raise ValueError(f"the actor sent weights the rollout model does not have: {report['unexpected'][:5]}")
        if report["missing"]:
            logger.info("hf rollout weight update left %s as they were (tied or untrained)", report["missing"])
