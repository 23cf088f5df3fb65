"""Sampling one token from a row of logits, with vLLM's semantics for the keys verl sends.

``temperature`` (0 = greedy), ``top_k`` (-1 or 0 = off), ``top_p`` (1 = off). The
logprob returned is that of the sampled token under the distribution actually
sampled from (after temperature, top-k and top-p), as verl's default vLLM setting
``logprobs_mode="processed_logprobs"`` reports; a greedy token reports the
unscaled log-softmax.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch

DEFAULT_MAX_TOKENS = 256


@dataclass(frozen=True)
class SamplingSettings:
    """The sampling keys of one request (vLLM ``SamplingParams`` names).

    ``max_tokens`` is tokens to generate at most; ``stop_token_ids`` end a turn
    (the sampled stop token is kept, as vLLM keeps eos in ``token_ids``).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = DEFAULT_MAX_TOKENS
    stop_token_ids: frozenset[int] = frozenset()

    @classmethod
    def from_params(cls, params: dict[str, Any], *, default_stop_ids: frozenset[int]) -> SamplingSettings:
        """Read a verl/vLLM sampling dict; keys this sampler does not implement are ignored.

        Raises:
            ValueError: ``max_tokens`` below 1, ``top_p`` outside (0, 1] or a negative temperature.
        """

        def get(key: str, default: Any) -> Any:
            value = params.get(key)
            return default if value is None else value

        settings = cls(
            temperature=float(get("temperature", 1.0)),
            top_p=float(get("top_p", 1.0)),
            top_k=int(get("top_k", -1)),
            max_tokens=int(get("max_tokens", get("max_new_tokens", DEFAULT_MAX_TOKENS))),
            stop_token_ids=default_stop_ids | frozenset(int(i) for i in params.get("stop_token_ids") or []),
        )
        if settings.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {settings.max_tokens}")
        if not 0.0 < settings.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {settings.top_p}")
        if settings.temperature < 0.0:
            raise ValueError(f"temperature must be >= 0, got {settings.temperature}")
        return settings


def request_seed(seed: int, request_id: str, prompt_len: int) -> int:
    """A per-call seed: a given trajectory prefix samples the same turn however calls interleave."""
    digest = hashlib.sha256(f"{seed}:{request_id}:{prompt_len}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def sample_token(logits: torch.Tensor, settings: SamplingSettings, generator: torch.Generator) -> tuple[int, float]:
    """One token and its logprob from a ``[vocab]`` float tensor (see module docstring)."""
    logits = logits.float()
    if settings.temperature <= 0.0:
        logp = torch.log_softmax(logits, dim=-1)
        token = int(torch.argmax(logits).item())
        return token, float(logp[token].item())
    scaled = logits / settings.temperature
    top_k = settings.top_k
    if 0 < top_k < scaled.numel():
        kth = torch.topk(scaled, top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if settings.top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        drop = (torch.cumsum(probs, dim=-1) - probs) >= settings.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        scaled = torch.full_like(scaled, float("-inf")).scatter(0, order, sorted_logits)
    logp = torch.log_softmax(scaled, dim=-1)
    token = int(torch.multinomial(logp.exp(), 1, generator=generator).item())
    return token, float(logp[token].item())
