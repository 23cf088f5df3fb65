"""Key/value cache slots for batched decoding with a Hugging Face causal LM.

One ``SlotCache`` holds, per attention layer, a key and a value tensor of shape
``[max_slots, kv_heads, capacity, head_dim]``. A running sequence owns one slot;
the sequences being decoded sit in slots ``0..n-1`` so a batched decode step reads
``K[:n, :, :L]`` as a view (no per-step copy of any cache). Sequences leave and
enter by ``move`` (one sequence's keys copied once per turn, not per token).

``SlotCache`` is handed to the model's ``forward`` as ``past_key_values``:
transformers' attention layers call ``update(key_states, value_states,
layer_idx)`` (``modeling_llama.LlamaAttention.forward``, ``modeling_qwen2``), and
the step's 4D additive attention mask is built here (``masking_utils`` returns a
4D mask unchanged), so each row attends exactly to its own cached positions.

``ParkedKV`` is a finished turn's cache kept outside the slots so that the next
turn of the same trajectory (whose prompt extends the last one) prefills only its
new tokens.

``SLOT_ATTENTION`` names an attention function registered with transformers'
``AttentionInterface``: SDPA with the step's mask and ``enable_gqa=True``.
transformers' own ``sdpa`` repeats grouped key/value heads into a copy whenever a
mask is given (``integrations.sdpa_attention.use_gqa_in_sdpa``), which made a
batch-8 decode step of SmolLM2-135M on one CPU core 2.6x slower (351 vs 136 ms).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface

SLOT_ATTENTION = "swe_slot_sdpa"


def _slot_sdpa(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
               **kwargs: Any) -> tuple[torch.Tensor, None]:
    groups = query.shape[1] // key.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, scale=scaling, enable_gqa=groups > 1
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(SLOT_ATTENTION, _slot_sdpa)


@dataclass
class ParkedKV:
    """The keys and values of ``len(tokens)`` positions, one ``(K, V)`` per layer.

    Tensors are ``[kv_heads, len(tokens), head_dim]``; ``nbytes`` is their total size.
    """

    tokens: tuple[int, ...]
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    nbytes: int


class SlotCache:
    """Per-layer K/V storage for ``max_slots`` sequences (see module docstring).

    Args:
        num_layers, kv_heads, head_dim: the model's attention shape.
        max_slots: how many sequences can run at once.
        dtype, device: of the cache tensors.
        capacity: initial positions per slot; grows (doubling, one copy) up to
            ``max_len`` when a sequence needs more.
        max_len: the model's context length in tokens.

    Raises:
        ValueError: a write past ``max_len``.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        max_slots: int,
        dtype: torch.dtype,
        device: torch.device,
        max_len: int,
        capacity: int = 512,
    ) -> None:
        self.num_layers = num_layers
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.max_slots = max_slots
        self.dtype = dtype
        self.device = device
        self.max_len = max_len
        self.capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._grow(min(capacity, max_len))
        # Set by begin_decode / begin_prefill for the forward pass that follows.
        self._mode: str = ""
        self._rows: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None
        self._kv_len = 0
        self._slot = 0
        self._start = 0

    # -- capacity ------------------------------------------------------------------------------

    def ensure(self, length: int) -> None:
        """Make room for ``length`` positions per slot."""
        if length > self.max_len:
            raise ValueError(f"sequence of {length} tokens exceeds the model's context of {self.max_len}")
        if length > self.capacity:
            self._grow(min(self.max_len, max(length, 2 * self.capacity)))

    def _grow(self, capacity: int) -> None:
        shape = (self.max_slots, self.kv_heads, capacity, self.head_dim)
        keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        for old, new in zip(self.keys + self.values, keys + values):
            new[:, :, : self.capacity].copy_(old)
        self.keys, self.values, self.capacity = keys, values, capacity

    def nbytes(self) -> int:
        """Bytes held by the slot tensors."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    # -- moving sequences ----------------------------------------------------------------------

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of slot ``src`` into slot ``dst``."""
        if src == dst or length == 0:
            return
        for tensors in (self.keys, self.values):
            for t in tensors:
                t[dst, :, :length].copy_(t[src, :, :length])

    def park(self, slot: int, tokens: tuple[int, ...]) -> ParkedKV:
        """A copy of the first ``len(tokens)`` positions of ``slot``."""
        n = len(tokens)
        layers = [(k[slot, :, :n].clone(), v[slot, :, :n].clone()) for k, v in zip(self.keys, self.values)]
        nbytes = sum(k.numel() * k.element_size() * 2 for k, _ in layers)
        return ParkedKV(tokens=tokens, layers=layers, nbytes=nbytes)

    def restore(self, parked: ParkedKV, slot: int, length: int) -> None:
        """Load the first ``length`` parked positions into ``slot``."""
        self.ensure(length)
        for (k, v), (pk, pv) in zip(zip(self.keys, self.values), parked.layers):
            k[slot, :, :length].copy_(pk[:, :length])
            v[slot, :, :length].copy_(pv[:, :length])

    # -- one forward pass ----------------------------------------------------------------------

    def begin_decode(self, positions: list[int]) -> torch.Tensor:
        """Prepare a decode step of slots ``0..len(positions)-1``, one new token each.

        ``positions[b]`` is where row b's new token goes (its cached length).
        Returns the additive attention mask ``[B, 1, 1, L]`` (L = max position + 1).
        """
        n = len(positions)
        self.ensure(max(positions) + 1)
        self._mode = "decode"
        self._rows = torch.arange(n, device=self.device)
        self._positions = torch.tensor(positions, device=self.device)
        self._kv_len = max(positions) + 1
        allowed = torch.arange(self._kv_len, device=self.device)[None, :] <= self._positions[:, None]
        return self._additive(allowed[:, None, None, :])

    def begin_prefill(self, slot: int, start: int, count: int) -> torch.Tensor:
        """Prepare a forward of ``count`` tokens of ``slot`` at positions ``start..``.

        Returns the causal additive mask ``[1, 1, count, start + count]``.
        """
        self.ensure(start + count)
        self._mode = "prefill"
        self._slot, self._start = slot, start
        self._kv_len = start + count
        q = torch.arange(count, device=self.device)[:, None] + start
        allowed = torch.arange(self._kv_len, device=self.device)[None, :] <= q
        return self._additive(allowed[None, None])

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
        return mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' cache hook: store this layer's new keys/values, return the attended ones."""
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self._mode == "decode":
            keys[self._rows, :, self._positions] = key_states[:, :, 0].to(self.dtype)
            values[self._rows, :, self._positions] = value_states[:, :, 0].to(self.dtype)
            n = key_states.shape[0]
            return keys[:n, :, : self._kv_len], values[:n, :, : self._kv_len]
        if self._mode == "prefill":
            end = self._kv_len
            keys[self._slot, :, self._start : end] = key_states[0].to(self.dtype)
            values[self._slot, :, self._start : end] = value_states[0].to(self.dtype)
            s = self._slot
            return keys[s : s + 1, :, :end], values[s : s + 1, :, :end]
        raise RuntimeError("SlotCache.update called outside begin_decode/begin_prefill")

    # transformers reads these on some code paths (e.g. position ids when none are given).
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len

    def __len__(self) -> int:
        return self.num_layers
