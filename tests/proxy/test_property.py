"""Property test (hypothesis): over random multi-turn conversations through the real server,
every segment's ``prompt_ids + response_ids`` is exactly what the backend received and
returned, mask 1 covers exactly the sampled tokens, and logprobs line up with them.

Conversations vary: tools or plain text, tool-call or free-text turns (random token ids
from the ordinary vocabulary), one to three context messages per turn, list-form
content, streamed or plain requests, a history rewrite starting a new segment, and a
last turn cut at ``max_tokens``. Each example runs its own server (``asyncio.run``).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model_proxy.backends.base import GenerationOutput
from model_proxy.server import ModelProxyServer
from model_proxy.tool_format import hermes_tool_call_text

from .helpers import BASH_TOOL, Call, auth, check_exact_state, make_config

TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=40)


@st.composite
def turn_plans(draw) -> dict[str, Any]:
    n_special = 4  # ids >= vocab_size are added tokens (<tool_call>...), < 3 are specials
    kind = draw(st.sampled_from(["tool", "text"]))
    return {
        "kind": kind,
        "command": draw(TEXT),
        "ids": draw(st.lists(st.integers(3, 1999), min_size=1, max_size=30)),
        "logprobs": draw(st.lists(st.floats(-20.0, -1e-3), min_size=30 + n_special, max_size=30 + n_special)),
        "context": draw(st.lists(TEXT, min_size=1, max_size=3)),
        "list_content": draw(st.booleans()),
        "stream": draw(st.booleans()),
    }


@st.composite
def conversations(draw) -> dict[str, Any]:
    turns = draw(st.lists(turn_plans(), min_size=1, max_size=6))
    return {
        "tools": draw(st.booleans()),
        "system": draw(TEXT),
        "task": draw(TEXT),
        "turns": turns,
        "rewrite_at": draw(st.none() | st.integers(1, max(1, len(turns) - 1))),
        "cut_last": draw(st.booleans()),
    }


class PlannedBackend:
    """Returns the planned ids (+ eos unless cut) and logprobs; records every call."""

    def __init__(self, tokenizer, plan: dict[str, Any]) -> None:
        self.tokenizer, self.plan, self.calls = tokenizer, plan, []

    async def generate(self, request_id: str, prompt_ids: list[int], sampling_params: dict[str, Any]):
        turn = self.plan["turns"][len(self.calls)]
        last = len(self.calls) == len(self.plan["turns"]) - 1
        if turn["kind"] == "tool" and self.plan["tools"]:
            ids = self.tokenizer.encode(hermes_tool_call_text("bash", {"command": turn["command"]}),
                                        add_special_tokens=False)
        else:
            ids = list(turn["ids"])
        ids = list(ids) + [self.tokenizer.eos_token_id]
        stop = "stop"
        if last and self.plan["cut_last"]:
            ids, stop = ids[: max(1, len(ids) - 1)], "length"
        logprobs = [turn["logprobs"][i % len(turn["logprobs"])] for i in range(len(ids))]
        output = GenerationOutput(ids, logprobs, stop)
        self.calls.append(Call(request_id, list(prompt_ids), dict(sampling_params), output))
        return output


def _content(text: str, as_list: bool) -> Any:
    return [{"type": "text", "text": text, "cache_control": {"type": "ephemeral"}}] if as_list else text


async def _drive(tokenizer, token_builder, plan: dict[str, Any]):
    server = await ModelProxyServer.start()
    try:
        backend = PlannedBackend(tokenizer, plan)
        handle = server.open_session(make_config(backend, tokenizer, token_builder, max_response_tokens=100_000))
        messages: list[dict[str, Any]] = [{"role": "system", "content": plan["system"]},
                                          {"role": "user", "content": plan["task"]}]
        async with httpx.AsyncClient() as client:
            for index, turn in enumerate(plan["turns"]):
                if index == plan["rewrite_at"]:
                    messages[1] = {"role": "user", "content": "(rewritten) " + plan["task"]}
                body: dict[str, Any] = {"model": "m", "messages": messages, "temperature": 0.0}
                if plan["tools"]:
                    body["tools"] = [BASH_TOOL]
                if turn["stream"]:
                    body["stream"] = True
                response = await client.post(f"{handle.base_url}/chat/completions", json=body,
                                             headers=auth(handle.api_key))
                assert response.status_code == 200, response.text
                message = _assembled(response) if turn["stream"] else response.json()["choices"][0]["message"]
                messages = messages + [message]
                if message.get("tool_calls"):
                    messages += [{"role": "tool", "tool_call_id": c["id"], "content": _content(t, turn["list_content"])}
                                 for c, t in zip(message["tool_calls"], turn["context"])]
                else:
                    messages += [{"role": "user", "content": _content(t, turn["list_content"])} for t in turn["context"]]
        return server.close_session(handle.session_id), backend.calls
    finally:
        await server.stop()


def _assembled(response: httpx.Response) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": ""}
    for line in response.text.splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        for choice in json.loads(line[6:])["choices"]:
            delta = choice["delta"]
            message["content"] += delta.get("content") or ""
            for call in delta.get("tool_calls") or []:
                message.setdefault("tool_calls", []).append(
                    {"id": call["id"], "type": "function", "function": call["function"]})
    return message


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(plan=conversations())
def test_random_conversations_are_token_exact(tokenizer, token_builder, plan):
    result, calls = asyncio.run(_drive(tokenizer, token_builder, plan))
    assert result.num_turns == len(calls) == len(plan["turns"]) and result.error is None
    rewrote = plan["rewrite_at"] is not None and plan["rewrite_at"] < len(plan["turns"])
    assert len(result.segments) == (2 if rewrote else 1)
    start = 0
    for number, segment in enumerate(result.segments):
        segment_calls = calls[start : start + segment.num_turns]
        assert [t.segment for t in result.turns[start : start + segment.num_turns]] == [number] * segment.num_turns
        start += segment.num_turns
        check_exact_state(segment, segment_calls)
        # Mask 1 exactly on sampled tokens: their count equals what the backend returned.
        assert sum(segment.response_mask) == sum(len(c.output.token_ids) for c in segment_calls)
        for call in segment_calls:  # every prompt of a segment extends the segment's first prompt
            assert call.prompt_ids[: len(segment.prompt_ids)] == segment.prompt_ids
    last = result.segments[-1]
    assert (result.prompt_ids, result.response_ids, result.response_mask) == (
        last.prompt_ids, last.response_ids, last.response_mask)
    if plan["cut_last"]:
        assert result.turns[-1].finish_reason == "length"


@settings(max_examples=200, deadline=None, database=None)
@given(
    mask=st.lists(st.integers(0, 1), max_size=12),
    removed=st.integers(0, 14),
    inserted=st.lists(st.integers(0, 99), max_size=3),
    kind=st.sampled_from(["assistant", "context"]),
    appended=st.integers(0, 5),
)
def test_metadata_alignment_on_arrays_equals_verls(token_builder, mask, removed, inserted, kind, appended):
    """The session aligns mask/logprobs on the tail only (``session._aligned``); the result
    must equal verl's ``align_response_metadata`` on the whole lists, trimmed prefixes included."""
    from array import array

    from verl.utils.tokenizer.continuous_token import MergeResult

    from model_proxy.session import _aligned

    logprobs = [-0.5 * (i + 1) for i in range(len(mask))]
    result = MergeResult(token_ids=[], appended_token_count=appended, kind=kind,
                         inserted_token_ids=inserted, removed_prefix_token_count=removed)
    assistant = [-0.25] * appended if kind == "assistant" else None
    want = token_builder.align_response_metadata(result, mask, logprobs, assistant_logprobs=assistant)
    got = _aligned(token_builder, result, array("b", mask), array("d", logprobs), assistant_logprobs=assistant)
    assert (list(got[0]), list(got[1])) == (want[0], want[1])
