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

Guard: ``with_render_cache`` renders a probe conversation both ways when it wraps a
builder and returns the builder unchanged (with a warning) if they differ, e.g. for
a tokenizer whose Python side post-processes ``apply_chat_template``. Multimodal
builders are returned unchanged (their renders carry images, not only text).
"""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
    """A bounded, thread-safe LRU cache of token ids for one tokenizer, by text piece.

    ``ids(tokenizer, text)`` cuts ``text`` at the special tokens the tokenizer always
    splits on (``special_token_splitter``: ``<|im_start|>``, ``<|im_end|>``...), looks
    each piece between them up, and encodes only the pieces it has not seen. A chat
    render is mostly pieces seen before (the tool-schema system prompt, role headers,
    earlier turns); only the newly appended message is new text. Without a splitter
    (a slow tokenizer, truncation set, a tokenizer whose pieces do not encode
    independently) the whole text is one piece.

    Args:
        max_entries: pieces kept (least recently used evicted first).
        max_text_chars: pieces longer than this are encoded but not stored (a
            segment's first prompt can be long and is never rendered again).

    Attributes:
        hits, misses: piece lookups answered from the cache / encoded.

    Raises:
        ValueError: ``max_entries < 1``; ``ids`` called with a second tokenizer (ids
            depend on the tokenizer, and the cache is keyed by text only).
    """

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, max_text_chars: int = DEFAULT_MAX_TEXT_CHARS) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.max_entries = max_entries
        self.max_text_chars = max_text_chars
        self._entries: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._lock = threading.Lock()
        self._tokenizer: Any = None
        self._splitter: SpecialTokenSplitter | None = None
        self.hits = 0
        self.misses = 0

    def ids(self, tokenizer: Any, text: str) -> list[int]:
        """Token ids of ``text`` encoded without added special tokens (a new list each call);
        equal to ``tokenizer(text, add_special_tokens=False)["input_ids"]``."""
        splitter = self._bind(tokenizer)
        if splitter is None:
            return list(self._piece_ids(tokenizer, text))
        return splitter.encode(text, lambda piece: self._piece_ids(tokenizer, piece))

    def _bind(self, tokenizer: Any) -> SpecialTokenSplitter | None:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = tokenizer
                self._splitter = special_token_splitter(tokenizer)
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
        ids = tuple(encode_text(tokenizer, piece))
        if len(piece) <= self.max_text_chars:
            with self._lock:
                self._entries[piece] = ids
                self._entries.move_to_end(piece)
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
        return ids

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True)
class SpecialTokenSplitter:
    """Where a tokenizer's encoding of a text falls apart into independent pieces.

    Attributes:
        pattern: matches the split tokens' texts (longest first).
        token_ids: split token text -> its id.
    """

    pattern: re.Pattern[str]
    token_ids: dict[str, int]

    def encode(self, text: str, encode_piece: Callable[[str], Sequence[int]]) -> list[int]:
        """``text``'s ids: each non-empty piece between split tokens through ``encode_piece``,
        each split token as its id."""
        out: list[int] = []
        start = 0
        for match in self.pattern.finditer(text):
            if match.start() > start:
                out.extend(encode_piece(text[start : match.start()]))
            out.append(self.token_ids[match.group()])
            start = match.end()
        if start < len(text):
            out.extend(encode_piece(text[start:]))
        return out


def special_token_splitter(tokenizer: Any) -> SpecialTokenSplitter | None:
    """The added tokens at which ``encode(a + token + b) == encode(a) + [id] + encode(b)``.

    Hugging Face ``tokenizers`` cuts the input at added tokens before anything else
    (``AddedVocabulary::extract_and_normalize``), then normalizes, pre-tokenizes and
    runs the model on each piece separately, so pieces between such tokens encode
    independently. A token qualifies when its match cannot depend on its context: it
    is matched on raw text (``normalized=False``), takes no neighbouring whitespace
    (``lstrip``/``rstrip`` off), needs no word boundary (``single_word`` off), and no
    other raw-text added token can overlap or contain it. When some token needs word
    boundaries, a split token must begin and end with a non-word character.

    Even then, a pre-tokenizer may treat a sequence's first piece specially (e.g.
    ``Metaspace(prepend_scheme="first")``): a probe text is encoded both ways and the
    splitter is only returned when they agree.

    Returns:
        The splitter, or None: no fast tokenizer in the state ``encode_text`` can use,
        no qualifying token, or the probe disagrees.
    """
    backend = _fast_backend(tokenizer)
    if backend is None or not hasattr(backend, "get_added_tokens_decoder"):
        return None
    added = list(backend.get_added_tokens_decoder().items())
    raw = [token.content for _, token in added if not token.normalized and token.content]
    needs_boundaries = any(token.single_word for _, token in added)
    token_ids: dict[str, int] = {}
    for token_id, token in added:
        content = token.content
        if not content or token.normalized or token.lstrip or token.rstrip or token.single_word:
            continue
        if needs_boundaries and (_is_word_char(content[0]) or _is_word_char(content[-1])):
            continue
        if any(_overlaps(content, other, same=other == content) for other in raw):
            continue
        token_ids[content] = token_id
    if not token_ids:
        return None
    pattern = re.compile("|".join(re.escape(t) for t in sorted(token_ids, key=len, reverse=True)))
    splitter = SpecialTokenSplitter(pattern=pattern, token_ids=token_ids)
    probe = "".join(f" x{t}\n\n  ü {t}{t}y \t{t}" for t in token_ids) + " ünï 😀\n"
    piecewise = splitter.encode(probe, lambda piece: encode_text(tokenizer, piece))
    if piecewise != encode_text(tokenizer, probe):
        logger.info("model proxy: %s does not encode independently across special tokens; "
                    "caching whole renders only", type(tokenizer).__name__)
        return None
    return splitter


def _is_word_char(char: str) -> bool:
    return char.isalnum() or char == "_"


def _overlaps(token: str, other: str, *, same: bool) -> bool:
    """Whether ``other`` can match across, inside or around an occurrence of ``token``
    (for ``same``: whether ``token`` can overlap itself)."""
    if not same and (token in other or other in token):
        return True
    for k in range(1, min(len(token), len(other))):
        if token[:k] == other[-k:] or token[-k:] == other[:k]:
            return True
    return False


def _fast_backend(tokenizer: Any) -> Any:
    """The Rust backend when encoding with it equals ``tokenizer(text, add_special_tokens=False)``
    (no truncation, no padding, the same special-token splitting), else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if (
        backend is not None
        and backend.truncation is None
        and backend.padding is None
        and bool(backend.encode_special_tokens) == bool(getattr(tokenizer, "split_special_tokens", False))
    ):
        return backend
    return None


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """``tokenizer(text, add_special_tokens=False)["input_ids"]``, without its Python overhead.

    For a fast tokenizer whose Rust backend is in the state ``__call__`` would put it
    in (``_fast_backend``), the backend encodes directly (``encode_batch_fast`` on a
    batch of one, as ``__call__`` does, minus offset tracking); anything else goes
    through ``__call__``.
    """
    backend = _fast_backend(tokenizer)
    if backend is not None:
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
