"""A local transformers causal LM as a generation backend (development, tests, small evals).

Sampling follows vLLM's semantics for the keys verl sends: ``temperature`` (0 =
greedy), ``top_k`` (-1 or 0 = off), ``top_p``, ``max_tokens``, ``stop_token_ids``.
``logprobs`` are those of the sampled tokens under the distribution actually
sampled from (after temperature, top-k and top-p), like verl's default vLLM setting
``logprobs_mode="processed_logprobs"``; greedy turns report the unscaled
log-softmax. Other keys (``repetition_penalty``, ``logprobs``...) are accepted and
ignored. Generation stops after an end-of-turn id (the model's generation-config
eos ids, or ``stop_token_ids``) or after ``max_tokens`` tokens.

All model work runs in a dedicated single-thread executor, so the event loop never
blocks and concurrent sessions queue for the model. Randomness is seeded per call
from ``(seed, request_id, len(prompt_ids))``: results do not depend on how
concurrent sessions interleave, and a given trajectory prefix always samples the
same turn.
"""

from __future__ import annotations

import asyncio
import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .base import GenerationOutput, StopReason

DEFAULT_MAX_TOKENS = 256


class HFLocalBackend:
    """``GenerationBackend`` over ``AutoModelForCausalLM`` on CPU (or a given device).

    Args:
        model_path: a Hugging Face model directory (e.g. ``prepare.tiny_model`` output).
        device: torch device string.
        seed: base seed of the per-call generators.
        num_threads: ``torch.set_num_threads`` value, applied at construction. Note it is
            process-wide (torch has one intra-op pool); None leaves it unchanged.
        stop_token_ids: extra end-of-turn ids besides the generation config's eos ids.
        dtype: torch dtype name for loading (default float32).

    Loading happens in the constructor (blocking, seconds); construct it before
    serving, not inside a request.
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        device: str = "cpu",
        seed: int = 0,
        num_threads: int | None = 1,
        stop_token_ids: list[int] | None = None,
        dtype: str = "float32",
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self._torch = torch
        self.device = torch.device(device)
        self.seed = int(seed)
        self.model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=getattr(torch, dtype))
        self.model.to(self.device)
        self.model.eval()
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.model.config.eos_token_id
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        self.stop_token_ids = frozenset(int(i) for i in eos_ids) | frozenset(stop_token_ids or [])
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-local-generate")

    async def generate(
        self, request_id: str, prompt_ids: list[int], sampling_params: dict[str, Any]
    ) -> GenerationOutput:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, self.generate_sync, request_id, list(prompt_ids), dict(sampling_params)
        )

    def close(self) -> None:
        """Stop the generation thread (pending calls finish first)."""
        self._executor.shutdown(wait=True)

    # -- the sampling loop (runs in the executor thread) -------------------------------------

    def generate_sync(self, request_id: str, prompt_ids: list[int], params: dict[str, Any]) -> GenerationOutput:
        """Sample one turn. Blocking; ``generate`` runs it in the executor."""
        torch = self._torch
        if not prompt_ids:
            raise ValueError("prompt_ids is empty")
        max_tokens = int(params.get("max_tokens") or DEFAULT_MAX_TOKENS)
        temperature = float(params.get("temperature", 1.0) if params.get("temperature") is not None else 1.0)
        top_p = float(params.get("top_p") if params.get("top_p") is not None else 1.0)
        top_k = int(params.get("top_k") if params.get("top_k") is not None else -1)
        stop_ids = self.stop_token_ids | frozenset(int(i) for i in params.get("stop_token_ids") or [])
        generator = torch.Generator(device="cpu").manual_seed(self._call_seed(request_id, len(prompt_ids)))

        token_ids: list[int] = []
        logprobs: list[float] = []
        stop_reason: StopReason = "length"
        with torch.inference_mode():
            inputs = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
            out = self.model(input_ids=inputs, use_cache=True)
            past = out.past_key_values
            logits = out.logits[0, -1]
            for _ in range(max_tokens):
                token, logprob = _sample(torch, logits.float().cpu(), temperature, top_k, top_p, generator)
                token_ids.append(token)
                logprobs.append(logprob)
                if token in stop_ids:
                    stop_reason = "stop"
                    break
                if len(token_ids) >= max_tokens:
                    break
                step = torch.tensor([[token]], dtype=torch.long, device=self.device)
                out = self.model(input_ids=step, past_key_values=past, use_cache=True)
                past = out.past_key_values
                logits = out.logits[0, -1]
        return GenerationOutput(token_ids=token_ids, logprobs=logprobs, stop_reason=stop_reason)

    def _call_seed(self, request_id: str, prompt_len: int) -> int:
        digest = hashlib.sha256(f"{self.seed}:{request_id}:{prompt_len}".encode()).digest()
        return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def _sample(torch: Any, logits: Any, temperature: float, top_k: int, top_p: float, generator: Any) -> tuple[int, float]:
    """One token and its logprob (see module doc for which distribution)."""
    if temperature <= 0.0:
        logp = torch.log_softmax(logits, dim=-1)
        token = int(torch.argmax(logits).item())
        return token, float(logp[token].item())
    scaled = logits / temperature
    if 0 < top_k < scaled.numel():
        kth = torch.topk(scaled, top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        scaled = torch.full_like(scaled, float("-inf")).scatter(0, order, sorted_logits)
    logp = torch.log_softmax(scaled, dim=-1)
    token = int(torch.multinomial(logp.exp(), 1, generator=generator).item())
    return token, float(logp[token].item())
