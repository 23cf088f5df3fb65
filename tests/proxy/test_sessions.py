"""Token state of sessions through the real server, openai SDK and litellm."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from model_proxy.backends.base import GenerationOutput
from model_proxy.backends.scripted import ScriptedPolicyBackend

from .helpers import BASH_TOOL, RecordingBackend, check_exact_state, make_config, render


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _client(handle) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=handle.base_url, api_key=handle.api_key, max_retries=0)


def _tool_results(message, prefix: str = "") -> list[dict]:
    return [
        {"role": "tool", "tool_call_id": call.id, "content": f"{prefix}ran {_command(call.function.arguments)}"}
        for call in message.tool_calls or []
    ]


def _command(arguments: str) -> str:
    return json.loads(arguments)["command"]


async def _run_tool_conversation(handle, n_turns: int, tag: str = "") -> list[dict]:
    """Drive a session like a tool-calling agent: echo each answer, append tool results."""
    client = _client(handle)
    messages: list[dict] = [
        {"role": "system", "content": f"You are an agent {tag}"},
        {
            "role": "user",
            "content": [{"type": "text", "text": f"Fix the bug {tag}", "cache_control": {"type": "ephemeral"}}],
        },
    ]
    for _ in range(n_turns):
        response = await client.chat.completions.create(
            model="swe-policy", messages=messages, tools=[BASH_TOOL], temperature=0.0
        )
        message = response.choices[0].message
        echoed = message.model_dump()
        echoed["provider_specific_fields"] = {"refusal": None}  # as mini-swe-agent/litellm send it
        messages.append(echoed)
        messages.extend(_tool_results(message, prefix=tag))
    await client.close()
    return messages


async def test_scripted_tool_conversation_is_token_exact(proxy, tokenizer, token_builder):
    commands = ["ls -la", "grep -rn 'def add' src", "sed -i 's/-/+/' src/calc.py"]
    backend = RecordingBackend(ScriptedPolicyBackend(tokenizer, commands))
    handle = proxy.open_session(make_config(backend, tokenizer, token_builder, sampling_params={"temperature": 0.7}))
    messages = await _run_tool_conversation(handle, n_turns=4)
    result = proxy.close_session(handle.session_id)

    check_exact_state(result, backend.calls)
    assert result.stop is None and result.error is None and result.num_turns == 4
    # The scripted turns are canonical chat-format text, so the incremental state equals a
    # full re-render of the recorded conversation (+ the "\n" the template puts after <|im_end|>).
    newline = tokenizer.encode("\n", add_special_tokens=False)
    assert result.prompt_ids + result.response_ids + newline == render(tokenizer, result.messages, [BASH_TOOL])
    # Recorded messages: normalised (list content flattened, extra keys dropped).
    assert result.messages[1] == {"role": "user", "content": "Fix the bug "}
    assert [m["role"] for m in result.messages] == ["system", "user"] + ["assistant", "tool"] * 3 + ["assistant"]
    sent = [_command(m["tool_calls"][0]["function"]["arguments"]) for m in messages if m["role"] == "assistant"]
    assert sent == commands + ["echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT"]
    # Trainer sampling params win over the agent's temperature; the agent's is recorded.
    assert all(call.sampling_params["temperature"] == 0.7 for call in backend.calls)
    assert result.turns[0].agent_params["temperature"] == 0.0
    assert [t.finish_reason for t in result.turns] == ["tool_calls"] * 4
    assert [t.completion_tokens for t in result.turns] == [len(c.output.token_ids) for c in backend.calls]
    assert result.turns[0].context_tokens == 0 and all(t.context_tokens > 0 for t in result.turns[1:])
    assert result.generation_s > 0 and result.tool_s > 0
    # Per-turn max_tokens: the remaining response budget.
    for call in backend.calls:
        assert call.sampling_params["max_tokens"] == 4096 - (len(call.prompt_ids) - len(result.prompt_ids))


async def test_hf_local_multi_turn_through_litellm(proxy, tokenizer, token_builder, hf_backend):
    import litellm

    backend = RecordingBackend(hf_backend)
    handle = proxy.open_session(
        make_config(
            backend, tokenizer, token_builder, sampling_params={"temperature": 1.0, "top_p": 1.0, "top_k": -1, "n": 1},
            # The backend seeds each call from the request id: a fixed one makes the random
            # model's turns (and whether each ends before max_tokens) the same on every run.
            request_id="litellm-multi-turn",
        )
    )
    messages = [{"role": "system", "content": "You are a helpful assistant that can interact with a computer."},
                {"role": "user", "content": "Please solve this issue: the tests fail."}]
    finish_reasons = []
    for _ in range(3):
        response = await asyncio.to_thread(
            litellm.completion,
            model="openai/swe-policy",
            api_base=handle.base_url,
            api_key=handle.api_key,
            messages=messages,
            tools=[BASH_TOOL],
            max_tokens=200,
            num_retries=0,
        )
        finish_reasons.append(response.choices[0].finish_reason)
        messages.append(response.choices[0].message.model_dump())  # includes provider_specific_fields
        # What mini-swe-agent appends when a response has no tool call (a FormatError).
        messages.append({"role": "user", "content": "No tool calls found in the response. Use the bash tool."})
        if finish_reasons[-1] == "length":
            break
    result = proxy.close_session(handle.session_id)
    check_exact_state(result, backend.calls)
    assert "n" not in backend.calls[0].sampling_params  # OpenAI-only keys never reach a backend
    assert all(call.sampling_params["max_tokens"] <= 200 for call in backend.calls)
    assert result.num_turns == len(finish_reasons) == 3, finish_reasons
    assert any(lp < 0.0 for lp in result.response_logprobs)
    # Every sampled turn ended with <|im_end|>, and the builder put "\n" (mask 0) after it.
    newline = tokenizer.encode("\n", add_special_tokens=False)[0]
    for call in backend.calls[:-1]:
        assert call.output.token_ids[-1] == tokenizer.eos_token_id
        end = len(call.prompt_ids) + len(call.output.token_ids)
        assert (result.prompt_ids + result.response_ids)[end] == newline
        assert result.response_mask[end - len(result.prompt_ids)] == 0


async def test_rewritten_history_is_refused_in_error_mode(proxy, tokenizer, token_builder):
    backend = RecordingBackend(ScriptedPolicyBackend(tokenizer, ["ls", "pwd", "whoami"]))
    handle = proxy.open_session(make_config(backend, tokenizer, token_builder, on_history_rewrite="error"))
    client = _client(handle)
    messages = [{"role": "user", "content": "task"}]
    first = (await client.chat.completions.create(model="m", messages=messages, tools=[BASH_TOOL])).choices[0].message

    # Differences that carry no tokens are tolerated: other tool-call ids, "" vs None content.
    echoed = first.model_dump()
    echoed["tool_calls"][0]["id"] = "call_other"
    echoed["content"] = ""
    args = json.loads(echoed["tool_calls"][0]["function"]["arguments"])
    echoed["tool_calls"][0]["function"]["arguments"] = json.dumps(args, indent=2)  # same JSON, other layout
    messages += [echoed, {"role": "tool", "tool_call_id": "call_other", "content": "a b"}]
    second = (await client.chat.completions.create(model="m", messages=messages, tools=[BASH_TOOL])).choices[0].message

    # Rewriting an earlier observation (a history processor) is a mismatch.
    rewritten = [dict(m) for m in messages]
    rewritten += [second.model_dump(), {"role": "tool", "tool_call_id": "x", "content": "c"}]
    rewritten[2] = {**rewritten[2], "content": "(output elided)"}
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model="m", messages=rewritten, tools=[BASH_TOOL])
    assert info.value.code == "history_mismatch"
    # So is a changed command in a recorded assistant turn, or a changed tool list.
    changed = [dict(m) for m in rewritten]
    changed[2] = messages[2]
    changed[1] = json.loads(json.dumps(changed[1]))
    changed[1]["tool_calls"][0]["function"]["arguments"] = json.dumps({"command": "rm -rf /"})
    with pytest.raises(openai.BadRequestError, match="history"):
        await client.chat.completions.create(model="m", messages=changed, tools=[BASH_TOOL])
    with pytest.raises(openai.BadRequestError, match="tool definitions"):
        await client.chat.completions.create(model="m", messages=messages, tools=[])
    state_before = proxy._sessions[handle.session_id].result()
    assert state_before.error == "history_mismatch" and state_before.num_turns == 2
    # The token state was not touched by the refused requests.
    check_exact_state(state_before, backend.calls)
    await client.close()


async def test_retried_request_is_answered_again_without_sampling(proxy, tokenizer, token_builder):
    backend = RecordingBackend(ScriptedPolicyBackend(tokenizer, ["ls"]))
    handle = proxy.open_session(make_config(backend, tokenizer, token_builder))
    client = _client(handle)
    messages = [{"role": "user", "content": "task"}]
    one = await client.chat.completions.create(model="m", messages=messages, tools=[BASH_TOOL])
    two = await client.chat.completions.create(model="m", messages=messages, tools=[BASH_TOOL])
    assert one.id == two.id and len(backend.calls) == 1
    await client.close()


async def test_response_budget_exhaustion_is_a_context_length_error(proxy, tokenizer, token_builder):
    import litellm

    backend = RecordingBackend(ScriptedPolicyBackend(tokenizer, ["ls"]))
    turn_len = len(tokenizer.encode(backend.inner.turn_text(0))) + 1
    # Room for the first turn, not for the tool result after it.
    handle = proxy.open_session(make_config(backend, tokenizer, token_builder, max_response_tokens=turn_len + 5))
    messages = [{"role": "user", "content": "task"}]
    kwargs = dict(
        model="openai/swe-policy", api_base=handle.base_url, api_key=handle.api_key, tools=[BASH_TOOL], num_retries=0
    )
    first = await asyncio.to_thread(litellm.completion, messages=messages, **kwargs)
    assert first.choices[0].finish_reason == "tool_calls"
    message = first.choices[0].message
    messages += [message.model_dump(), {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "x" * 200}]
    with pytest.raises(litellm.ContextWindowExceededError):
        await asyncio.to_thread(litellm.completion, messages=messages, **kwargs)
    assert handle.finished.is_set()
    # Once stopped, every further request gets the same error.
    with pytest.raises(openai.BadRequestError) as info:
        await _client(handle).chat.completions.create(model="m", messages=messages, tools=[BASH_TOOL])
    assert info.value.code == "context_length_exceeded" and "context length" in str(info.value)
    result = proxy.close_session(handle.session_id)
    assert result.stop == "context_limit" and result.num_turns == 1
    # The state ends with the last sampled turn: the refused context was not appended.
    check_exact_state(result, backend.calls)
    assert result.response_ids[-1] == tokenizer.eos_token_id


async def test_truncated_turn_is_never_followed_by_context(proxy, tokenizer, token_builder):
    backend = RecordingBackend(ScriptedPolicyBackend(tokenizer, ["ls"], mode="text"))
    handle = proxy.open_session(make_config(backend, tokenizer, token_builder, max_response_tokens=1000))
    client = _client(handle)
    messages = [{"role": "user", "content": "task"}]
    first = await client.chat.completions.create(model="m", messages=messages, max_tokens=6)
    assert first.choices[0].finish_reason == "length"
    assert handle.finished.is_set()  # the episode ends with the truncated turn, before any next request
    assert backend.calls[0].sampling_params["max_tokens"] == 6
    assert len(backend.calls[0].output.token_ids) == 6
    messages += [first.choices[0].message.model_dump(), {"role": "user", "content": "format error"}]
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model="m", messages=messages)
    assert info.value.code == "context_length_exceeded"
    result = proxy.close_session(handle.session_id)
    assert result.stop == "context_limit" and result.response_mask == [1] * 6
    check_exact_state(result, backend.calls)
    await client.close()


async def test_many_concurrent_sessions_keep_their_own_state(proxy, tokenizer, token_builder, hf_backend):
    n_scripted, n_hf = 32, 4
    scripts = [[f"echo session {i} step {k}" for k in range(i % 3 + 1)] for i in range(n_scripted)]
    backends = [
        RecordingBackend(ScriptedPolicyBackend(tokenizer, script), delay_s=0.001 * (i % 5))
        for i, script in enumerate(scripts)
    ] + [RecordingBackend(hf_backend) for _ in range(n_hf)]
    handles = [proxy.open_session(make_config(b, tokenizer, token_builder, max_response_tokens=1500)) for b in backends]
    assert len({h.session_id for h in handles}) == len(handles)
    conversations = await asyncio.gather(
        *[_run_tool_conversation(h, n_turns=3, tag=f"#{i}") for i, h in enumerate(handles[:n_scripted])],
        *[_run_text_user_turns(h, n_turns=2, tag=f"#{i}") for i, h in enumerate(handles[n_scripted:])],
    )
    newline = tokenizer.encode("\n", add_special_tokens=False)
    for i, (handle, backend, messages) in enumerate(zip(handles, backends, conversations)):
        result = proxy.close_session(handle.session_id)
        check_exact_state(result, backend.calls)
        assert result.error is None and result.stop is None
        if i < n_scripted:
            assert result.prompt_ids + result.response_ids + newline == render(tokenizer, result.messages, [BASH_TOOL])
            assert f"echo session {i} step 0" in tokenizer.decode(result.response_ids)
            assert all(call.request_id == backend.calls[0].request_id for call in backend.calls)
    assert proxy.num_sessions == 0


async def _run_text_user_turns(handle, n_turns: int, tag: str) -> list[dict]:
    client = _client(handle)
    messages: list[dict] = [{"role": "user", "content": f"hello {tag}"}]
    for _ in range(n_turns):
        response = await client.chat.completions.create(model="m", messages=messages, max_tokens=300)
        messages += [response.choices[0].message.model_dump(), {"role": "user", "content": "continue"}]
    await client.close()
    return messages


async def test_phase_hook_and_tool_time(proxy, tokenizer, token_builder):
    phases: list[str] = []
    handle = proxy.open_session(
        make_config(ScriptedPolicyBackend(tokenizer, ["ls"]), tokenizer, token_builder, on_phase=phases.append)
    )
    client = _client(handle)
    messages = [{"role": "user", "content": "task"}]
    first = (await client.chat.completions.create(model="m", messages=messages, tools=[BASH_TOOL])).choices[0].message
    await asyncio.sleep(0.2)  # "running the tool"
    messages += [first.model_dump(), *_tool_results(first)]
    await client.chat.completions.create(model="m", messages=messages, tools=[BASH_TOOL])
    result = proxy.close_session(handle.session_id)
    assert phases == ["inference", "tool", "inference", "tool"]
    assert 0.2 <= result.tool_s < 2.0
    await client.close()


class _GatedBackend:
    """Waits for an event before answering (a slow real generation)."""

    def __init__(self, inner, gate: asyncio.Event):
        self.inner, self.gate = inner, gate

    async def generate(self, request_id, prompt_ids, sampling_params):
        await self.gate.wait()
        return await self.inner.generate(request_id, prompt_ids, sampling_params)


async def test_close_during_generation_discards_the_turn(proxy, tokenizer, token_builder):
    gate = asyncio.Event()
    backend = _GatedBackend(ScriptedPolicyBackend(tokenizer, []), gate)
    handle = proxy.open_session(make_config(backend, tokenizer, token_builder))
    client = _client(handle)
    request = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "t"}])
    pending = asyncio.create_task(request)
    await asyncio.sleep(0.2)
    result = proxy.close_session(handle.session_id)
    gate.set()
    with pytest.raises(openai.NotFoundError):
        await pending
    assert result.num_turns == 0 and result.prompt_ids == [] and result.response_ids == []
    await client.close()


class _FailingBackend:
    def __init__(self, output: GenerationOutput | None):
        self.output = output

    async def generate(self, request_id, prompt_ids, sampling_params):
        if self.output is None:
            raise RuntimeError("replica died")
        return self.output


async def test_backend_failure_and_abort(proxy, tokenizer, token_builder):
    crash = proxy.open_session(make_config(_FailingBackend(None), tokenizer, token_builder))
    aborting = _FailingBackend(GenerationOutput([5, 6], [-1.0, -1.0], "abort"))
    abort = proxy.open_session(make_config(aborting, tokenizer, token_builder))
    body = {"model": "m", "messages": [{"role": "user", "content": "t"}]}
    async with httpx.AsyncClient() as client:
        r = await client.post(f"{crash.base_url}/chat/completions", json=body, headers=_auth(crash.api_key))
        assert r.status_code == 500 and r.json()["error"]["code"] == "backend_error"
        for _ in range(2):
            r = await client.post(f"{abort.base_url}/chat/completions", json=body, headers=_auth(abort.api_key))
            assert r.status_code == 503 and r.json()["error"]["code"] == "generation_aborted"
    crashed = proxy.close_session(crash.session_id)
    assert crashed.error.startswith("backend_error") and crashed.response_ids == []
    aborted = proxy.close_session(abort.session_id)
    assert aborted.stop == "aborted" and aborted.response_ids == [] and abort.finished.is_set()
    assert [t.finish_reason for t in aborted.turns] == ["abort"]


class _BrokenBuilder:
    """A token builder that fails on context merges (a bug inside the proxy's CPU work)."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def merge_context_tokens(self, *args, **kwargs):
        raise RuntimeError("boom")


async def test_internal_errors_are_500_and_the_server_keeps_serving(proxy, tokenizer, token_builder):
    backend = ScriptedPolicyBackend(tokenizer, ["ls"])
    broken = proxy.open_session(make_config(backend, tokenizer, _BrokenBuilder(token_builder)))
    client = _client(broken)
    messages = [{"role": "user", "content": "t"}]
    first = (await client.chat.completions.create(model="m", messages=messages, tools=[BASH_TOOL])).choices[0].message
    messages += [first.model_dump(), *_tool_results(first)]
    with pytest.raises(openai.InternalServerError) as info:
        await client.chat.completions.create(model="m", messages=messages, tools=[BASH_TOOL])
    assert info.value.code == "internal_error"
    assert proxy.close_session(broken.session_id).error == "internal_error: RuntimeError: boom"
    healthy = proxy.open_session(make_config(ScriptedPolicyBackend(tokenizer, []), tokenizer, token_builder))
    await _run_tool_conversation(healthy, n_turns=2)
    await client.close()


async def test_first_prompt_over_the_prompt_limit_is_refused(proxy, tokenizer, token_builder):
    backend = RecordingBackend(ScriptedPolicyBackend(tokenizer, []))
    handle = proxy.open_session(make_config(backend, tokenizer, token_builder, max_prompt_tokens=20))
    client = _client(handle)
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "word " * 50}])
    assert info.value.code == "context_length_exceeded" and backend.calls == []
    result = proxy.close_session(handle.session_id)
    assert result.stop == "context_limit" and result.prompt_ids == [] and result.response_ids == []
    await client.close()
