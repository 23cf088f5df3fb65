"""A text-keyed token cache under verl's Continuous Token builder.

Why: to tokenize an appended tool result, verl's builder renders the chat template
twice, a synthetic prefix (``[system, user, assistant-with-the-tool-calls]`` plus the
tool schemas) and the same prefix followed by the new messages, and keeps the
token-level difference (``ContinuousTokenBuilder.render_delta_token_id``). The prefix
render tokenizes the whole tool-schema system prompt on every request, although its
text rarely changes: Qwen-style templates do not render tool-call ids, so for a given
tool list the prefix text is the same on every turn of every session. Tokenizing it
was about half of the proxy's CPU time per request (``bench/proxy_overhead.py``).

How: the builder's single rendering hook, ``_render_tokens``, is replaced in a
subclass by (1) the same chat-template call with ``tokenize=False`` and (2) the
tokenizer's encoding of that text with ``add_special_tokens=False``
(``encode_text``), memoised by text. That pair is exactly what ``tokenize=True`` does in transformers 5
(``PreTrainedTokenizerBase.apply_chat_template`` renders, then calls
``self(rendered, add_special_tokens=False)``), so the ids are the same by
construction; equal text always encodes to equal ids, so a cache hit is exact too.
Nothing else in the builder changes: the append-only checks, the suffix diff and the
model-specific boundary handling stay verl's.

Guard: ``with_render_cache`` renders a probe conversation both ways when it wraps a
builder and returns the builder unchanged (with a warning) if they differ, e.g. for
a tokenizer whose Python side post-processes ``apply_chat_template``. Multimodal
builders are returned unchanged (their renders carry images, not only text).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any

from verl.utils.tokenizer.chat_template import apply_chat_template
from verl.utils.tokenizer.tokenizer import normalize_token_ids

logger = logging.getLogger(__name__)

DEFAULT_MAX_ENTRIES = 512
DEFAULT_MAX_TEXT_CHARS = 256 * 1024

_PROBE_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "bash",
            "description": "Run a shell command.",
            "parameters": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]},
        },
    }
]
_PROBE_MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "List the files, then say  hello\n\n  twice."},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": "call_0", "type": "function", "function": {"name": "bash", "arguments": '{"command": "ls -la"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_0", "content": "total 8\n-rw-r--r-- 1 u u  0 a.py\n\tüñí 😀"},
    {"role": "user", "content": "Thanks. <tool_call> is not a call here."},
]


class TextTokenCache:
    """A bounded, thread-safe LRU map from rendered text to token ids.

    Args:
        max_entries: entries kept (least recently used evicted first).
        max_text_chars: texts longer than this are encoded but not stored (a
            segment's first prompt is long and never rendered again).

    Attributes:
        hits, misses: lookups answered from the cache / encoded.
    """

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, max_text_chars: int = DEFAULT_MAX_TEXT_CHARS) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.max_entries = max_entries
        self.max_text_chars = max_text_chars
        self._entries: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def ids(self, tokenizer: Any, text: str) -> list[int]:
        """Token ids of ``text`` encoded without added special tokens (a new list each call)."""
        with self._lock:
            cached = self._entries.get(text)
            if cached is not None:
                self._entries.move_to_end(text)
                self.hits += 1
                return list(cached)
            self.misses += 1
        ids = tuple(encode_text(tokenizer, text))
        if len(text) <= self.max_text_chars:
            with self._lock:
                self._entries[text] = ids
                self._entries.move_to_end(text)
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
        return list(ids)

    def __len__(self) -> int:
        return len(self._entries)


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """``tokenizer(text, add_special_tokens=False)["input_ids"]``, without its Python overhead.

    For a fast tokenizer whose Rust backend is in the state ``__call__`` would put it
    in (no truncation, no padding, the same special-token splitting), the backend's
    single-sequence ``encode`` gives the same ids (``__call__`` runs ``encode_batch``
    on a batch of one); anything else goes through ``__call__``. Not a batch call:
    with ``TOKENIZERS_PARALLELISM`` on, a batch of one still wakes the Rayon thread
    pool, which cost more CPU than the encoding in ``bench/proxy_overhead.py``.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if (
        backend is not None
        and backend.truncation is None
        and backend.padding is None
        and bool(backend.encode_special_tokens) == bool(getattr(tokenizer, "split_special_tokens", False))
    ):
        if hasattr(backend, "encode_batch_fast"):  # tokenizers >= 0.20: no offset tracking
            return list(backend.encode_batch_fast([text], add_special_tokens=False)[0].ids)
        return list(backend.encode(text, add_special_tokens=False).ids)
    return normalize_token_ids(tokenizer(text, add_special_tokens=False)["input_ids"])


class _RenderCacheMixin:
    """Overrides verl's ``ContinuousTokenBuilder._render_tokens`` (see module doc)."""

    _text_token_cache: TextTokenCache

    def _render_tokens(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        text = apply_chat_template(
            self.tokenizer,  # type: ignore[attr-defined]
            messages,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            **self.chat_template_kwargs,  # type: ignore[attr-defined]
        )
        return self._text_token_cache.ids(self.tokenizer, text)  # type: ignore[attr-defined]


def with_render_cache(builder: Any, cache: TextTokenCache | None = None) -> Any:
    """A copy of ``builder`` whose chat-template renders go through ``cache``.

    Args:
        builder: a verl ``ContinuousTokenBuilder`` (any text model's subclass).
        cache: the text -> ids cache to use (share one per tokenizer); a new one when None.

    Returns:
        A new builder of a subclass of ``type(builder)`` with the same state, or
        ``builder`` itself when it is multimodal, already cached, or the probe render
        differs between the two paths (logged as a warning).
    """
    if isinstance(builder, _RenderCacheMixin):
        return builder
    supports_mm = getattr(builder, "supports_multimodal", None)
    if callable(supports_mm) and supports_mm():
        return builder
    cls = type(builder)
    cached_cls = type(f"RenderCached{cls.__name__}", (_RenderCacheMixin, cls), {})
    cached = object.__new__(cached_cls)
    cached.__dict__.update(builder.__dict__)
    cached._text_token_cache = cache if cache is not None else TextTokenCache()
    if not _probe_agrees(builder, cached):
        logger.warning(
            "model proxy: cached chat-template rendering differs from %s's own for a probe conversation; "
            "using the builder without the cache",
            cls.__name__,
        )
        return builder
    return cached


def _probe_agrees(reference: Any, cached: Any) -> bool:
    for tools in (_PROBE_TOOLS, None):
        for end in (2, len(_PROBE_MESSAGES)):
            for generation_prompt in (True, False):
                kwargs = {"add_generation_prompt": generation_prompt, "tools": tools}
                try:
                    expected = reference._render_tokens(_PROBE_MESSAGES[:end], **kwargs)
                except Exception:  # a template that cannot render the probe at all: nothing to compare
                    continue
                try:
                    if cached._render_tokens(_PROBE_MESSAGES[:end], **kwargs) != expected:
                        return False
                except Exception:
                    return False
    return True
