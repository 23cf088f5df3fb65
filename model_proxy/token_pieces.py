"""Where a Hugging Face tokenizer's encoding falls apart into independent pieces.

Hugging Face ``tokenizers`` cuts its input at added tokens before anything else, so
the text between such tokens encodes independently (``special_token_splitter``).
The render cache memoises those pieces, and ``literal_specials`` escapes the same
tokens in observations; ``encode_text`` is the tokenizer's own encoding without its
Python overhead.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from verl.utils.tokenizer.tokenizer import normalize_token_ids

logger = logging.getLogger(__name__)


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
