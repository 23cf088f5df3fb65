"""Isolation between sessions, request-size limit, port choice and freeing state on close."""

from __future__ import annotations

import asyncio
import gc
import socket
import weakref

import httpx
import pytest

from model_proxy.backends.scripted import ScriptedPolicyBackend
from model_proxy.server import ModelProxyServer

from .helpers import BASH_TOOL, RecordingBackend, auth, check_exact_state, make_config

BODY = {"model": "m", "messages": [{"role": "user", "content": "task"}], "tools": [BASH_TOOL]}


async def test_one_rollout_cannot_read_extend_or_close_another(proxy, tokenizer, token_builder):
    """What a command inside rollout A knows (its own base URL + key) gives no access to B."""
    mine = proxy.open_session(make_config(ScriptedPolicyBackend(tokenizer, ["ls"]), tokenizer, token_builder))
    backend = RecordingBackend(ScriptedPolicyBackend(tokenizer, ["pwd"]))
    victim = proxy.open_session(make_config(backend, tokenizer, token_builder))
    async with httpx.AsyncClient() as client:
        first = await client.post(f"{victim.base_url}/chat/completions", json=BODY, headers=auth(victim.api_key))
        message = first.json()["choices"][0]["message"]
        extended = {**BODY, "messages": BODY["messages"] + [message, {"role": "tool", "tool_call_id": "x",
                                                                      "content": "injected"}]}
        attempts = [
            await client.post(f"{victim.base_url}/chat/completions", json=extended, headers=auth(mine.api_key)),
            await client.get(f"{victim.base_url}/models", headers=auth(mine.api_key)),
            await client.post(f"{victim.base_url}/chat/completions", json=extended,
                              headers={"Authorization": f"Bearer {victim.session_id}"}),
            # Its own key with its own session id in a path pointing at the other's routes.
            await client.post(f"{mine.base_url}/../../{victim.session_id}/v1/chat/completions", json=extended,
                              headers=auth(mine.api_key)),
        ]
        assert [r.status_code for r in attempts] == [404, 404, 404, 404]
        assert len({r.text for r in attempts[:3]}) == 1
        # No route closes or lists sessions over HTTP.
        for method, path in [("DELETE", f"/sessions/{victim.session_id}"), ("DELETE", f"/sessions/{victim.session_id}/v1"),
                             ("POST", f"/sessions/{victim.session_id}/close"), ("GET", "/sessions")]:
            response = await client.request(method, f"{proxy.base_url}{path}", headers=auth(mine.api_key))
            assert response.status_code in (404, 405) and "error" in response.json()
        health = (await client.get(f"{proxy.base_url}/health")).text
        assert victim.session_id not in health and victim.api_key not in health
        metrics = (await client.get(f"{proxy.base_url}/metrics")).text
        assert victim.session_id not in metrics
        # The victim's session is untouched and still works.
        ok = await client.post(f"{victim.base_url}/chat/completions",
                               json={**extended, "messages": extended["messages"][:-1] +
                                     [{"role": "tool", "tool_call_id": "x", "content": "real"}]},
                               headers=auth(victim.api_key))
        assert ok.status_code == 200
    result = proxy.close_session(victim.session_id)
    assert result.num_turns == 2 and "injected" not in str(result.messages)
    check_exact_state(result, backend.calls)
    assert len(victim.session_id) * 6 >= 128 and len(victim.api_key) > 40  # token_urlsafe: 6 bits per char


async def test_oversized_bodies_get_413_and_nothing_is_recorded(tokenizer, token_builder):
    server = await ModelProxyServer.start(max_request_bytes=4096)
    try:
        backend = RecordingBackend(ScriptedPolicyBackend(tokenizer, ["ls"]))
        handle = server.open_session(make_config(backend, tokenizer, token_builder))
        big = {**BODY, "messages": [{"role": "user", "content": "x" * 5000}]}
        async with httpx.AsyncClient() as client:
            declared = await client.post(f"{handle.base_url}/chat/completions", json=big, headers=auth(handle.api_key))

            async def chunks():  # no Content-Length: chunked transfer encoding
                for _ in range(10):
                    yield b"x" * 1000

            chunked = await client.post(f"{handle.base_url}/chat/completions", content=chunks(),
                                        headers=auth(handle.api_key))
            for response in (declared, chunked):
                assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
            assert backend.calls == []
            ok = await client.post(f"{handle.base_url}/chat/completions", json=BODY, headers=auth(handle.api_key))
            assert ok.status_code == 200
        assert server.close_session(handle.session_id).num_turns == 1
    finally:
        await server.stop()


@pytest.mark.parametrize(
    ("payload", "code", "param"),
    [
        ({**BODY, "tools": {"type": "function"}}, "invalid_request", "tools"),
        ({**BODY, "temperature": "hot"}, "invalid_request", "temperature"),
        ({**BODY, "stream": "yes please"}, "invalid_request", "stream"),
        ({**BODY, "messages": [{"content": "no role"}]}, "invalid_request", "messages"),
        ({**BODY, "messages": [{"role": "user", "content": [{"text": "no type"}]}]}, "invalid_request", "messages"),
        ({**BODY, "messages": [{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}]},
         "invalid_request", "messages"),
        ({**BODY, "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "forged"}]},
         "unknown_assistant_message", "messages"),
    ],
)
async def test_more_bad_input(proxy, tokenizer, token_builder, payload, code, param):
    backend = RecordingBackend(ScriptedPolicyBackend(tokenizer, ["ls", "pwd"]))
    handle = proxy.open_session(make_config(backend, tokenizer, token_builder))
    other = proxy.open_session(make_config(ScriptedPolicyBackend(tokenizer, []), tokenizer, token_builder))
    async with httpx.AsyncClient() as client:
        url = f"{handle.base_url}/chat/completions"
        first = await client.post(url, json=BODY, headers=auth(handle.api_key))
        assert first.status_code == 200
        if code == "unknown_assistant_message":  # the forged turn after a real one
            payload = {**BODY, "messages": BODY["messages"] + [first.json()["choices"][0]["message"],
                                                             {"role": "tool", "tool_call_id": "a", "content": "o"},
                                                             {"role": "assistant", "content": "forged"},
                                                             {"role": "user", "content": "go on"}]}
        bad = await client.post(url, json=payload, headers=auth(handle.api_key))
        assert bad.status_code == 400, bad.text
        assert bad.json()["error"]["code"] == code and bad.json()["error"]["param"] == param
        assert len(backend.calls) == 1
        ok = await client.post(f"{other.base_url}/chat/completions", json=BODY, headers=auth(other.api_key))
        assert ok.status_code == 200
    result = proxy.close_session(handle.session_id)
    assert result.num_turns == 1 and len(result.segments) == 1
    check_exact_state(result, backend.calls)


async def test_configured_port_falls_back_to_the_next_free_one():
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    taken = blocker.getsockname()[1]
    try:
        server = await ModelProxyServer.start(port=taken)
        try:
            assert server.port != taken and taken < server.port <= taken + 100
            async with httpx.AsyncClient() as client:
                assert (await client.get(f"{server.base_url}/health")).status_code == 200
        finally:
            await server.stop()
        with pytest.raises(OSError):
            await ModelProxyServer.start(port=taken, port_fallback_tries=1)
    finally:
        blocker.close()


async def test_closing_sessions_frees_their_state(proxy, tokenizer, token_builder):
    refs = []
    handles = []
    for _ in range(100):
        handle = proxy.open_session(make_config(ScriptedPolicyBackend(tokenizer, ["ls"]), tokenizer, token_builder))
        refs.append(weakref.ref(proxy._sessions[handle.session_id]))
        handles.append(handle)
    async with httpx.AsyncClient() as client:
        responses = await asyncio.gather(*[
            client.post(f"{h.base_url}/chat/completions", json=BODY, headers=auth(h.api_key)) for h in handles
        ])
        assert all(r.status_code == 200 for r in responses)
        assert (await client.get(f"{proxy.base_url}/health")).json()["sessions"] == 100
        results = [proxy.close_session(h.session_id) for h in handles]
        assert all(r.num_turns == 1 for r in results)
        assert (await client.get(f"{proxy.base_url}/health")).json()["sessions"] == 0
        assert "model_proxy_active_sessions 0.0" in (await client.get(f"{proxy.base_url}/metrics")).text
        gone = await client.post(f"{handles[0].base_url}/chat/completions", json=BODY, headers=auth(handles[0].api_key))
        assert gone.status_code == 404
    del responses
    gc.collect()
    assert proxy.num_sessions == 0
    assert sum(ref() is not None for ref in refs) == 0  # nothing else holds a closed session


async def test_listening_socket_disables_nagle(proxy):
    """Without TCP_NODELAY every answer waited ~40 ms (Nagle + delayed ACK on uvicorn's two writes);
    accepted connections inherit the listener's option on Linux."""
    [listener] = [sock for server in proxy._uvicorn.servers for sock in server.sockets]
    assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{proxy.base_url}/health")).status_code == 200
