"""The training backend: verl's rollout server manager (vLLM/SGLang replicas).

Wraps ``AgentLoopBase.server_manager`` (``verl.workers.rollout.llm_server.LLMServerClient``):
``await server_manager.generate(request_id, *, prompt_ids, sampling_params)`` returns
``verl.workers.rollout.replica.TokenOutput(token_ids, log_probs, stop_reason)`` with
``stop_reason`` ``"completed"``, ``"aborted"`` or None (unknown). TokenOutput does not
say *why* a completed request ended, so it is derived:

- ``"abort"`` when the server reports ``"aborted"``;
- ``"stop"`` when the last token is an end-of-turn id (the tokenizer's eos ids plus
  ``sampling_params["stop_token_ids"]``);
- ``"length"`` when ``len(token_ids) >= max_tokens``;
- ``"stop"`` otherwise (a stop string matched, which vLLM strips from the ids).

Use one ``request_id`` per trajectory (the proxy does): the load balancer routes it
to the same replica, so each turn reuses the previous turn's prefix cache.
"""

from __future__ import annotations

from typing import Any

from .base import GenerationOutput, StopReason


def eos_token_ids(tokenizer: Any) -> set[int]:
    """The tokenizer's end-of-sequence ids (``eos_token_id`` may be an int or a list)."""
    ids: set[int] = set()
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif eos is not None:
        ids.update(int(i) for i in eos)
    return ids


class VerlServerBackend:
    """``GenerationBackend`` over verl's server manager.

    Args:
        server_manager: object with verl's ``async generate(request_id, *, prompt_ids,
            sampling_params)`` returning a ``TokenOutput``-like object.
        tokenizer: supplies the eos id(s); may be None if ``stop_token_ids`` is given.
        stop_token_ids: extra end-of-turn ids (e.g. Qwen's ``<|endoftext|>``).
    """

    def __init__(self, server_manager: Any, tokenizer: Any = None, *, stop_token_ids: list[int] | None = None) -> None:
        self.server_manager = server_manager
        self._stop_ids = eos_token_ids(tokenizer) | set(stop_token_ids or [])

    async def generate(
        self, request_id: str, prompt_ids: list[int], sampling_params: dict[str, Any]
    ) -> GenerationOutput:
        output = await self.server_manager.generate(
            request_id=request_id, prompt_ids=list(prompt_ids), sampling_params=dict(sampling_params)
        )
        token_ids = [int(t) for t in output.token_ids]
        log_probs = getattr(output, "log_probs", None)
        # verl returns [] or None when logprobs were not requested.
        logprobs = [float(x) for x in log_probs] if log_probs else None
        if logprobs is not None and len(logprobs) != len(token_ids):
            raise ValueError(f"server returned {len(logprobs)} logprobs for {len(token_ids)} tokens")
        if not token_ids:
            logprobs = [] if log_probs is not None else None
        version = (getattr(output, "extra_fields", None) or {}).get("global_steps")
        return GenerationOutput(
            token_ids=token_ids,
            logprobs=logprobs,
            stop_reason=self._stop_reason(output, token_ids, sampling_params),
            weight_version=int(version) if version is not None else None,
        )

    def _stop_reason(self, output: Any, token_ids: list[int], sampling_params: dict[str, Any]) -> StopReason:
        if getattr(output, "stop_reason", None) == "aborted":
            return "abort"
        stop_ids = self._stop_ids | set(sampling_params.get("stop_token_ids") or [])
        if token_ids and token_ids[-1] in stop_ids:
            return "stop"
        max_tokens = sampling_params.get("max_tokens")
        if max_tokens is not None and len(token_ids) >= int(max_tokens):
            return "length"
        return "stop"
