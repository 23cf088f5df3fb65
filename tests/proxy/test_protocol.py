"""HTTP protocol of the proxy: routes, authentication, OpenAI-style errors."""

from __future__ import annotations

import httpx
import pytest

from model_proxy.backends.scripted import ScriptedPolicyBackend
from model_proxy.server import ModelProxyServer

from .helpers import BASH_TOOL, make_config

VALID = {"model": "swe-policy", "messages": [{"role": "user", "content": "hi"}], "tools": [BASH_TOOL]}


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "code", "param"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code
    return body


@pytest.fixture
def open_session(proxy, tokenizer, token_builder):
    def _open(**overrides):
        backend = overrides.pop("backend", None) or ScriptedPolicyBackend(tokenizer, ["ls"])
        return proxy.open_session(make_config(backend, tokenizer, token_builder, **overrides))

    return _open


async def test_health_models_and_ids(proxy, open_session):
    handle = open_session(model_name="my-policy")
    assert handle.base_url == f"{proxy.base_url}/sessions/{handle.session_id}/v1"
    assert proxy.base_url.startswith("http://127.0.0.1:") and proxy.port > 0
    assert len(handle.session_id) >= 32 and handle.api_key != handle.session_id
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{proxy.base_url}/health")).json() == {"status": "ok", "sessions": 1}
        models = await client.get(f"{handle.base_url}/models", headers=_auth(handle.api_key))
        assert models.status_code == 200
        assert [m["id"] for m in models.json()["data"]] == ["my-policy"]


async def test_unknown_closed_and_wrong_key_are_indistinguishable(proxy, open_session):
    handle = open_session()
    closed = open_session()
    proxy.close_session(closed.session_id)
    url = f"{proxy.base_url}/sessions/{{sid}}/v1/chat/completions"
    async with httpx.AsyncClient() as client:
        responses = [
            await client.post(url.format(sid="does-not-exist"), json=VALID, headers=_auth(handle.api_key)),
            await client.post(url.format(sid=handle.session_id), json=VALID, headers=_auth("wrong")),
            await client.post(url.format(sid=handle.session_id), json=VALID),
            await client.post(url.format(sid=handle.session_id), json=VALID, headers={"Authorization": handle.api_key}),
            await client.post(url.format(sid=closed.session_id), json=VALID, headers=_auth(closed.api_key)),
            await client.post(url.format(sid=handle.session_id), json=VALID, headers=_auth(closed.api_key)),
            await client.get(f"{proxy.base_url}/sessions/{closed.session_id}/v1/models", headers=_auth(closed.api_key)),
        ]
        bodies = [_assert_openai_error(r, 404, "session_not_found") for r in responses]
        assert all(body == bodies[0] for body in bodies)
        # Malformed JSON to an unknown session is still the same 404 (auth comes first).
        unknown = await client.post(url.format(sid="nope"), content=b"{not json")
        assert unknown.json() == bodies[0]
        # The real session was untouched by all of that.
        ok = await client.post(url.format(sid=handle.session_id), json=VALID, headers=_auth(handle.api_key))
        assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "tool_calls"
    with pytest.raises(KeyError):
        proxy.close_session(closed.session_id)


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        (b"{not json", "invalid_json", None),
        (b"", "invalid_json", None),
        (b"\xff\xfe{}", "invalid_json", None),
        (b"[1, 2]", "invalid_request", None),
        (b"null", "invalid_request", None),
        (b'{"model": "m"}', "invalid_request", "messages"),
        (b'{"messages": []}', "invalid_request", "messages"),
        (b'{"messages": "hi"}', "invalid_request", "messages"),
        (b'{"messages": [{"role": "wizard", "content": "x"}]}', "invalid_request", "messages"),
        (b'{"messages": [{"role": "user", "content": 5}]}', "invalid_request", "messages"),
        (b'{"messages": [{"role": "user", "content": "x"}], "n": 2}', "invalid_value", "n"),
        
        (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": "lots"}', "invalid_request", "max_tokens"),
        (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', "invalid_value", "max_tokens"),
        (
            b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}',
            "unsupported_content",
            None,
        ),
    ],
)
async def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(proxy, open_session, body, code, param):
    bad = open_session()
    good = open_session()
    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"{bad.base_url}/chat/completions",
            content=body,
            headers={**_auth(bad.api_key), "Content-Type": "application/json"},
        )
        error = _assert_openai_error(response, 400, code)["error"]
        assert error["param"] == param
        for handle in (bad, good):  # the failed session and another one still work
            ok = await client.post(f"{handle.base_url}/chat/completions", json=VALID, headers=_auth(handle.api_key))
            assert ok.status_code == 200, ok.text
    assert proxy.close_session(bad.session_id).num_turns == 1


async def test_unknown_routes_and_methods_are_openai_errors(proxy, open_session):
    handle = open_session()
    async with httpx.AsyncClient() as client:
        _assert_openai_error(await client.get(f"{proxy.base_url}/v1/chat/completions"), 404)
        _assert_openai_error(
            await client.get(f"{handle.base_url}/chat/completions", headers=_auth(handle.api_key)),
            405,
        )


async def test_only_loopback_hosts():
    with pytest.raises(ValueError):
        await ModelProxyServer.start(host="0.0.0.0", port=0)


async def test_stop_closes_sessions_and_port(tokenizer, token_builder):
    server = await ModelProxyServer.start()
    handle = server.open_session(make_config(ScriptedPolicyBackend(tokenizer, []), tokenizer, token_builder))
    await server.stop()
    await server.stop()  # idempotent
    assert handle.finished.is_set()
    with pytest.raises(RuntimeError):
        server.open_session(make_config(ScriptedPolicyBackend(tokenizer, []), tokenizer, token_builder))
    async with httpx.AsyncClient() as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"{server.base_url}/health")


async def test_a_client_leaving_mid_body_is_a_disconnect_not_an_error(proxy, open_session, caplog):
    import asyncio
    from urllib.parse import urlsplit

    handle = open_session()
    url = urlsplit(handle.base_url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    writer.write((f"POST {url.path}/chat/completions HTTP/1.1\r\nHost: {url.netloc}\r\n"
                  f"Authorization: Bearer {handle.api_key}\r\nContent-Type: application/json\r\n"
                  "Content-Length: 5000\r\n\r\n" '{"messages": [').encode())
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.close()
    await writer.wait_closed()
    async with httpx.AsyncClient() as client:
        for _ in range(50):  # the server notices the close on its own schedule
            metrics = (await client.get(f"{proxy.base_url}/metrics")).text
            if "model_proxy_disconnects_total 1.0" in metrics:
                break
            await asyncio.sleep(0.05)
        assert "model_proxy_disconnects_total 1.0" in metrics
        assert "internal_error" not in metrics
        assert "unexpected error" not in caplog.text
        # The session still works.
        response = await client.post(f"{handle.base_url}/chat/completions", json=VALID, headers=_auth(handle.api_key))
        assert response.status_code == 200, response.text
