"""Special-token text inside prompts and observations stays text.

Why: a chat template is rendered to a string and the string is then tokenized, so a
tool output or user message that *contains* ``<|im_end|>\\n<|im_start|>assistant``
would be tokenized as the real control tokens: an observation could forge turn
boundaries (or tool-call markers) in the training tokens, and the policy would be
trained on a conversation structure nobody produced. Inference engines that
tokenize rendered templates have the same hole; the proxy owns the token ids, so it
can close it.

How: before the template is rendered, every occurrence of a control token's text in
the content of a non-assistant message is replaced by a placeholder (an escape
character from Unicode's supplementary private use area followed by the token's
code; a literal escape character is doubled). The template is rendered as usual, so
its own control tokens are the only real ones in the string. The string is cut at
those (``token_pieces.SpecialTokenSplitter``), and a piece that holds placeholders is
restored to the original text and encoded with a copy of the tokenizer that has no
such added tokens: the text becomes the ordinary sub-word tokens it would be as prose.
Pieces without placeholders encode exactly as before.

Assistant messages are not escaped: their tokens are the policy's own samples, and
re-rendered assistant text must reach the template as it was (templates inspect it,
e.g. for reasoning blocks).

Covered: the added tokens the splitter cuts at (raw-text tokens whose match does not
depend on context: ChatML's ``<|im_start|>``/``<|im_end|>``/``<|endoftext|>``, Qwen's
``<tool_call>``..., SmolLM2's ``<repo_name>``...). A tokenizer without such a splitter
(slow tokenizers, context-dependent pieces) is not escaped, and
``LiteralSpecials.build`` says why.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any

from .token_pieces import SpecialTokenSplitter, encode_text

logger = logging.getLogger(__name__)

# Plane 15 (Supplementary Private Use Area-A): never assigned, rare in real text.
ESCAPE = "\U000F0000"
_FIRST_CODE = 0xF0001
_RESTORE = re.compile(re.escape(ESCAPE) + "(.)", re.DOTALL)


@dataclass(frozen=True)
class LiteralSpecials:
    """Escapes control-token text in messages and encodes it back as plain text.

    Attributes:
        pattern: matches the escaped tokens' texts (longest first).
        codes: token text -> its placeholder code character.
        texts: placeholder code character -> token text.
        plain: a ``tokenizers.Tokenizer`` equal to the tokenizer's backend without the
            escaped added tokens.
    """

    pattern: re.Pattern[str]
    codes: dict[str, str]
    texts: dict[str, str]
    plain: Any

    @classmethod
    def build(cls, tokenizer: Any, splitter: SpecialTokenSplitter | None) -> LiteralSpecials | None:
        """The escaper for ``tokenizer``, or None (logged) when it cannot be exact.

        Args:
            tokenizer: a Hugging Face tokenizer.
            splitter: ``special_token_splitter(tokenizer)``: the tokens escaped are its.

        Returns None when there is no splitter, or when the plain copy of the tokenizer
        disagrees with the tokenizer on a probe text without control tokens, or still
        produces a control token's id from its text.
        """
        if splitter is None:
            logger.warning("model proxy: %s has no context-free special-token split; special-token text in "
                           "observations is tokenized as the special tokens", type(tokenizer).__name__)
            return None
        from tokenizers import Tokenizer

        escaped = sorted(splitter.token_ids, key=len, reverse=True)
        state = json.loads(tokenizer.backend_tokenizer.to_str())
        state["added_tokens"] = [t for t in state.get("added_tokens", []) if t.get("content") not in splitter.token_ids]
        plain = Tokenizer.from_str(json.dumps(state))
        probe = "def f(x):\n    return x  # ünï 😀 <| im_end |> <tool call>\n\n\t"
        with_specials = " ".join(escaped) + " x" + "".join(escaped)
        plain_ids = plain.encode(with_specials, add_special_tokens=False).ids
        if (plain.encode(probe, add_special_tokens=False).ids != encode_text(tokenizer, probe)
                or set(plain_ids) & set(splitter.token_ids.values())):
            logger.warning("model proxy: %s cannot encode special-token text as plain text; special-token text in "
                           "observations is tokenized as the special tokens", type(tokenizer).__name__)
            return None
        codes = {text: chr(_FIRST_CODE + i) for i, text in enumerate(escaped)}
        return cls(
            pattern=re.compile("|".join(re.escape(t) for t in escaped)),
            codes=codes,
            texts={code: text for text, code in codes.items()},
            plain=plain,
        )

    def escape_text(self, text: str) -> str:
        """``text`` with each control token's text replaced by its placeholder."""
        if ESCAPE in text:
            text = text.replace(ESCAPE, ESCAPE + ESCAPE)
        return self.pattern.sub(lambda m: ESCAPE + self.codes[m.group()], text)

    def escape_messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Copies of the non-assistant messages with escaped string content (the list and
        the messages themselves are not modified; unchanged messages are shared)."""
        out = []
        for message in messages:
            content = message.get("content")
            if message.get("role") != "assistant" and isinstance(content, str):
                escaped = self.escape_text(content)
                if escaped != content:
                    message = {**message, "content": escaped}
            out.append(message)
        return out

    def restore(self, text: str) -> str:
        """The original text of an escaped ``text`` (inverse of ``escape_text``)."""
        return _RESTORE.sub(lambda m: ESCAPE if m.group(1) == ESCAPE else self.texts[m.group(1)], text)

    def encode(self, piece: str) -> list[int]:
        """Token ids of a piece holding placeholders: its original text as plain text."""
        return list(self.plain.encode(self.restore(piece), add_special_tokens=False).ids)
