"""The OpenAI-compatible ModelProxy: one uvicorn server per event loop, many sessions.

Routes (OpenAI chat-completions API, non-streaming):

- ``POST /sessions/{session_id}/v1/chat/completions``
- ``GET  /sessions/{session_id}/v1/models``
- ``GET  /health``

Every session has its own base URL (``handle.base_url``) and API key
(``Authorization: Bearer <key>``). An unknown session id, a closed session and a
wrong or missing key all get the same 404 body, so nothing reveals which sessions
exist. Every error is an OpenAI-style JSON error (``errors.py``).

The server runs as a task on the CURRENT event loop (the one verl's
``AgentLoopWorker`` runs every rollout on), listens on loopback only, and never
touches signal handlers or logging configuration of the host process. CPU work of
the token builder runs in a small thread pool owned by the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import ProxyError, error_body, session_not_found
from .schemas import ChatCompletionRequest
from .session import ProxySession, SessionConfig, SessionResult, TurnRecord

__all__ = ["ModelProxyServer", "SessionConfig", "SessionHandle", "SessionResult", "TurnRecord"]

logger = logging.getLogger(__name__)

_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


@dataclass(frozen=True)
class SessionHandle:
    """What the agent needs to reach its session.

    Attributes:
        session_id: URL-safe random id (192 bits).
        api_key: per-session secret the agent sends as ``Authorization: Bearer``.
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


class ModelProxyServer:
    """One HTTP server on the current event loop serving many rollout sessions.

    Use ``await ModelProxyServer.start()`` for a private server or
    ``await ModelProxyServer.shared()`` for the one server of the running loop.
    """

    # Per-event-loop registry for ``shared()``: loop -> task starting (then holding) that
    # loop's server. The only module/class-level mutable state: verl runs every rollout
    # of a worker on one loop, and a new agent-loop object is made per sample, so the
    # server must outlive the objects that use it. Entries are removed by ``stop()``
    # and pruned when their loop is closed; the lock guards the dict across threads
    # (loops in different threads), never held across an await.
    _shared_servers: ClassVar[dict[asyncio.AbstractEventLoop, asyncio.Task[ModelProxyServer]]] = {}
    _shared_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, host: str, port: int, *, cpu_workers: int = 1) -> None:
        self.host = host
        self.port = port
        self._sessions: dict[str, ProxySession] = {}
        # One worker by default: Hugging Face fast tokenizers are not guaranteed to be
        # safe under concurrent use from several threads, and builder calls are short.
        self._executor = ThreadPoolExecutor(max_workers=cpu_workers, thread_name_prefix="model-proxy-cpu")
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
        cls, host: str = "127.0.0.1", port: int = 0, *, cpu_workers: int = 1, log_level: str = "warning"
    ) -> ModelProxyServer:
        """Bind ``host:port`` (port 0: the OS chooses) and serve on the running loop.

        Returns:
            A started server; ``server.port`` is the real port.

        Raises:
            ValueError: ``host`` is not a loopback address.
            OSError: the address cannot be bound.
            RuntimeError: uvicorn failed to start.
        """
        if host not in _LOOPBACK_HOSTS:
            raise ValueError(f"The model proxy listens on loopback only, got host={host!r}")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # Binding here (not in uvicorn) gives the real port and turns a bind failure into
        # an OSError instead of uvicorn's sys.exit inside a task.
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.bind(("127.0.0.1" if host == "localhost" else host, port))
        except OSError:
            sock.close()
            raise
        server = cls(host if host != "localhost" else "127.0.0.1", sock.getsockname()[1], cpu_workers=cpu_workers)
        config = uvicorn.Config(
            server.app,
            lifespan="off",
            log_config=None,  # leave the host's logging configuration alone
            log_level=log_level,
            access_log=False,
            timeout_keep_alive=60,
            timeout_graceful_shutdown=2,
            backlog=4096,
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

    @classmethod
    async def shared(cls, host: str = "127.0.0.1", port: int = 0) -> ModelProxyServer:
        """The server of the running event loop, started on first use.

        Concurrent first callers on one loop share one start. ``host``/``port`` only
        apply to that first start.
        """
        loop = asyncio.get_running_loop()
        with cls._shared_lock:
            for other in [other for other in cls._shared_servers if other.is_closed()]:
                del cls._shared_servers[other]
            task = cls._shared_servers.get(loop)
            if task is not None and task.done():
                if task.cancelled() or task.exception() is not None or task.result().stopped:
                    task = None
            if task is None:
                task = loop.create_task(cls.start(host=host, port=port), name="model-proxy-shared-start")
                cls._shared_servers[loop] = task
        # shield: a caller cancelled while waiting must not cancel the start for others.
        return await asyncio.shield(task)

    @classmethod
    async def stop_shared(cls) -> None:
        """Stop the running loop's shared server, if one was started (or is starting)."""
        loop = asyncio.get_running_loop()
        with cls._shared_lock:
            task = cls._shared_servers.pop(loop, None)
        if task is None:
            return
        try:
            server = await asyncio.shield(task)
        except Exception:  # it failed to start: nothing to stop
            return
        await server.stop()

    async def stop(self) -> None:
        """Close every session, stop serving, release the port. Idempotent."""
        if self.stopped:
            return
        self.stopped = True
        with self._shared_lock:
            for loop, task in list(self._shared_servers.items()):
                if task.done() and not task.cancelled() and task.exception() is None and task.result() is self:
                    del self._shared_servers[loop]
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

    # -- sessions -------------------------------------------------------------------------------

    def open_session(self, config: SessionConfig) -> SessionHandle:
        """Register a session and return how to reach it (call on the server's event loop).

        Raises:
            RuntimeError: the server is stopped.
            ValueError: ``config.max_response_tokens <= 0``.
        """
        if self.stopped:
            raise RuntimeError("the model proxy is stopped")
        session_id = secrets.token_urlsafe(24)
        api_key = f"sk-session-{secrets.token_urlsafe(32)}"
        session = ProxySession(session_id, api_key, config, self._executor)
        self._sessions[session_id] = session
        return SessionHandle(
            session_id=session_id,
            api_key=api_key,
            base_url=f"{self.base_url}/sessions/{session_id}/v1",
            finished=session.finished,
        )

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

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="ModelProxy", docs_url=None, redoc_url=None, openapi_url=None)

        @app.exception_handler(ProxyError)
        async def _proxy_error(_: Request, exc: ProxyError) -> JSONResponse:
            return JSONResponse(exc.body(), status_code=exc.status)

        @app.exception_handler(RequestValidationError)
        async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
            message, param = _describe_validation_errors(exc.errors())
            return JSONResponse(error_body(message, code="invalid_request", param=param), status_code=400)

        @app.exception_handler(StarletteHTTPException)
        async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
            code = "not_found" if exc.status_code == 404 else "http_error"
            return JSONResponse(error_body(str(exc.detail), code=code), status_code=exc.status_code)

        @app.exception_handler(Exception)
        async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
            logger.exception("model proxy: unexpected error", exc_info=exc)
            body = error_body("Internal error in the model proxy.", type="server_error", code="internal_error")
            return JSONResponse(body, status_code=500)

        @app.get("/health")
        async def health() -> dict[str, str]:
            return {"status": "ok"}

        @app.get("/sessions/{session_id}/v1/models")
        async def models(session_id: str, request: Request) -> dict[str, Any]:
            session = self._authorize(session_id, request)
            model = {"id": session.config.model_name, "object": "model", "created": 0, "owned_by": "model-proxy"}
            return {"object": "list", "data": [model]}

        @app.post("/sessions/{session_id}/v1/chat/completions")
        async def chat_completions(session_id: str, request: Request) -> JSONResponse:
            session = self._authorize(session_id, request)
            session.request_arrived()
            try:
                chat_request = _parse_chat_request(await request.body())
                return JSONResponse(await session.chat(chat_request))
            except ProxyError as exc:
                return JSONResponse(exc.body(), status_code=exc.status)
            finally:
                session.response_left()

        return app


def _parse_chat_request(body: bytes) -> ChatCompletionRequest:
    """Raw body -> validated request.

    Raises:
        ProxyError(400): invalid JSON (``invalid_json``), schema violations
            (``invalid_request``), ``stream: true`` (``stream_not_supported``), ``n > 1``.
    """
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProxyError(400, f"The request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise ProxyError(400, "The request body must be a JSON object.", code="invalid_request")
    try:
        request = ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        message, param = _describe_validation_errors(exc.errors())
        raise ProxyError(400, message, code="invalid_request", param=param) from exc
    if request.stream:
        raise ProxyError(
            400, "Streaming is not supported by this proxy; send stream=false.", code="stream_not_supported",
            param="stream",
        )
    if request.n is not None and request.n != 1:
        raise ProxyError(400, f"Only n=1 is supported, got n={request.n}.", code="invalid_value", param="n")
    return request


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
