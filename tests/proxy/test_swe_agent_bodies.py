"""SWE-agent 1.x request bodies, as it sends them, through the real server.

SWE-agent is not installed here (it is not on PyPI); ``fixtures/swe_agent_bodies.json``
holds its first request body and tools as they appear on the wire (list-form content
with ``cache_control``, ``str_replace_editor``/``submit``/``bash`` tools, temperature
0.0, top_p 1.0). Later bodies are built the way SWE-agent builds them from its
history: ``_history_to_messages`` (tool messages carry ``tool_call_id``, assistant
messages ``content`` = thought + ``tool_calls``) after its history processors
(``CacheControlHistoryProcessor``: the last 2 user/tool messages in list form with
``cache_control``, a tool message's on the message itself; ``LastNObservations``:
older observations replaced by "Old environment output: (N lines omitted)").
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from .helpers import RecordingBackend, ReplayBackend, auth, check_exact_state, make_config, render

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "swe_agent_bodies.json").read_text())


def _cache_control(messages: list[dict[str, Any]], last_n: int = 2) -> list[dict[str, Any]]:
    """SWE-agent's CacheControlHistoryProcessor on a deep copy."""
    messages = copy.deepcopy(messages)
    marked = 0
    for message in reversed(messages):
        if message["role"] not in ("user", "tool") or marked >= last_n:
            continue
        marked += 1
        text = message["content"] if isinstance(message["content"], str) else message["content"][0]["text"]
        message["content"] = [{"type": "text", "text": text, "cache_control": {"type": "ephemeral"}}]
        if message["role"] == "tool":  # SWE-agent's "workaround for weird bug"
            message["content"][0].pop("cache_control")
            message["cache_control"] = {"type": "ephemeral"}
    return messages


def _last_n_observations(messages: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """SWE-agent's LastNObservations: elide all but the last ``n`` tool observations."""
    messages = copy.deepcopy(messages)
    observations = [i for i, m in enumerate(messages) if m["role"] == "tool"]
    for index in observations[:-n] if n else observations:
        lines = len(messages[index]["content"].splitlines())
        messages[index]["content"] = f"Old environment output: ({lines} lines omitted)"
    return messages


class SWEAgentLike:
    """Builds SWE-agent's request bodies from its history and the proxy's answers."""

    def __init__(self, last_n_observations: int | None = None) -> None:
        first = FIXTURE["first_request"]
        self.body_keys = {k: v for k, v in first.items() if k != "messages"}
        self.history: list[dict[str, Any]] = [
            {"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else m["content"][0]["text"]}
            for m in first["messages"]
        ]
        self.last_n = last_n_observations
        self.observations = iter(FIXTURE["observations"])

    def body(self) -> dict[str, Any]:
        messages = self.history
        if self.last_n is not None:
            messages = _last_n_observations(messages, self.last_n)
        return {**copy.deepcopy(self.body_keys), "messages": _cache_control(messages)}

    def observe(self, answer: dict[str, Any]) -> bool:
        """Record the answer (as SWE-agent stores it) and its tool's output; False after submit."""
        message = answer["choices"][0]["message"]
        calls = [
            {"function": {"arguments": c["function"]["arguments"], "name": c["function"]["name"]}, "id": c["id"],
             "type": "function"}
            for c in message["tool_calls"]
        ]
        self.history.append({"role": "assistant", "content": message["content"] or "", "tool_calls": calls})
        if calls[0]["function"]["name"] == "submit":
            return False
        self.history.append({"role": "tool", "content": next(self.observations), "tool_call_id": calls[0]["id"]})
        return True


async def _run(proxy, tokenizer, token_builder, agent: SWEAgentLike, **config) -> tuple[Any, RecordingBackend, list]:
    backend = RecordingBackend(ReplayBackend(tokenizer, FIXTURE["policy_turns"]))
    handle = proxy.open_session(
        make_config(backend, tokenizer, token_builder, sampling_params={"temperature": 0.7, "top_p": 0.95}, **config)
    )
    responses = []
    async with httpx.AsyncClient() as client:
        while True:
            response = await client.post(f"{handle.base_url}/chat/completions", json=agent.body(),
                                         headers=auth(handle.api_key))
            responses.append(response)
            if response.status_code != 200 or not agent.observe(response.json()):
                break
    return proxy.close_session(handle.session_id), backend, responses


async def test_swe_agent_bodies_are_accepted_and_token_exact(proxy, tokenizer, token_builder):
    agent = SWEAgentLike()
    result, backend, responses = await _run(proxy, tokenizer, token_builder, agent)
    assert [r.status_code for r in responses] == [200] * len(FIXTURE["policy_turns"])
    names = [r.json()["choices"][0]["message"]["tool_calls"][0]["function"]["name"] for r in responses]
    assert names == ["str_replace_editor", "bash", "str_replace_editor", "str_replace_editor", "bash", "submit"]
    edit = json.loads(responses[3].json()["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"])
    assert edit == {"command": "str_replace", "path": "/testbed/src/calc.py", "old_str": "return a - b",
                    "new_str": "return a + b"}
    assert responses[3].json()["choices"][0]["message"]["content"] == "The bug is the minus sign."
    # cache_control moving from message to message carries no tokens: one append-only segment.
    assert len(result.segments) == 1 and result.error is None
    check_exact_state(result, backend.calls)
    tools = FIXTURE["first_request"]["tools"]
    newline = tokenizer.encode("\n", add_special_tokens=False)
    assert result.prompt_ids + result.response_ids + newline == render(tokenizer, result.messages, tools)
    # SWE-agent's temperature 0.0 would kill exploration: the trainer's values are used, the agent's recorded.
    assert all(c.sampling_params["temperature"] == 0.7 and c.sampling_params["top_p"] == 0.95 for c in backend.calls)
    assert all(t.agent_params["temperature"] == 0.0 and t.agent_params["top_p"] == 1.0 for t in result.turns)


async def test_swe_agent_history_processor_starts_new_segments(proxy, tokenizer, token_builder):
    agent = SWEAgentLike(last_n_observations=2)
    result, backend, responses = await _run(proxy, tokenizer, token_builder, agent)
    assert all(r.status_code == 200 for r in responses) and len(responses) == len(FIXTURE["policy_turns"])
    # Observations 1, 2, 3 get elided when observations 3, 4, 5 arrive: three rewrites.
    assert [s.num_turns for s in result.segments] == [3, 1, 1, 1]
    assert [t.segment for t in result.turns] == [0, 0, 0, 1, 2, 3]
    start = 0
    for segment in result.segments:
        calls = backend.calls[start : start + segment.num_turns]
        start += segment.num_turns
        check_exact_state(segment, calls)
        # A new segment's prompt is the chat template's render of the rewritten history.
        initial = segment.messages[: len(segment.messages) - 1 - 2 * (segment.num_turns - 1)]
        assert initial[-1]["role"] in ("user", "tool")
        assert segment.prompt_ids == render(tokenizer, initial, FIXTURE["first_request"]["tools"], True)
    assert "Old environment output" in tokenizer.decode(result.segments[-1].prompt_ids)
    assert result.prompt_ids == result.segments[-1].prompt_ids and result.num_turns == 6


async def test_swe_agent_history_processor_refused_in_error_mode(proxy, tokenizer, token_builder):
    agent = SWEAgentLike(last_n_observations=2)
    result, backend, responses = await _run(proxy, tokenizer, token_builder, agent, on_history_rewrite="error")
    assert [r.status_code for r in responses] == [200, 200, 200, 400]
    assert responses[-1].json()["error"]["code"] == "history_mismatch"
    assert result.error == "history_mismatch" and result.num_turns == 3 and len(result.segments) == 1
    check_exact_state(result, backend.calls)


@pytest.mark.parametrize("index", [1, 3])
async def test_swe_agent_edited_assistant_turn_is_refused(proxy, tokenizer, token_builder, index):
    """An assistant message the session never produced: 400, nothing recorded, then it goes on."""
    agent = SWEAgentLike()
    backend = RecordingBackend(ReplayBackend(tokenizer, FIXTURE["policy_turns"]))
    handle = proxy.open_session(make_config(backend, tokenizer, token_builder))
    async with httpx.AsyncClient() as client:
        url = f"{handle.base_url}/chat/completions"
        for _ in range(2):
            agent.observe((await client.post(url, json=agent.body(), headers=auth(handle.api_key))).json())
        forged = agent.body()
        forged["messages"][2 if index == 1 else 4]["tool_calls"][0]["function"]["arguments"] = '{"command": "rm -rf /"}'
        if index == 3:  # also rewrite an observation, so it would otherwise be a new segment
            forged["messages"][3]["content"] = "elided"
        refused = await client.post(url, json=forged, headers=auth(handle.api_key))
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "unknown_assistant_message"
        assert len(backend.calls) == 2
        ok = await client.post(url, json=agent.body(), headers=auth(handle.api_key))
        assert ok.status_code == 200
    result = proxy.close_session(handle.session_id)
    assert len(result.segments) == 1 and result.num_turns == 3
    check_exact_state(result, backend.calls)
