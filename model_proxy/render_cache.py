"""A piece-keyed token cache under verl's Continuous Token builder.

Why: to tokenize an appended tool result, verl's builder renders the chat template
twice, a synthetic prefix (``[system, user, assistant-with-the-tool-calls]`` plus the
tool schemas) and the same prefix followed by the new messages, and keeps the
token-level difference (``ContinuousTokenBuilder.render_delta_token_id``). Both
renders tokenize the whole tool-schema system prompt on every request, although its
text rarely changes: Qwen-style templates do not render tool-call ids, so for a given
tool list the prefix text is the same on every turn of every session. Tokenizing
the prefix, and then the prefix again inside the full render, was most of the
proxy's CPU time per request (``bench/proxy_overhead.py``).

How: the builder's single rendering hook, ``_render_tokens``, is replaced in a
subclass by (1) the same chat-template call with ``tokenize=False`` and (2) the
tokenizer's encoding of that text with ``add_special_tokens=False``. That pair is
exactly what ``tokenize=True`` does in transformers 5
(``PreTrainedTokenizerBase.apply_chat_template`` renders, then calls
``self(rendered, add_special_tokens=False)``), so the ids are the same by
construction. The encoding is memoised per piece between special tokens
(``TextTokenCache``): Hugging Face tokenizers encode those pieces independently
(``special_token_splitter``), and equal text always encodes to equal ids, so a
cached piece is exact too, and a render costs the encoding of its new pieces only.
Nothing else in the builder changes: the append-only checks, the suffix diff and the
model-specific boundary handling stay verl's.

The same hook keeps special-token text in prompts and observations as text
(``literal_specials``): non-assistant message content is escaped before the render
and its pieces encoded as plain text after it, so only the template's own control
tokens become control tokens. That is the one deliberate difference from verl's
builder, and it applies with the cache off too (``max_entries=0``).

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

from .literal_specials import ESCAPE, LiteralSpecials
from .token_pieces import SpecialTokenSplitter, encode_text, special_token_splitter

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
    """A bounded, thread-safe LRU cache of token ids for one tokenizer, by text piece.

    ``ids(tokenizer, text)`` cuts ``text`` at the special tokens the tokenizer always
    splits on (``special_token_splitter``: ``<|im_start|>``, ``<|im_end|>``...), looks
    each piece between them up, and encodes only the pieces it has not seen. A chat
    render is mostly pieces seen before (the tool-schema system prompt, role headers,
    earlier turns); only the newly appended message is new text. Without a splitter
    (a slow tokenizer, truncation set, a tokenizer whose pieces do not encode
    independently) the whole text is one piece.

    Args:
        max_entries: pieces kept (least recently used evicted first); 0 keeps none
            (every piece is encoded, escaping still applies).
        max_text_chars: pieces longer than this are encoded but not stored (a
            segment's first prompt can be long and is never rendered again).

    Attributes:
        hits, misses: piece lookups answered from the cache / encoded.

    Raises:
        ValueError: ``max_entries < 0``; ``ids`` called with a second tokenizer (ids
            depend on the tokenizer, and the cache is keyed by text only).
    """

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, max_text_chars: int = DEFAULT_MAX_TEXT_CHARS) -> None:
        if max_entries < 0:
            raise ValueError(f"max_entries must be at least 0, got {max_entries}")
        self.max_entries = max_entries
        self.max_text_chars = max_text_chars
        self._entries: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._lock = threading.Lock()
        self._tokenizer: Any = None
        self._splitter: SpecialTokenSplitter | None = None
        self._literal: LiteralSpecials | None = None
        self.hits = 0
        self.misses = 0

    def ids(self, tokenizer: Any, text: str) -> list[int]:
        """Token ids of ``text`` encoded without added special tokens (a new list each call);
        equal to ``tokenizer(text, add_special_tokens=False)["input_ids"]`` for text
        without ``literal_specials`` placeholders, and a placeholder's token as plain text."""
        splitter = self._bind(tokenizer)
        if splitter is None:
            return list(self._piece_ids(tokenizer, text))
        return splitter.encode(text, lambda piece: self._piece_ids(tokenizer, piece))

    def escape_messages(self, tokenizer: Any, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``messages`` with control-token text in non-assistant content escaped for
        ``ids`` (``LiteralSpecials.escape_messages``), or as they are when the tokenizer
        has no exact escaper."""
        self._bind(tokenizer)
        return messages if self._literal is None else self._literal.escape_messages(messages)

    def _bind(self, tokenizer: Any) -> SpecialTokenSplitter | None:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = tokenizer
                self._splitter = special_token_splitter(tokenizer)
                self._literal = LiteralSpecials.build(tokenizer, self._splitter)
            elif self._tokenizer is not tokenizer:
                raise ValueError("a TextTokenCache serves one tokenizer; make one cache per tokenizer")
            return self._splitter

    def _piece_ids(self, tokenizer: Any, piece: str) -> tuple[int, ...]:
        with self._lock:
            cached = self._entries.get(piece)
            if cached is not None:
                self._entries.move_to_end(piece)
                self.hits += 1
                return cached
            self.misses += 1
        literal = self._literal
        if literal is not None and ESCAPE in piece:
            ids = tuple(literal.encode(piece))
        else:
            ids = tuple(encode_text(tokenizer, piece))
        if self.max_entries and len(piece) <= self.max_text_chars:
            with self._lock:
                self._entries[piece] = ids
                self._entries.move_to_end(piece)
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
        return ids

    def __len__(self) -> int:
        return len(self._entries)


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
        cache = self._text_token_cache
        escaped = cache.escape_messages(self.tokenizer, messages)  # type: ignore[attr-defined]
        return self._render_escaped(escaped, add_generation_prompt=add_generation_prompt, tools=tools)

    def _render_escaped(
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
                try:  # the probe's "<tool_call>" text is escaped on purpose: compare without that
                    if cached._render_escaped(_PROBE_MESSAGES[:end], **kwargs) != expected:
                        return False
                except Exception:
                    return False
    return True
