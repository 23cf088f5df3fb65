"""Normalising agent messages and deciding whether a history extends the recorded one.

``normalize_messages`` turns wire messages into the plain dicts the chat template and
verl's Continuous Token builder consume: ``role``, ``content`` (a string; list-form
text parts are concatenated, ``cache_control`` dropped), ``tool_calls``
(``[{"id", "type": "function", "function": {"name", "arguments": JSON str}}]``),
``tool_call_id``, ``name``. Everything else (``provider_specific_fields``,
``extra``, ``reasoning_content``...) is dropped: it is not part of the token stream.

``compare_history`` decides append-only-ness on *meaning*, not on bytes, because
the agent echoes our answers back through its own client. What is ignored, and why:
- tool-call ids and ``tool_call_id``: the proxy invents them; Qwen-style templates
  never render them, so they carry no tokens;
- leading/trailing whitespace and ``None`` vs ``""`` in ASSISTANT content only:
  clients (litellm, SDKs) may trim or null the text we returned; the training
  tokens of that turn are the sampled ids, not a re-render of this text;
- tool-call argument formatting: arguments are compared as parsed JSON.
User, system and tool messages must match exactly: their text becomes tokens.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from .errors import ProxyError
from .schemas import ChatMessage, Tool


def content_text(content: Any) -> str:
    """Flatten OpenAI content (``None``, str or list of parts) to text.

    Raises:
        ProxyError(400, code="unsupported_content"): a non-text part (image, audio...).
    """
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        part_type = part.type if hasattr(part, "type") else part.get("type")
        if part_type != "text":
            raise ProxyError(
                400, f"Only text content is supported, got a {part_type!r} part.", code="unsupported_content"
            )
        texts.append((part.text if hasattr(part, "text") else part.get("text")) or "")
    return "".join(texts)


def _arguments_text(arguments: str | dict[str, Any]) -> str:
    if isinstance(arguments, str):
        return arguments
    return json.dumps(arguments, ensure_ascii=False)


def normalize_message(message: ChatMessage) -> dict[str, Any]:
    """One wire message -> template dict (see module doc). ``developer`` becomes ``system``."""
    role = "system" if message.role == "developer" else message.role
    out: dict[str, Any] = {"role": role, "content": content_text(message.content)}
    if message.tool_calls:
        out["tool_calls"] = [
            {
                "id": call.id or f"call_{index}",
                "type": "function",
                "function": {"name": call.function.name, "arguments": _arguments_text(call.function.arguments)},
            }
            for index, call in enumerate(message.tool_calls)
        ]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.name is not None and role == "tool":
        out["name"] = message.name
    return out


def normalize_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    return [normalize_message(m) for m in messages]


def normalize_tools(tools: list[Tool] | None) -> list[dict[str, Any]] | None:
    """Tool schemas as plain dicts, exactly the keys the agent sent (what the chat template
    renders into the system prompt), or None for no tools."""
    if not tools:
        return None
    return [tool.model_dump(exclude_unset=True) for tool in tools]


def tools_key(tools: list[dict[str, Any]] | None) -> str:
    """A canonical string for comparing tool lists across requests of one session."""
    return json.dumps(tools or [], sort_keys=True, ensure_ascii=False)


@functools.lru_cache(maxsize=4096)
def _canonical_arguments(arguments: str) -> str:
    # Cached: every request echoes the whole history, so the same argument texts come
    # back on every turn of a session.
    try:
        return json.dumps(json.loads(arguments), sort_keys=True, ensure_ascii=False)
    except (TypeError, ValueError):
        return arguments.strip()


def message_key(message: dict[str, Any]) -> tuple[Any, ...]:
    """What must be equal for two messages to count as the same turn (see module doc)."""
    role = message.get("role")
    text = message.get("content") or ""
    if role == "assistant":
        text = text.strip()
    calls = tuple(
        (call["function"]["name"], _canonical_arguments(call["function"]["arguments"]))
        for call in message.get("tool_calls") or []
    )
    return (role, text, calls)


def first_difference(recorded: list[tuple[Any, ...]] | list[dict[str, Any]], incoming: list[dict[str, Any]]) -> int | None:
    """Index of the first recorded message that ``incoming`` does not reproduce, else None.

    ``recorded`` holds messages or their precomputed ``message_key``s (a session keeps
    the keys of its record, so each request only computes the keys of what it sent).
    None means ``incoming[:len(recorded)]`` matches ``recorded`` (the incoming history
    extends or equals the recorded one). A shorter ``incoming`` differs at
    ``len(incoming)``.
    """
    for index, old in enumerate(recorded):
        if index >= len(incoming):
            return index
        old_key = old if isinstance(old, tuple) else message_key(old)
        if old_key != message_key(incoming[index]):
            return index
    return None
