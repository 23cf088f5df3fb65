"""A local transformers causal LM as a batched generation engine (CPU or a given device).

The same engine serves the rollout CLI (``policy=model``) and verl's trainer on CPU
(``recipe.verl_cpu.rollout``, the ``hf`` rollout backend), so the policy is sampled
by the same code in both.

- **Continuous batching**: requests from many rollouts share one decode forward
  pass per token (a CPU decode step is bound by reading the weights, so a batch of
  8 costs little more than one sequence). Prefill runs one sequence at a time in
  chunks of ``prefill_chunk_tokens``, interleaved with decode steps, so a long new
  prompt does not stall the running turns.
- **Prefix cache**: a finished turn's keys/values are parked (LRU, up to
  ``prefix_cache_bytes``); a new request reuses the longest cached prefix of its
  prompt, from a parked turn or a running sequence. An agent's next turn extends
  its last one exactly (the proxy keeps sampled ids verbatim), so it prefills only
  the new tool output; the n rollouts of a GRPO group share their first prompt.
  Matching is by token prefix, not request id: verl's ``LLMServerClient`` sends a
  fresh request id per turn.
- **Sampling** follows vLLM's semantics for the keys verl sends
  (``model_proxy.backends.sampler``): logprobs of the sampled tokens under the
  processed distribution. Randomness is seeded per call from ``(seed, request_id,
  len(prompt_ids))``; batched and single-sequence forwards can differ in the last
  float bits, so sampled tokens are reproducible per schedule, not bit-for-bit
  across schedules.
- **Weights** can be replaced between steps (``load_state_dict``, verl's weight
  sync); the prefix cache is dropped then, since its keys came from the old weights.

All model work runs in one scheduler thread; ``generate`` only waits on a future,
so the event loop never blocks.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .base import GenerationOutput, StopReason
from .kv_slots import SLOT_ATTENTION, ParkedKV, SlotCache
from .sampler import DEFAULT_MAX_TOKENS, SamplingSettings, request_seed, sample_token

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_MAX_TOKENS", "EngineSettings", "EngineStats", "HFLocalBackend"]


@dataclass(frozen=True)
class EngineSettings:
    """Scheduling limits of ``HFLocalBackend``.

    Attributes:
        max_num_seqs: sequences decoded together at most (others queue).
        prefill_chunk_tokens: tokens of one prompt prefilled per forward pass.
        prefix_cache_bytes: memory for parked turns' keys/values, bytes (0 = off).
        max_model_len: context length in tokens; None = the model config's
            ``max_position_embeddings``.
    """

    max_num_seqs: int = 8
    prefill_chunk_tokens: int = 512
    prefix_cache_bytes: int = 1 << 30
    max_model_len: int | None = None


@dataclass
class EngineStats:
    """Counters since start (or the last ``reset_stats``). Token counts are tokens; times seconds."""

    requests: int = 0
    prompt_tokens: int = 0
    reused_prompt_tokens: int = 0
    prefilled_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0
    decode_rows: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    weight_loads: int = 0
    aborted: int = 0

    @property
    def mean_batch(self) -> float:
        """Mean sequences per decode step."""
        return self.decode_rows / self.decode_steps if self.decode_steps else 0.0


@dataclass(eq=False)
class _Sequence:
    prompt: list[int]
    settings: SamplingSettings
    generator: Any
    future: Future
    kv_tokens: list[int] = field(default_factory=list)  # positions whose keys are in the slot
    to_prefill: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    slot: int = -1


def _common_prefix(a: tuple[int, ...] | list[int], b: list[int]) -> int:
    """Length of the common prefix of two token sequences (C-speed slice compares)."""
    n = min(len(a), len(b))
    if list(a[:n]) == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if list(a[:mid]) == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class HFLocalBackend:
    """``GenerationBackend`` over a transformers causal LM (see module docstring).

    Args:
        model_path: a Hugging Face model directory (e.g. ``prepare.tiny_model`` or
            ``prepare.smollm2`` output).
        device: torch device string.
        seed: base seed of the per-call generators.
        num_threads: ``torch.set_num_threads`` value, applied at construction
            (process-wide: torch has one intra-op pool); None leaves it unchanged.
        stop_token_ids: end-of-turn ids besides the generation config's eos ids.
        dtype: torch dtype name for loading (default float32).
        settings: batching and cache limits.

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
        settings: EngineSettings | None = None,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self._torch = torch
        self.settings = settings or EngineSettings()
        self.device = torch.device(device)
        self.seed = int(seed)
        self.model = AutoModelForCausalLM.from_pretrained(
            str(model_path), dtype=getattr(torch, dtype), attn_implementation=SLOT_ATTENTION
        )
        self.model.to(self.device)
        self.model.eval()
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.model.config.eos_token_id
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        self.stop_token_ids = frozenset(int(i) for i in eos_ids) | frozenset(stop_token_ids or [])
        config = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else self.model.config
        self.max_model_len = int(self.settings.max_model_len or getattr(config, "max_position_embeddings", 32768))
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self._cache = SlotCache(
            num_layers=config.num_hidden_layers,
            kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim,
            max_slots=self.settings.max_num_seqs,
            dtype=self.model.dtype,
            device=self.device,
            max_len=self.max_model_len,
        )
        self.stats = EngineStats()
        self.weight_version = 0
        self._parked: collections.OrderedDict[tuple[int, ...], ParkedKV] = collections.OrderedDict()
        self._parked_bytes = 0
        self._pending: collections.deque[_Sequence] = collections.deque()
        self._decoding: list[_Sequence] = []  # slots 0..len-1, in slot order
        self._prefilling: _Sequence | None = None  # slot len(self._decoding)
        self._controls: collections.deque[tuple[Callable[[], Any], Future]] = collections.deque()
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="hf-local-engine", daemon=True)
        self._thread.start()

    # -- public API -----------------------------------------------------------------------------

    async def generate(
        self, request_id: str, prompt_ids: list[int], sampling_params: dict[str, Any]
    ) -> GenerationOutput:
        """Sample one turn (``GenerationBackend``); waits in the event loop, computes in the engine thread.

        Raises:
            ValueError: empty prompt, a prompt at or over the context length, or bad sampling values.
        """
        return await asyncio.wrap_future(self.submit(request_id, prompt_ids, sampling_params))

    def generate_sync(self, request_id: str, prompt_ids: list[int], params: dict[str, Any]) -> GenerationOutput:
        """Blocking ``generate`` (scripts, tests)."""
        return self.submit(request_id, prompt_ids, params).result()

    def submit(self, request_id: str, prompt_ids: list[int], params: dict[str, Any]) -> Future:
        """Queue a request; the future resolves to a ``GenerationOutput`` (or its error)."""
        future: Future = Future()
        prompt = [int(t) for t in prompt_ids]
        try:
            if not prompt:
                raise ValueError("prompt_ids is empty")
            if len(prompt) >= self.max_model_len:
                raise ValueError(f"prompt of {len(prompt)} tokens leaves no room in the {self.max_model_len}-token context")
            settings = SamplingSettings.from_params(params, default_stop_ids=self.stop_token_ids)
        except ValueError as exc:
            future.set_exception(exc)
            return future
        room = self.max_model_len - len(prompt)
        if settings.max_tokens > room:
            settings = dataclasses.replace(settings, max_tokens=room)
        generator = self._torch.Generator(device="cpu").manual_seed(request_seed(self.seed, request_id, len(prompt)))
        seq = _Sequence(prompt=prompt, settings=settings, generator=generator, future=future)
        with self._wake:
            if self._closed:
                future.set_exception(RuntimeError("engine is closed"))
                return future
            self._pending.append(seq)
            self._wake.notify()
        return future

    def load_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Replace the model's weights (between generation steps) and drop the prefix cache.

        Returns ``{"loaded", "missing", "unexpected", "version"}`` (the model's
        ``load_state_dict(strict=False)`` result; ``missing`` lists parameters the dict
        did not cover, e.g. a tied ``lm_head``).
        """

        def load() -> dict[str, Any]:
            result = self.model.load_state_dict(state_dict, strict=False)
            self._clear_parked()
            self.weight_version += 1
            self.stats.weight_loads += 1
            return {
                "loaded": len(state_dict),
                "missing": list(result.missing_keys),
                "unexpected": list(result.unexpected_keys),
                "version": self.weight_version,
            }

        return self._control(load)

    def drop_prefix_cache(self) -> None:
        """Forget every parked turn (e.g. when the server sleeps)."""
        self._control(self._clear_parked)

    def abort_all(self) -> int:
        """End every queued and running request now (stop reason ``abort``); returns how many."""
        return self._control(self._abort_all)

    def reset_stats(self) -> EngineStats:
        """Return the counters and start new ones."""
        return self._control(self._swap_stats)

    def parameter_checksum(self) -> float:
        """Sum of all parameters (float64): tells a weight update from none."""
        return self._control(lambda: float(sum(p.double().sum() for p in self.model.parameters())))

    def close(self) -> None:
        """Stop the engine thread; queued and running requests end with ``abort``."""
        with self._wake:
            if self._closed:
                return
            self._closed = True
            self._wake.notify()
        self._thread.join()

    # -- the engine thread ----------------------------------------------------------------------

    def _control(self, fn: Callable[[], Any]) -> Any:
        if threading.current_thread() is self._thread:
            return fn()
        future: Future = Future()
        with self._wake:
            if self._closed:
                raise RuntimeError("engine is closed")
            self._controls.append((fn, future))
            self._wake.notify()
        return future.result()

    def _swap_stats(self) -> EngineStats:
        stats, self.stats = self.stats, EngineStats()
        return stats

    def _run(self) -> None:
        torch = self._torch
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not (self._closed or self._controls or self._pending or self._decoding or self._prefilling):
                        self._wake.wait()
                    if self._closed:
                        break
                    controls = list(self._controls)
                    self._controls.clear()
                for fn, future in controls:
                    try:
                        future.set_result(fn())
                    except BaseException as exc:  # noqa: BLE001 - handed to the caller
                        future.set_exception(exc)
                try:
                    self._admit()
                    if self._prefilling is not None:
                        self._prefill_chunk()
                    if self._decoding:
                        self._decode_step()
                except Exception as exc:  # a model error fails the requests it touched, not the engine
                    logger.exception("generation step failed")
                    self._fail_running(exc)
        self._abort_all()
        for fn, future in self._controls:
            future.set_exception(RuntimeError("engine is closed"))

    def _admit(self) -> None:
        if self._prefilling is not None or len(self._decoding) >= self.settings.max_num_seqs:
            return
        with self._wake:
            if not self._pending:
                return
            seq = self._pending.popleft()
        seq.slot = len(self._decoding)
        self._reuse_prefix(seq)
        self.stats.requests += 1
        self.stats.prompt_tokens += len(seq.prompt)
        self.stats.reused_prompt_tokens += len(seq.kv_tokens)
        self._prefilling = seq

    def _reuse_prefix(self, seq: _Sequence) -> None:
        """Start ``seq``'s slot from the longest cached prefix of its prompt (at least one token left to run)."""
        limit = len(seq.prompt) - 1
        best_len, best_parked, best_running = 0, None, None
        for tokens, parked in self._parked.items():
            n = min(_common_prefix(tokens, seq.prompt), limit)
            if n > best_len:
                best_len, best_parked, best_running = n, parked, None
        for running in self._decoding:
            n = min(_common_prefix(running.kv_tokens, seq.prompt), limit)
            if n > best_len:
                best_len, best_parked, best_running = n, None, running
        if best_parked is not None:
            self._parked.move_to_end(best_parked.tokens)
            self._cache.restore(best_parked, seq.slot, best_len)
        elif best_running is not None:
            self._cache.ensure(best_len)
            self._cache.move(best_running.slot, seq.slot, best_len)
        seq.kv_tokens = seq.prompt[:best_len]
        seq.to_prefill = seq.prompt[best_len:]

    def _prefill_chunk(self) -> None:
        torch = self._torch
        seq = self._prefilling
        assert seq is not None
        chunk = seq.to_prefill[: self.settings.prefill_chunk_tokens]
        start = time.perf_counter()
        mask = self._cache.begin_prefill(seq.slot, len(seq.kv_tokens), len(chunk))
        positions = torch.arange(len(seq.kv_tokens), len(seq.kv_tokens) + len(chunk), device=self.device)[None]
        out = self.model(
            input_ids=torch.tensor([chunk], device=self.device),
            attention_mask=mask,
            position_ids=positions,
            past_key_values=self._cache,
            use_cache=True,
            logits_to_keep=1,
        )
        seq.kv_tokens.extend(chunk)
        del seq.to_prefill[: len(chunk)]
        self.stats.prefilled_tokens += len(chunk)
        self.stats.prefill_s += time.perf_counter() - start
        if seq.to_prefill:
            return
        self._prefilling = None
        self._decoding.append(seq)
        self._accept(seq, out.logits[0, -1])

    def _decode_step(self) -> None:
        torch = self._torch
        rows = list(self._decoding)
        start = time.perf_counter()
        positions = [len(s.kv_tokens) for s in rows]
        mask = self._cache.begin_decode(positions)
        out = self.model(
            input_ids=torch.tensor([[s.token_ids[-1]] for s in rows], device=self.device),
            attention_mask=mask,
            position_ids=torch.tensor(positions, device=self.device)[:, None],
            past_key_values=self._cache,
            use_cache=True,
        )
        logits = out.logits[:, -1]
        self.stats.decode_steps += 1
        self.stats.decode_rows += len(rows)
        self.stats.decode_s += time.perf_counter() - start
        for row, seq in enumerate(rows):
            seq.kv_tokens.append(seq.token_ids[-1])
        for row, seq in enumerate(rows):
            self._accept(seq, logits[row])

    def _accept(self, seq: _Sequence, logits: Any) -> None:
        """Sample ``seq``'s next token from ``logits``; finish it at a stop token or its limit."""
        token, logprob = sample_token(logits, seq.settings, seq.generator)
        seq.token_ids.append(token)
        seq.logprobs.append(logprob)
        self.stats.generated_tokens += 1
        if token in seq.settings.stop_token_ids:
            self._finish(seq, "stop")
        elif len(seq.token_ids) >= seq.settings.max_tokens:
            self._finish(seq, "length")

    def _finish(self, seq: _Sequence, reason: StopReason) -> None:
        self._release_slot(seq, park=reason != "abort")
        if not seq.future.done():
            seq.future.set_result(GenerationOutput(token_ids=seq.token_ids, logprobs=seq.logprobs, stop_reason=reason,
                                                   weight_version=self.weight_version))

    def _release_slot(self, seq: _Sequence, *, park: bool) -> None:
        """Take ``seq`` out of its slot, keeping slots 0..n-1 dense (one sequence moved at most twice)."""
        if park and self.settings.prefix_cache_bytes > 0 and seq.kv_tokens:
            self._park(self._cache.park(seq.slot, tuple(seq.kv_tokens)))
        if seq is self._prefilling:
            self._prefilling = None
            return
        if seq not in self._decoding:
            return
        index = self._decoding.index(seq)
        last = self._decoding.pop()
        if last is not seq:
            self._cache.move(last.slot, index, len(last.kv_tokens))
            last.slot = index
            self._decoding[index] = last
        if self._prefilling is not None:
            new_slot = len(self._decoding)
            self._cache.move(self._prefilling.slot, new_slot, len(self._prefilling.kv_tokens))
            self._prefilling.slot = new_slot

    def _park(self, parked: ParkedKV) -> None:
        # A parked turn that is a prefix of the new one is redundant: the new one covers it.
        for tokens in [t for t in self._parked if len(t) <= len(parked.tokens) and parked.tokens[: len(t)] == t]:
            self._parked_bytes -= self._parked.pop(tokens).nbytes
        if parked.nbytes > self.settings.prefix_cache_bytes:
            return
        self._parked[parked.tokens] = parked
        self._parked_bytes += parked.nbytes
        while self._parked_bytes > self.settings.prefix_cache_bytes:
            _, old = self._parked.popitem(last=False)
            self._parked_bytes -= old.nbytes

    def _clear_parked(self) -> None:
        self._parked.clear()
        self._parked_bytes = 0

    def _abort_all(self) -> int:
        with self._wake:
            pending = list(self._pending)
            self._pending.clear()
        running = list(self._decoding) + ([self._prefilling] if self._prefilling is not None else [])
        for seq in running + pending:
            self._finish(seq, "abort")
        self.stats.aborted += len(running) + len(pending)
        return len(running) + len(pending)

    def _fail_running(self, exc: Exception) -> None:
        running = list(self._decoding) + ([self._prefilling] if self._prefilling is not None else [])
        for seq in running:
            self._release_slot(seq, park=False)
            if not seq.future.done():
                seq.future.set_exception(exc)
