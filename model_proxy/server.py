"""The OpenAI-compatible ModelProxy: one uvicorn server per event loop, many sessions.

Routes (OpenAI chat-completions API):

- ``POST /sessions/{session_id}/v1/chat/completions``: JSON answer, or with
  ``"stream": true`` server-sent events (``chat.completion.chunk`` objects, a final
  chunk with ``usage`` and ``choices: []``, then ``data: [DONE]``).
- ``GET  /sessions/{session_id}/v1/models``: the session's model.
- ``GET  /v1/models``: the model names of the open sessions (no ids, no keys).
- ``GET  /health``: ``{"status": "ok", "sessions": N}``.
- ``GET  /metrics``: Prometheus text format (``metrics.py``).

Every session has its own base URL (``handle.base_url``) and API key
(``Authorization: Bearer <key>``). An unknown session id, a closed session and a
wrong or missing key all get the same 404 body, so nothing reveals which sessions
exist. Every error is an OpenAI-style JSON error (``errors.py``). Bodies larger than
``max_request_bytes`` get 413 ``request_too_large`` before they are parsed.

Streaming: backends return whole turns (verl's ``generate`` has no token stream), so
a streamed answer is generated first and then sent as a few events (role, content,
tool calls, finish, usage). Every error is therefore still a normal JSON error with
its status code, never a broken stream.

The server runs as a task on the CURRENT event loop (the one verl's
``AgentLoopWorker`` runs every rollout on), listens on loopback only, and never
touches signal handlers or logging configuration of the host process. CPU work of
the token builder runs in a small thread pool owned by the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import gc
import json
import logging
import secrets
import socket
import time
import weakref
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .errors import ProxyError, session_not_found
from .metrics import CONTENT_TYPE, ProxyMetrics
from .profiling import ProfileWriters
from .render_cache import DEFAULT_MAX_ENTRIES as DEFAULT_RENDER_CACHE_ENTRIES
from .render_cache import TextTokenCache, with_render_cache
from .schemas import ChatCompletionRequest
from .session import ChatOutcome, ProxySession, Segment, SessionConfig, SessionResult, SessionStop, TurnRecord

__all__ = [
    "DEFAULT_MAX_REQUEST_BYTES",
    "DEFAULT_PORT_FALLBACK_TRIES",
    "ModelProxyServer",
    "Segment",
    "SessionConfig",
    "SessionHandle",
    "SessionResult",
    "SessionStop",
    "TurnRecord",
]

logger = logging.getLogger(__name__)

_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})

# Largest accepted request body, bytes. A 128k-token history is ~0.5-1 MB of JSON;
# 32 MiB leaves room for tool schemas and long observations while refusing garbage.
DEFAULT_MAX_REQUEST_BYTES = 32 * 1024 * 1024
# ~2K tokens: tokenizing it on the event loop takes well under a millisecond.
DEFAULT_INLINE_TOKENIZE_MAX_CHARS = 8192
# A configured port that is taken: try the next ports, this many in all (1 = no fallback).
DEFAULT_PORT_FALLBACK_TRIES = 100


@dataclass(frozen=True)
class SessionHandle:
    """What the agent needs to reach its session.

    Attributes:
        session_id: URL-safe random id (192 bits).
        api_key: per-session secret (256 bits) the agent sends as ``Authorization: Bearer``.
        base_url: ``f"{server.base_url}/sessions/{session_id}/v1"`` (OpenAI ``base_url`` /
            litellm ``api_base``).
        finished: set when the session can no longer generate (``stop`` is
            ``"context_limit"`` or ``"aborted"``, or it was closed); the agent loop may
            stop the agent early instead of waiting for it to notice.
    """

    session_id: str
    api_key: str
    base_url: str
    finished: asyncio.Event


class _UvicornServer(uvicorn.Server):
    """uvicorn without signal capture: the host process (verl worker, pytest) owns signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _bind(host: str, port: int, tries: int) -> socket.socket:
    """Bind ``host:port``, or the next free port up to ``tries`` ports in all (port 0: OS picks).

    Raises:
        OSError: nothing could be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    attempts = 1 if port == 0 else max(1, tries)
    last: OSError | None = None
    for candidate in range(port, min(port + attempts, 65536)):
        # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY on accepted connections only
        # when the socket's proto is TCP (base_events._set_nodelay); with proto 0, uvicorn's
        # separate header/body writes meet Nagle + delayed ACK and every answer waits ~40 ms.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.bind((host, candidate))
            return sock
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE:
                raise
            last = exc
    assert last is not None
    raise last


class ModelProxyServer:
    """One HTTP server on the current event loop serving many rollout sessions.

    Use ``await ModelProxyServer.start()``; whoever starts it owns it and stops it (the
    agent loop's worker: ``recipe.worker_resources.WorkerResources``).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        cpu_workers: int = 1,
        profile_log_dir: str | None = None,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        render_cache_entries: int = DEFAULT_RENDER_CACHE_ENTRIES,
        inline_tokenize_max_chars: int = DEFAULT_INLINE_TOKENIZE_MAX_CHARS,
    ) -> None:
        self.host = host
        self.inline_tokenize_max_chars = inline_tokenize_max_chars
        self.port = port
        self.profile_log_dir = profile_log_dir
        self.max_request_bytes = max_request_bytes
        self._sessions: dict[str, ProxySession] = {}
        self.render_cache_entries = render_cache_entries
        # One render-cached copy per token builder (so per tokenizer), shared by its sessions.
        self._cached_builders: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
        # One worker by default: Hugging Face fast tokenizers are not guaranteed to be
        # safe under concurrent use from several threads, and builder calls are short.
        self._executor = ThreadPoolExecutor(max_workers=cpu_workers, thread_name_prefix="model-proxy-cpu")
        self._profiles = ProfileWriters(port)
        self.metrics = ProxyMetrics(lambda: len(self._sessions))
        self._uvicorn: _UvicornServer | None = None
        self._serve_task: asyncio.Task[None] | None = None
        self.stopped = False
        self.app = self._build_app()

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    # -- lifecycle ----------------------------------------------------------------------------

    @classmethod
    async def start(
        cls,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        cpu_workers: int = 1,
        log_level: str = "warning",
        profile_log_dir: str | None = None,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        port_fallback_tries: int = DEFAULT_PORT_FALLBACK_TRIES,
        render_cache_entries: int = DEFAULT_RENDER_CACHE_ENTRIES,
        inline_tokenize_max_chars: int = DEFAULT_INLINE_TOKENIZE_MAX_CHARS,
        freeze_gc: bool = False,
    ) -> ModelProxyServer:
        """Bind ``host:port`` and serve on the running loop.

        Args:
            host: a loopback address.
            port: 0 = the OS chooses; otherwise this port, or the next free one (up to
                ``port_fallback_tries`` ports in all) when it is in use.
            cpu_workers: threads for tokenization.
            log_level: uvicorn's log level.
            profile_log_dir: write per-call profile lines for every session here
                (``profiling.py``); None = off (a session can still set its own).
            max_request_bytes: larger request bodies get 413.
            render_cache_entries: size of the per-builder text -> token-ids cache under
                verl's Continuous Token builder (``render_cache.py``); 0 = no memo (renders still
                keep special-token text in observations as text).
            inline_tokenize_max_chars: a request whose new text (appended messages plus
                tool schemas) is at most this many characters is tokenized on the event
                loop (well under a millisecond) instead of in the executor; 0 = always the
                executor.
            freeze_gc: before serving, import the tool parsers, run a full collection
                and ``gc.freeze()`` the process's heap. Why: a full cyclic-GC pass over
                a worker's ~500K import-time objects (torch, transformers, verl) stalls
                the event loop ~0.3 s, long enough to set the proxy's p99 latency
                (``bench/proxy_overhead.py``); frozen objects are skipped by later
                passes. Process-wide and one-way (objects alive now are never
                collected as cycles later), so only for a process that exists to serve
                rollouts (the recipe's agent-loop workers: ``swe_agent.proxy.freeze_gc``).

        Returns:
            A started server; ``server.port`` is the real port.

        Raises:
            ValueError: ``host`` is not a loopback address.
            OSError: no port could be bound.
            RuntimeError: uvicorn failed to start.
        """
        if host not in _LOOPBACK_HOSTS:
            raise ValueError(f"The model proxy listens on loopback only, got host={host!r}")
        if freeze_gc:
            _freeze_gc()
        bind_host = "127.0.0.1" if host == "localhost" else host
        # Binding here (not in uvicorn) gives the real port and turns a bind failure into
        # an OSError instead of uvicorn's sys.exit inside a task.
        sock = _bind(bind_host, port, port_fallback_tries)
        server = cls(
            bind_host,
            sock.getsockname()[1],
            cpu_workers=cpu_workers,
            profile_log_dir=profile_log_dir,
            max_request_bytes=max_request_bytes,
            render_cache_entries=render_cache_entries,
            inline_tokenize_max_chars=inline_tokenize_max_chars,
        )
        config = uvicorn.Config(
            server.app,
            lifespan="off",
            log_config=None,  # leave the host's logging configuration alone
            log_level=log_level,
            access_log=False,
            timeout_keep_alive=60,
            timeout_graceful_shutdown=2,
            backlog=4096,
            proxy_headers=False,  # loopback only: no reverse proxy whose X-Forwarded-* headers to trust
        )
        server._uvicorn = _UvicornServer(config)
        server._serve_task = asyncio.get_running_loop().create_task(
            server._serve(sock), name=f"model-proxy:{server.port}"
        )
        while not server._uvicorn.started:
            if server._serve_task.done():
                server.stopped = True
                server._executor.shutdown(wait=False)
                exc = server._serve_task.exception()
                raise RuntimeError(f"the model proxy failed to start on {server.base_url}") from exc
            await asyncio.sleep(0.005)
        logger.info("model proxy listening on %s", server.base_url)
        return server

    async def _serve(self, sock: socket.socket) -> None:
        assert self._uvicorn is not None
        try:
            await self._uvicorn.serve(sockets=[sock])
        except SystemExit as exc:  # uvicorn exits on startup failure; keep the loop alive
            raise RuntimeError(f"uvicorn exited with {exc.code}") from None
        finally:
            sock.close()

    async def stop(self) -> None:
        """Close every session, stop serving, release the port. Idempotent."""
        if self.stopped:
            return
        self.stopped = True
        for session in self._sessions.values():
            session.close()
        self._sessions.clear()
        if self._uvicorn is not None and self._serve_task is not None:
            self._uvicorn.should_exit = True
            try:
                await self._serve_task
            except Exception:
                logger.exception("model proxy on %s stopped with an error", self.base_url)
        self._executor.shutdown(wait=False)
        self._profiles.close()

    # -- sessions -------------------------------------------------------------------------------

    def open_session(self, config: SessionConfig) -> SessionHandle:
        """Register a session and return how to reach it (call on the server's event loop).

        Raises:
            RuntimeError: the server is stopped.
            ValueError: ``config.max_response_tokens <= 0`` or a bad ``on_history_rewrite``.
            OSError: the profile log directory cannot be created.
        """
        if self.stopped:
            raise RuntimeError("the model proxy is stopped")
        session_id = secrets.token_urlsafe(24)
        api_key = f"sk-session-{secrets.token_urlsafe(32)}"
        profile = self._profiles.get(config.profile_log_dir or self.profile_log_dir)
        config = dataclasses.replace(config, token_builder=self._render_cached(config.token_builder))
        session = ProxySession(session_id, api_key, config, self._executor, profile=profile,
                               inline_tokenize_max_chars=self.inline_tokenize_max_chars)
        self._sessions[session_id] = session
        return SessionHandle(
            session_id=session_id,
            api_key=api_key,
            base_url=f"{self.base_url}/sessions/{session_id}/v1",
            finished=session.finished,
        )

    def _render_cached(self, builder: Any) -> Any:
        """``builder`` rendering through ``render_cache`` (one copy per builder; it also keeps
        special-token text in observations as text, so it applies with 0 cache entries too),
        or ``builder`` as it is where that copy would change its tokens."""
        try:
            cached = self._cached_builders.get(builder)
        except TypeError:  # not weak-referenceable: use it uncached
            return builder
        if cached is None:
            cached = with_render_cache(builder, TextTokenCache(max(0, self.render_cache_entries)))
            self._cached_builders[builder] = cached
        return cached

    def close_session(self, session_id: str) -> SessionResult:
        """Forget a session and return its record; later requests for it get 404.

        A request still being generated for it is answered 404 and its turn discarded,
        so the record never holds half a turn. Call on the server's event loop.

        Raises:
            KeyError: no open session has this id.
        """
        session = self._sessions.pop(session_id)
        return session.close()

    @property
    def num_sessions(self) -> int:
        return len(self._sessions)

    def _authorize(self, session_id: str, request: Request) -> ProxySession:
        session = self._sessions.get(session_id)
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        expected = session.api_key if session is not None else "x"
        # compare_digest even when the session is unknown: same work either way.
        key_ok = secrets.compare_digest(token.strip().encode(), expected.encode())
        if session is None or session.closed or scheme.lower() != "bearer" or not key_ok:
            raise session_not_found()
        return session

    # -- HTTP ---------------------------------------------------------------------------------

    def _error_response(self, exc: ProxyError, route: str) -> JSONResponse:
        self.metrics.error(exc.type, exc.code)
        self.metrics.requests.labels(route=route, status=str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status)

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="ModelProxy", docs_url=None, redoc_url=None, openapi_url=None)

        @app.exception_handler(ProxyError)
        async def _proxy_error(_: Request, exc: ProxyError) -> JSONResponse:
            return self._error_response(exc, "other")

        @app.exception_handler(RequestValidationError)
        async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
            message, param = _describe_validation_errors(exc.errors())
            return self._error_response(ProxyError(400, message, code="invalid_request", param=param), "other")

        @app.exception_handler(StarletteHTTPException)
        async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
            code = "not_found" if exc.status_code == 404 else "http_error"
            return self._error_response(ProxyError(exc.status_code, str(exc.detail), code=code), "other")

        @app.exception_handler(Exception)
        async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
            logger.exception("model proxy: unexpected error", exc_info=exc)
            error = ProxyError(500, "Internal error in the model proxy.", type="server_error", code="internal_error")
            return self._error_response(error, "other")

        @app.get("/health")
        async def health() -> dict[str, Any]:
            return {"status": "ok", "sessions": len(self._sessions)}

        @app.get("/metrics")
        async def metrics() -> Response:
            return Response(self.metrics.render(), media_type=CONTENT_TYPE)

        @app.get("/v1/models")
        async def all_models() -> dict[str, Any]:
            names = sorted({s.config.model_name for s in self._sessions.values()})
            return {"object": "list", "data": [_model_card(name) for name in names]}

        @app.get("/sessions/{session_id}/v1/models")
        async def models(session_id: str, request: Request) -> dict[str, Any]:
            session = self._authorize(session_id, request)
            return {"object": "list", "data": [_model_card(session.config.model_name)]}

        @app.post("/sessions/{session_id}/v1/chat/completions")
        async def chat_completions(session_id: str, request: Request) -> Response:
            arrived = time.perf_counter()
            try:
                session = self._authorize(session_id, request)
            except ProxyError as exc:
                return self._error_response(exc, "chat")
            session.request_arrived()
            streaming = False
            try:
                chat_request = _parse_chat_request(await _read_body(request, self.max_request_bytes))
                outcome = await session.chat(chat_request, arrived)
                if chat_request.stream:
                    streaming = True
                    return StreamingResponse(
                        self._stream(session, outcome, arrived),
                        media_type="text/event-stream",
                        headers={"Cache-Control": "no-cache"},
                    )
                self._record_call(session, outcome, arrived, ttft=None, stream=False)
                self.metrics.requests.labels(route="chat", status="200").inc()
                # Serialized by pydantic in one step (no intermediate dict, no json.dumps).
                return Response(outcome.response.model_dump_json(), media_type="application/json")
            except ProxyError as exc:
                return self._error_response(exc, "chat")
            except ClientDisconnect:
                # Nothing was parsed or generated: the session is as it was. Not an error of ours.
                self.metrics.disconnects.inc()
                logger.info("model proxy: session %s: the client disconnected before its request body arrived",
                            session_id[:8])
                return Response(status_code=499)
            finally:
                if not streaming:
                    session.response_left()

        return app

    async def _stream(self, session: ProxySession, outcome: ChatOutcome, arrived: float) -> AsyncIterator[bytes]:
        """SSE events of one finished turn; ``response_left`` fires when the last is written.

        The usage chunk is always sent (as if ``stream_options.include_usage`` were
        true): agents that count tokens need it, and OpenAI clients skip ``choices: []``.
        """
        ttft: float | None = None
        try:
            for index, chunk in enumerate(_completion_chunks(outcome.response.model_dump(mode="json"))):
                yield b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"
                if ttft is None and index >= 1:  # event 0 is the role; 1 carries content/tool calls
                    ttft = time.perf_counter() - arrived
            yield b"data: [DONE]\n\n"
            self._record_call(session, outcome, arrived, ttft=ttft, stream=True)
            self.metrics.requests.labels(route="chat", status="200").inc()
        finally:
            session.response_left()

    def _record_call(
        self, session: ProxySession, outcome: ChatOutcome, arrived: float, *, ttft: float | None, stream: bool
    ) -> None:
        """Metrics and the profile line of one answered request."""
        total = time.perf_counter() - arrived
        self.metrics.latency.labels(stream=str(stream).lower()).observe(total)
        record = outcome.record
        if record is None:  # a retry answered from the cache: no sample
            return
        self.metrics.prompt_tokens.inc(record.prompt_tokens)
        self.metrics.completion_tokens.inc(record.completion_tokens)
        self.metrics.queue.observe(record.queue_ms / 1000.0)
        self.metrics.generate.observe(record.generate_ms / 1000.0)
        if ttft is not None:
            self.metrics.ttft.observe(ttft)
        if session.profile is not None:
            session.profile.write(
                {
                    "type": "llm_call",
                    "session": session.session_id,
                    "request_id": session.request_id,
                    "segment": record.segment,
                    "turn": record.index,
                    "prompt_tokens": record.prompt_tokens,
                    "context_tokens": record.context_tokens,
                    "completion_tokens": record.completion_tokens,
                    "max_tokens": record.max_tokens,
                    "queue_ms": record.queue_ms,
                    "generate_ms": record.generate_ms,
                    "total_ms": total * 1000.0,
                    "ttft_ms": None if ttft is None else ttft * 1000.0,
                    "finish_reason": record.finish_reason,
                    "stream": stream,
                }
            )


def _freeze_gc() -> None:
    """Move everything alive now out of the cyclic GC's reach (see ``start(freeze_gc=...)``).

    Once per process: a later server finds the heap frozen and skips the full collection.
    """
    if gc.get_freeze_count() > 0:
        return
    import verl.experimental.agent_loop.tool_parser  # noqa: F401  (TurnParser's import, done before the freeze)

    gc.collect()
    gc.freeze()
    logger.info("model proxy: froze %d objects out of the cyclic GC", gc.get_freeze_count())


def _model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "model-proxy"}


def _completion_chunks(response: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A ``chat.completion`` object as OpenAI ``chat.completion.chunk`` objects.

    Order (as OpenAI sends them): role delta, content delta (if any), one delta per
    tool call (``index``, ``id``, ``type``, ``function`` with the full arguments),
    an empty delta with ``finish_reason``, and a ``choices: []`` chunk with ``usage``.
    """
    base = {"id": response["id"], "object": "chat.completion.chunk", "created": response["created"],
            "model": response["model"]}
    choice = response["choices"][0]
    message = choice["message"]

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

    yield chunk({"role": "assistant", "content": ""})
    if message.get("content"):
        yield chunk({"content": message["content"]})
    for index, call in enumerate(message.get("tool_calls") or []):
        yield chunk({"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                     "function": dict(call["function"])}]})
    yield chunk({}, choice["finish_reason"])
    yield {**base, "choices": [], "usage": response["usage"]}


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes without buffering them all.

    Raises:
        ProxyError(413, request_too_large).
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise _too_large(limit)
        chunks.append(part)
    return b"".join(chunks)


def _too_large(limit: int) -> ProxyError:
    return ProxyError(413, f"The request body is larger than {limit} bytes.", code="request_too_large")


def _parse_chat_request(body: bytes) -> ChatCompletionRequest:
    """Raw body -> validated request, parsed by pydantic straight from the bytes.

    (Not ``json.loads`` then ``model_validate``: building the Python dicts of the whole
    echoed history first costs about as much again on every request.)

    Raises:
        ProxyError(400): invalid JSON (``invalid_json``), schema violations
            (``invalid_request``), an option it cannot honour (``refuse_unsupported_options``).
    """
    try:
        request = ChatCompletionRequest.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            raise ProxyError(400, f"The request body is not valid JSON: {first.get('msg')}", code="invalid_json") from exc
        if first.get("type") == "model_type" and not first.get("loc"):
            raise ProxyError(400, "The request body must be a JSON object.", code="invalid_request") from exc
        message, param = _describe_validation_errors(errors)
        raise ProxyError(400, message, code="invalid_request", param=param) from exc
    refuse_unsupported_options(request)
    return request


def refuse_unsupported_options(request: ChatCompletionRequest) -> None:
    """Refuse request options that would change the answer's shape and cannot be honoured
    (``ChatCompletionRequest``); silently dropping them would hand the agent an answer
    it did not ask for.

    Raises:
        ProxyError(400, code="invalid_value" for ``n``, else "unsupported_parameter"),
            naming the option in ``param``.
    """
    if request.n is not None and request.n != 1:
        raise ProxyError(400, f"Only n=1 is supported, got n={request.n}.", code="invalid_value", param="n")
    refused = {
        "logprobs": request.logprobs is True,
        "top_logprobs": bool(request.top_logprobs),
        "logit_bias": bool(request.logit_bias),
        "response_format": request.response_format is not None
        and request.response_format.get("type", "text") != "text",
        "tool_choice": request.tool_choice not in (None, "auto"),
        "functions": request.functions is not None,
        "function_call": request.function_call is not None,
    }
    for param, unsupported in refused.items():
        if unsupported:
            why = ("sampled-token logprobs are recorded for training, not returned"
                   if param in ("logprobs", "top_logprobs") else "the policy's own output is returned as sampled")
            raise ProxyError(400, f"{param}={getattr(request, param)!r} is not supported by the model proxy: {why}.",
                             code="unsupported_parameter", param=param)


def _describe_validation_errors(errors: Any) -> tuple[str, str | None]:
    """Pydantic/FastAPI error list -> (one readable message, the first offending field)."""
    parts = []
    param = None
    for error in list(errors)[:5]:
        loc = [str(p) for p in error.get("loc", ()) if p not in ("body",)]
        where = ".".join(loc) or "body"
        if param is None and loc:
            param = loc[0]
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "Invalid request: " + "; ".join(parts), param
