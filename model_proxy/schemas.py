"""Pydantic models of the OpenAI chat-completions wire format the proxy speaks.

Requests are parsed leniently (``extra="allow"``): agents send keys the proxy does
not use, e.g. mini-swe-agent echoes assistant messages with
``provider_specific_fields``, SWE-agent sends list-form content with
``cache_control``; those are accepted and dropped by ``messages.normalize``.
Responses follow the OpenAI ``chat.completion`` object; streamed answers are
``chat.completion.chunk`` objects built from it (``server._completion_chunks``).
Source: OpenAI API reference, "Create chat completion".
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class ContentPart(_Lenient):
    """One element of list-form content: ``{"type": "text", "text": ..., "cache_control": ...}``."""

    type: str
    text: str | None = None


class FunctionCall(_Lenient):
    name: str
    # OpenAI sends a JSON string; some clients send the object itself.
    arguments: str | dict[str, Any] = "{}"


class ToolCall(_Lenient):
    id: str | None = None
    type: str = "function"
    function: FunctionCall


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class ToolFunction(_Lenient):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Lenient):
    type: str = "function"
    function: ToolFunction


class ChatCompletionRequest(_Lenient):
    """The request body of ``POST /v1/chat/completions`` (fields the proxy reads).

    Sampling keys sent by the agent (``temperature``, ``top_p``) are recorded but the
    trainer's sampling parameters win; ``max_tokens`` / ``max_completion_tokens``
    can only lower the per-turn limit. ``stop`` is recorded, not applied (the
    trainer's sampling parameters define the policy). Options that would change the
    shape of the answer and that the proxy cannot honour are refused with a 400 rather
    than dropped (``server.refuse_unsupported_options``): ``n`` other than 1,
    ``logprobs``/``top_logprobs`` (sampled-token logprobs are recorded for training,
    not returned), ``logit_bias``, a ``response_format`` other than text, a
    ``tool_choice`` other than ``auto``, and the legacy ``functions``/``function_call``.
    """

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Any = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    functions: list[Any] | None = None
    function_call: Any = None


class ResponseFunction(BaseModel):
    name: str
    arguments: str  # JSON text, as in the OpenAI API


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunction


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ResponseToolCall] | None = None


class Choice(BaseModel):
    index: int = 0
    message: ResponseMessage
    finish_reason: Literal["stop", "length", "tool_calls"]
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
