"""Per-turn sampling parameters handed to a generation backend.

The trainer's ``sampling_params`` (verl's ``AgentLoopWorker``: temperature, top_p,
top_k, repetition_penalty, logprobs) define the policy being trained, so they win
over whatever the agent asks for; the agent's ``temperature`` / ``top_p`` only fill
keys the trainer left out (useful for evaluation runs with an empty dict). The
per-turn ``max_tokens`` is always set explicitly (verl's docs: pass it, or the server
derives a default from the prompt). Keys that only mean something to the OpenAI API
are removed: they would make ``vllm.SamplingParams(**params)`` fail.
"""

from __future__ import annotations

from typing import Any

# OpenAI request keys that are not vLLM SamplingParams keys (or mean something else there).
OPENAI_ONLY_KEYS = frozenset(
    {
        "messages",
        "model",
        "n",
        "stream",
        "stream_options",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "functions",
        "function_call",
        "response_format",
        "user",
        "store",
        "metadata",
        "service_tier",
        "modalities",
        "audio",
        "prediction",
        "reasoning_effort",
        "web_search_options",
        "max_completion_tokens",
        "top_logprobs",
        "logit_bias",
        "extra_body",
    }
)


def turn_sampling_params(
    trainer_params: dict[str, Any],
    *,
    max_tokens: int,
    agent_temperature: float | None = None,
    agent_top_p: float | None = None,
) -> dict[str, Any]:
    """Merge trainer and agent sampling parameters for one turn.

    Returns:
        A new dict: agent temperature/top_p (if given) overridden by every trainer key
        not in ``OPENAI_ONLY_KEYS``, then ``max_tokens`` (>= 1) set last.
    """
    params: dict[str, Any] = {}
    if agent_temperature is not None:
        params["temperature"] = agent_temperature
    if agent_top_p is not None:
        params["top_p"] = agent_top_p
    params.update({k: v for k, v in trainer_params.items() if k not in OPENAI_ONLY_KEYS})
    params["max_tokens"] = int(max_tokens)
    return params
