"""The one interface every generation backend behind the ModelProxy implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

StopReason = Literal["stop", "length", "abort"]


@dataclass
class GenerationOutput:
    """Tokens sampled for one turn.

    Attributes:
        token_ids: sampled token ids, verbatim, including the end-of-turn token
            when the model emitted one (``len == n_generated``).
        logprobs: log-probability of each sampled token under the sampling policy
            (``len(logprobs) == len(token_ids)``), or None if the backend has none.
        stop_reason: ``"stop"`` (end-of-turn/stop token), ``"length"`` (hit
            ``max_tokens`` without ending the turn) or ``"abort"`` (cancelled).
        weight_version: the policy version that sampled the turn (verl's trainer
            step of the server's weights, ``TokenOutput.extra_fields["global_steps"]``);
            None when the backend does not know.
    """

    token_ids: list[int]
    logprobs: list[float] | None
    stop_reason: StopReason
    weight_version: int | None = None


@runtime_checkable
class GenerationBackend(Protocol):
    """Generates one assistant turn from prompt token ids.

    ``sampling_params`` uses vLLM ``SamplingParams`` keys (``temperature``,
    ``top_p``, ``top_k``, ``max_tokens``, ``logprobs``...); OpenAI-only keys
    are stripped by the proxy before they get here. ``request_id`` is stable for
    a whole trajectory so servers with sticky routing reuse the prefix cache.
    """

    async def generate(
        self, request_id: str, prompt_ids: list[int], sampling_params: dict[str, Any]
    ) -> GenerationOutput: ...
