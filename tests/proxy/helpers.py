"""Shared test helpers (no fakes: RecordingBackend only observes a real backend)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from model_proxy.backends.base import GenerationOutput
from model_proxy.session import SessionConfig

# mini-swe-agent's own bash tool, as its tool-calling model sends it.
from minisweagent.models.utils.actions_toolcall import BASH_TOOL  # noqa: E402,F401 (re-exported to tests)


@dataclass
class Call:
    request_id: str
    prompt_ids: list[int]
    sampling_params: dict[str, Any]
    output: GenerationOutput


@dataclass
class RecordingBackend:
    """Delegates to a real backend and records every call (optionally delayed, to interleave)."""

    inner: Any
    delay_s: float = 0.0
    calls: list[Call] = field(default_factory=list)

    async def generate(self, request_id: str, prompt_ids: list[int], sampling_params: dict[str, Any]):
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        output = await self.inner.generate(request_id, prompt_ids, sampling_params)
        self.calls.append(Call(request_id, list(prompt_ids), dict(sampling_params), output))
        return output


def make_config(backend, tokenizer, token_builder, **overrides: Any) -> SessionConfig:
    values: dict[str, Any] = dict(
        backend=backend,
        tokenizer=tokenizer,
        token_builder=token_builder,
        sampling_params={"temperature": 1.0, "top_p": 1.0, "top_k": -1, "logprobs": True},
        max_response_tokens=4096,
    )
    values.update(overrides)
    return SessionConfig(**values)


def render(tokenizer, messages: list[dict[str, Any]], tools=None, add_generation_prompt: bool = False) -> list[int]:
    """A full chat-template render (the reference the incremental token state is checked against)."""
    out = tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=True, add_generation_prompt=add_generation_prompt
    )
    return list(out if isinstance(out, list) else out["input_ids"])


def expected_mask(calls: list[Call], prompt_len: int, total_len: int) -> list[int]:
    """Mask 1 exactly where a backend output was placed, given each call's prompt."""
    mask = [0] * (total_len - prompt_len)
    for call in calls:
        start = len(call.prompt_ids) - prompt_len
        for offset in range(len(call.output.token_ids)):
            mask[start + offset] = 1
    return mask


def check_exact_state(result, calls: list[Call]) -> None:
    """The invariants every session must satisfy against what its backend saw."""
    last = calls[-1]
    assert result.prompt_ids == calls[0].prompt_ids
    assert result.prompt_ids + result.response_ids == last.prompt_ids + last.output.token_ids
    assert len(result.response_ids) == len(result.response_mask) == len(result.response_logprobs)
    prompt_len = len(result.prompt_ids)
    assert result.response_mask == expected_mask(calls, prompt_len, prompt_len + len(result.response_ids))
    for call in calls:
        # Each prompt extends the previous prompt + output (append-only stream).
        start = len(call.prompt_ids) - prompt_len
        end = start + len(call.output.token_ids)
        assert (result.prompt_ids + result.response_ids)[: len(call.prompt_ids)] == call.prompt_ids
        assert result.response_ids[start:end] == call.output.token_ids
        assert result.response_logprobs[start:end] == call.output.logprobs
    masked_lp = [lp for lp, m in zip(result.response_logprobs, result.response_mask) if m == 0]
    assert all(lp == 0.0 for lp in masked_lp)
    assert result.num_turns == len(calls)


@dataclass
class ReplayBackend:
    """Replays fixed assistant texts (one per call, the last one forever), each + eos.

    Real tokenizer; logprobs are distinct negative numbers so alignment errors show.
    """

    tokenizer: Any
    texts: list[str]
    calls: int = 0

    async def generate(self, request_id: str, prompt_ids: list[int], sampling_params: dict[str, Any]):
        text = self.texts[min(self.calls, len(self.texts) - 1)]
        self.calls += 1
        ids = list(self.tokenizer.encode(text, add_special_tokens=False)) + [int(self.tokenizer.eos_token_id)]
        stop = "stop"
        limit = sampling_params.get("max_tokens")
        if limit is not None and len(ids) > int(limit):
            ids, stop = ids[: int(limit)], "length"
        return GenerationOutput(ids, [-0.01 * (i + 1) for i in range(len(ids))], stop)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def replay_conversation(server, tokenizer, token_builder, texts: list[str], tool_output, turns: int):
    """A session on ``server`` whose model replays ``texts``, driven over HTTP for ``turns`` turns:
    each tool call answered with ``tool_output(turn)``, a turn without one followed by a user
    message. Returns the closed session's ``SessionResult``."""
    import httpx

    handle = server.open_session(make_config(ReplayBackend(tokenizer, texts), tokenizer, token_builder,
                                             max_response_tokens=10_000))
    messages: list[dict[str, Any]] = [{"role": "system", "content": "sys"}, {"role": "user", "content": "fix it"}]
    async with httpx.AsyncClient() as client:
        for turn in range(turns):
            response = await client.post(f"{handle.base_url}/chat/completions", headers=auth(handle.api_key),
                                         json={"model": "m", "messages": messages, "tools": [BASH_TOOL]})
            assert response.status_code == 200, response.text
            message = response.json()["choices"][0]["message"]
            messages = messages + [message]
            for call in message.get("tool_calls") or []:
                messages.append({"role": "tool", "tool_call_id": call["id"], "content": tool_output(turn)})
            if not message.get("tool_calls"):
                messages.append({"role": "user", "content": "anything else?"})
    return server.close_session(handle.session_id)
