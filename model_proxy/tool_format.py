"""Turning sampled token ids into an OpenAI assistant message, and the text formats the
scripted policy writes.

Parsing reads tool calls exactly as verl's in-tree ``ToolAgentLoop`` would: with
verl's own tool parser (``verl.experimental.agent_loop.tool_parser``,
``ToolParser.get_tool_parser(name, tokenizer)``), except for ``hermes`` (Qwen2.5's
``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``), which
``parse_hermes`` reads in line with the same result (tested against verl's
``HermesToolParser`` over random texts). Why: every verl parser decodes in the event
loop's default thread pool, and that thread waits for the GIL, up to the
interpreter's 5 ms switch interval while the loop serves other sessions; that wait
was most of the proxy's p99 latency (``bench/proxy_overhead.py``). Special tokens
(``<|im_end|>``...) are removed before parsing or decoding, like vLLM's OpenAI
server (``skip_special_tokens=True``); ``<tool_call>`` is an ordinary added token in
Qwen tokenizers and survives.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

# mini-swe-agent's submit signal: the first output line of a command (see
# minisweagent/environments/local.py) ends the run and submits the diff.
SUBMIT_COMMAND = "echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT"

# mini-swe-agent's litellm_textbased action format: LitellmTextbasedModelConfig.action_regex
# = r"```mswea_bash_command\s*\n(.*?)\n```" (minisweagent/models/litellm_textbased_model.py).
TEXT_ACTION_FENCE = "mswea_bash_command"


@dataclass
class ParsedTurn:
    """An assistant turn as returned to the agent.

    Attributes:
        content: text outside tool calls (None when it is empty and there are tool calls,
            as in the OpenAI API).
        tool_calls: OpenAI ``tool_calls`` entries, arguments as JSON strings.
    """

    content: str | None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def as_message(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        return message


def _new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class TurnParser:
    """Parses one session's sampled ids; one instance per session (parsers are cheap)."""

    def __init__(self, tokenizer: Any, parser_name: str = "hermes") -> None:
        # Imported here: it pulls in verl's whole agent-loop package (ray, ...), which the
        # text helpers below (used by the scripted backend) do not need.
        from verl.experimental.agent_loop.tool_parser import ToolParser

        self._tokenizer = tokenizer
        # Built for every name, so an unknown name fails here as it would in verl.
        self._parser = ToolParser.get_tool_parser(parser_name, tokenizer)
        self._inline_hermes = parser_name == "hermes"
        self._special_ids = frozenset(int(i) for i in tokenizer.all_special_ids)

    async def parse(self, token_ids: list[int], *, with_tools: bool) -> ParsedTurn:
        """Sampled ids -> ``ParsedTurn``.

        Without tools in the request the whole decoded text is the content (a
        text-based agent parses its own actions). With tools, verl's parser extracts
        the calls and the remaining text (stripped) is the content.
        """
        visible = [t for t in token_ids if t not in self._special_ids]
        if not with_tools:
            # Inline: decoding one turn takes microseconds, less than a thread hop.
            return ParsedTurn(content=self._decode(visible))
        if self._inline_hermes:
            content, calls = parse_hermes(self._tokenizer.decode(visible))
        else:
            content, verl_calls = await self._parser.extract_tool_calls(visible)
            calls = [(call.name, call.arguments, call.tool_call_id) for call in verl_calls]
        tool_calls = [
            {"id": call_id or _new_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}
            for name, arguments, call_id in calls
        ]
        text = (content or "").strip()
        return ParsedTurn(content=text or (None if tool_calls else ""), tool_calls=tool_calls)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)


_HERMES_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def parse_hermes(text: str) -> tuple[str, list[tuple[str, str, None]]]:
    """Hermes tool calls in decoded text -> (the text without the call blocks, calls).

    Each call is ``(name, arguments as JSON text, None)`` (hermes has no call ids). A
    block is ``<tool_call>`` ... ``</tool_call>`` (shortest match) holding a JSON
    object with a string ``name`` and any ``arguments``; a block that is not one is
    logged and dropped from both. Without both tags the text is returned whole. The
    same result as verl's ``HermesToolParser.extract_tool_calls`` for this text
    (``tests/proxy/test_tool_format.py``).
    """
    if "<tool_call>" not in text or "</tool_call>" not in text:
        return text, []
    calls: list[tuple[str, str, None]] = []
    for block in _HERMES_BLOCK.findall(text):
        try:
            payload = json.loads(block)
            name, arguments = payload["name"], payload["arguments"]
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            logger.warning("dropping a hermes tool call that does not parse: %s", exc)
            continue
        if not isinstance(name, str):
            logger.warning("dropping a hermes tool call whose name is not a string: %r", name)
            continue
        calls.append((name, json.dumps(arguments, ensure_ascii=False), None))
    return _HERMES_BLOCK.sub("", text), calls


def hermes_tool_call_text(name: str, arguments: dict[str, Any]) -> str:
    """The text a Qwen2.5/hermes model writes for one tool call (no end-of-turn token).

    ``json.dumps`` default separators equal the chat template's ``tojson``, so a
    re-render of the returned message reproduces these tokens.
    """
    payload = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"<tool_call>\n{payload}\n</tool_call>"


def text_action(command: str, thought: str) -> str:
    """A mini-swe-agent ``litellm_textbased`` response with exactly one action."""
    return f"THOUGHT: {thought}\n\n```{TEXT_ACTION_FENCE}\n{command}\n```"
