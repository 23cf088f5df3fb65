"""Streaming (openai + litellm clients), /v1/models, /metrics and the profile log + analysis."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from model_proxy.analyze import main as analyze_main
from model_proxy.backends.scripted import ScriptedPolicyBackend
from model_proxy.server import ModelProxyServer

from .helpers import BASH_TOOL, RecordingBackend, auth, check_exact_state, make_config, render


def _client(handle) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=handle.base_url, api_key=handle.api_key, max_retries=0)


async def _stream_turn(client, messages, **kwargs) -> tuple[dict, str, object, list]:
    """One streamed request with the openai SDK -> (assembled message, finish_reason, usage, chunks)."""
    stream = await client.chat.completions.create(model="m", messages=messages, stream=True, **kwargs)
    content, calls, finish, usage, chunks = "", {}, None, None, []
    async for chunk in stream:
        chunks.append(chunk)
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for call in choice.delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"id": call.id, "type": "function",
                                                      "function": {"name": "", "arguments": ""}})
                entry["function"]["name"] += call.function.name or ""
                entry["function"]["arguments"] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    message = {"role": "assistant", "content": content or None}
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    return message, finish, usage, chunks


async def test_openai_streaming_tool_calls_and_usage(proxy, tokenizer, token_builder):
    backend = RecordingBackend(ScriptedPolicyBackend(tokenizer, ["ls -la", "cat README.md"]))
    handle = proxy.open_session(make_config(backend, tokenizer, token_builder))
    client = _client(handle)
    messages: list[dict] = [{"role": "user", "content": "task"}]
    for turn in range(3):
        if turn == 1:  # mixing streamed and plain requests in one session
            response = await client.chat.completions.create(model="m", messages=messages, tools=[BASH_TOOL])
            message, finish = response.choices[0].message.model_dump(exclude_none=True), response.choices[0].finish_reason
        else:
            message, finish, usage, chunks = await _stream_turn(
                client, messages, tools=[BASH_TOOL], stream_options={"include_usage": True}
            )
            call = backend.calls[-1]
            assert usage.prompt_tokens == len(call.prompt_ids)
            assert usage.completion_tokens == len(call.output.token_ids)
            assert chunks[-1].choices == [] and chunks[0].choices[0].delta.role == "assistant"
        assert finish == "tool_calls"
        command = json.loads(message["tool_calls"][0]["function"]["arguments"])["command"]
        assert command == backend.inner.command_for_turn(turn)
        messages += [message, {"role": "tool", "tool_call_id": message["tool_calls"][0]["id"], "content": "ok"}]
    await client.close()
    result = proxy.close_session(handle.session_id)
    check_exact_state(result, backend.calls)
    assert len(result.segments) == 1 and [t.agent_params["stream"] for t in result.turns] == [True, False, True]
    newline = tokenizer.encode("\n", add_special_tokens=False)
    assert result.prompt_ids + result.response_ids + newline == render(tokenizer, result.messages, [BASH_TOOL])


async def test_litellm_streaming_text_mode(proxy, tokenizer, token_builder):
    import litellm

    backend = RecordingBackend(ScriptedPolicyBackend(tokenizer, ["ls"], mode="text"))
    handle = proxy.open_session(make_config(backend, tokenizer, token_builder))
    messages = [{"role": "user", "content": "task"}]

    def run() -> tuple[str, str, int]:
        chunks = list(litellm.completion(model="openai/swe-policy", api_base=handle.base_url, api_key=handle.api_key,
                                         messages=messages, stream=True, num_retries=0,
                                         stream_options={"include_usage": True}))
        built = litellm.stream_chunk_builder(chunks, messages=messages)
        return built.choices[0].message.content, built.choices[0].finish_reason, built.usage.completion_tokens

    content, finish, completion_tokens = await asyncio.to_thread(run)
    expected = tokenizer.decode(backend.calls[0].output.token_ids, skip_special_tokens=True)
    assert content == expected and "```mswea_bash_command\nls\n```" in content
    assert finish == "stop" and completion_tokens == len(backend.calls[0].output.token_ids)
    check_exact_state(proxy.close_session(handle.session_id), backend.calls)


async def test_litellm_streaming_tool_calls(proxy, tokenizer, token_builder):
    import litellm

    backend = RecordingBackend(ScriptedPolicyBackend(tokenizer, ["pwd"]))
    handle = proxy.open_session(make_config(backend, tokenizer, token_builder))
    messages = [{"role": "user", "content": "task"}]

    def run():
        chunks = list(litellm.completion(model="openai/swe-policy", api_base=handle.base_url, api_key=handle.api_key,
                                         messages=messages, tools=[BASH_TOOL], stream=True, num_retries=0))
        return litellm.stream_chunk_builder(chunks, messages=messages)

    built = await asyncio.to_thread(run)
    assert built.choices[0].finish_reason == "tool_calls"
    assert json.loads(built.choices[0].message.tool_calls[0].function.arguments) == {"command": "pwd"}
    proxy.close_session(handle.session_id)


async def test_streamed_errors_are_plain_json_errors(proxy, tokenizer, token_builder):
    handle = proxy.open_session(make_config(ScriptedPolicyBackend(tokenizer, []), tokenizer, token_builder,
                                            max_prompt_tokens=5))
    client = _client(handle)
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "long " * 20}],
                                             stream=True)
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], n=2)
    assert info.value.code == "invalid_value" and info.value.param == "n"
    await client.close()


async def test_models_health_and_metrics(proxy, tokenizer, token_builder):
    a = proxy.open_session(make_config(ScriptedPolicyBackend(tokenizer, ["ls"]), tokenizer, token_builder,
                                       model_name="policy-a"))
    b = proxy.open_session(make_config(ScriptedPolicyBackend(tokenizer, ["ls"]), tokenizer, token_builder))
    client = _client(a)
    models = await client.models.list()
    assert [m.id for m in models.data] == ["policy-a"]
    body = {"model": "m", "messages": [{"role": "user", "content": "t"}], "tools": [BASH_TOOL]}
    async with httpx.AsyncClient() as http:
        listed = (await http.get(f"{proxy.base_url}/v1/models")).json()
        assert sorted(m["id"] for m in listed["data"]) == ["policy-a", "swe-policy"]
        assert a.session_id not in json.dumps(listed) and a.api_key not in json.dumps(listed)
        ok = await http.post(f"{a.base_url}/chat/completions", json=body, headers=auth(a.api_key))
        await http.post(f"{a.base_url}/chat/completions", content=b"{bad", headers=auth(a.api_key))
        await http.post(f"{b.base_url}/chat/completions", json=body, headers=auth("wrong"))
        proxy.close_session(b.session_id)
        text = (await http.get(f"{proxy.base_url}/metrics")).text
    usage = ok.json()["usage"]
    samples = _parse_metrics(text)
    assert samples['model_proxy_requests_total{route="chat",status="200"}'] == 1
    assert samples['model_proxy_requests_total{route="chat",status="400"}'] == 1
    assert samples['model_proxy_errors_total{code="invalid_json",type="invalid_request_error"}'] == 1
    assert samples['model_proxy_errors_total{code="session_not_found",type="invalid_request_error"}'] == 1
    assert samples["model_proxy_prompt_tokens_total"] == usage["prompt_tokens"]
    assert samples["model_proxy_completion_tokens_total"] == usage["completion_tokens"]
    assert samples['model_proxy_request_latency_seconds_count{stream="false"}'] == 1
    assert samples["model_proxy_generate_seconds_count"] == 1
    assert samples["model_proxy_active_sessions"] == 1
    await client.close()


def _parse_metrics(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()) if k != "le")
            if "le" in sample.labels:
                continue
            out[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return out


async def test_profile_log_and_analysis(tmp_path, tokenizer, token_builder):
    log_dir = tmp_path / "profile"
    server = await ModelProxyServer.start(profile_log_dir=str(log_dir))
    try:
        plain = RecordingBackend(ScriptedPolicyBackend(tokenizer, ["ls", "pwd"]))
        handle = server.open_session(make_config(plain, tokenizer, token_builder))
        other_dir = tmp_path / "own"
        own = server.open_session(make_config(ScriptedPolicyBackend(tokenizer, []), tokenizer, token_builder,
                                              profile_log_dir=str(other_dir)))
        client = _client(handle)
        messages: list[dict] = [{"role": "user", "content": "task"}]
        for turn in range(3):
            if turn == 2:
                message, _, _, _ = await _stream_turn(client, messages, tools=[BASH_TOOL])
            else:
                response = await client.chat.completions.create(model="m", messages=messages, tools=[BASH_TOOL])
                message = response.choices[0].message.model_dump(exclude_none=True)
            await asyncio.sleep(0.05)  # the "tool"
            messages += [message, {"role": "tool", "tool_call_id": message["tool_calls"][0]["id"], "content": "ok"}]
        # A client retry answered from the cache and a refused request are not samples: no llm_call line.
        await client.chat.completions.create(model="m", messages=messages[:-2], tools=[BASH_TOOL], stream=True)
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="m", messages=messages, tools=[BASH_TOOL], max_tokens=0)
        await client.chat.completions.create(model="m", messages=messages, tools=[BASH_TOOL])
        await _client(own).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        await client.close()
    finally:
        await server.stop()
    [log_file] = list(log_dir.glob("*.jsonl"))
    events = [json.loads(line) for line in log_file.read_text().splitlines()]
    calls = [e for e in events if e["type"] == "llm_call"]
    tools = [e for e in events if e["type"] == "tool_phase"]
    assert len(list(other_dir.glob("*.jsonl"))) == 1
    assert [c["turn"] for c in calls] == [0, 1, 2, 3] and all(c["session"] == handle.session_id for c in calls)
    assert [c["stream"] for c in calls] == [False, False, True, False]
    assert [c["ttft_ms"] is not None for c in calls] == [False, False, True, False]
    assert [c["prompt_tokens"] for c in calls] == [len(c.prompt_ids) for c in plain.calls]
    assert [c["completion_tokens"] for c in calls] == [len(c.output.token_ids) for c in plain.calls]
    for c in calls:
        assert c["total_ms"] >= c["generate_ms"] >= 0 and c["queue_ms"] >= 0 and c["finish_reason"] == "tool_calls"
    assert len(tools) == 5 and all(t["duration_ms"] >= 40 for t in tools[:3])

    out = tmp_path / "analysis"
    assert analyze_main([str(log_dir), "--out-dir", str(out)]) == 0
    stats = json.loads((out / "proxy_stats.json").read_text())["metrics"]
    assert stats["prompt_tokens"]["n"] == 4 and stats["ttft_ms"]["n"] == 1 and stats["tool_ms"]["n"] == 5
    prompt = [c["prompt_tokens"] for c in calls]
    assert stats["prompt_tokens"]["mean"] == pytest.approx(sum(prompt) / 4)
    assert stats["prompt_tokens"]["min"] == min(prompt) and stats["prompt_tokens"]["max"] == max(prompt)
    hist = stats["total_ms"]["histogram"]
    assert len(hist["counts"]) == 10 and len(hist["edges"]) == 11 and sum(hist["counts"]) == 4
    assert sum(hist["percent"]) == pytest.approx(100.0)
    for name in ("total_ms", "queue_ms", "generate_ms", "ttft_ms", "prompt_tokens", "completion_tokens", "tool_ms"):
        assert (out / f"proxy_{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert analyze_main([str(tmp_path / "empty-or-missing")]) == 2


@pytest.mark.parametrize("option", [
    {"logprobs": True}, {"logprobs": True, "top_logprobs": 5}, {"logit_bias": {"42": 5.0}},
    {"response_format": {"type": "json_object"}}, {"tool_choice": "required"},
])
async def test_options_the_proxy_cannot_honour_are_refused_not_dropped(proxy, tokenizer, token_builder, option):
    backend = RecordingBackend(ScriptedPolicyBackend(tokenizer, ["ls"]))
    handle = proxy.open_session(make_config(backend, tokenizer, token_builder))
    client = _client(handle)
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}],
                                             tools=[BASH_TOOL], **option)
    assert info.value.code == "unsupported_parameter" and info.value.param == list(option)[0]
    assert not backend.calls  # nothing was generated for it
    # The defaults clients send are accepted.
    answer = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}],
                                                  tools=[BASH_TOOL], logprobs=False, tool_choice="auto",
                                                  response_format={"type": "text"})
    assert answer.choices[0].message.tool_calls
    await client.close()
