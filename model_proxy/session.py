"""The exact token state of one rollout behind the proxy.

One ``ProxySession`` per trajectory. It owns the runtime token stream
``prompt_ids + response_ids`` and the response-side ``response_mask`` /
``response_logprobs``, built ONLY through verl's Continuous Token builder
(``verl.utils.tokenizer.continuous_token``), the machinery verl's own
``ToolAgentLoop`` uses:

- first request: ``build_initial_tokens(messages, tools=tools)`` -> prompt_ids;
- every generated turn: the sampled ids are appended verbatim with
  ``merge_assistant_tokens`` + ``align_response_metadata(..., assistant_logprobs=...)``
  (mask 1, the backend's logprobs);
- every later request: the messages appended since the recorded history (tool
  results, user messages) are tokenized with ``merge_context_tokens`` (mask 0,
  logprob 0.0; boundary tokens the builder inserts, e.g. Qwen's ``\\n`` after
  ``<|im_end|>``, are mask 0 too).

The whole conversation is never re-tokenized (verl's docs: re-applying the chat
template "makes PPO training not even converge"). A request whose history does not
extend the recorded one is refused (``history_mismatch``). Budget: the response
side (``response_ids``) may not exceed ``max_response_tokens``; running out is
answered with ``context_length_exceeded`` and ends the session (``stop =
"context_limit"``). A turn cut by ``max_tokens`` (no end-of-turn token) also ends it:
appending context after a truncated turn would train on a token sequence the chat
format never produces.

All builder work is CPU-bound and runs in the server's executor; between awaits the
session mutates its state in one synchronous block, so a concurrent
``close_session`` always sees a consistent snapshot. Requests of one session are
serialized by a lock.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Literal

import jinja2

from .backends.base import GenerationBackend, GenerationOutput
from .errors import ProxyError, context_length_exceeded, history_mismatch, session_not_found
from .messages import first_difference, normalize_messages, normalize_tools, same_history, tools_key
from .sampling import turn_sampling_params
from .schemas import ChatCompletionRequest, ChatCompletionResponse
from .tool_format import ParsedTurn, TurnParser

logger = logging.getLogger(__name__)

Phase = Literal["inference", "tool"]


@dataclass
class SessionConfig:
    """What one rollout's session needs.

    Attributes:
        backend: generates a turn from prompt ids (``backends.base.GenerationBackend``).
        tokenizer: the policy's Hugging Face tokenizer (decode, special ids, tool parser).
        token_builder: verl Continuous Token builder for that tokenizer
            (``AgentLoopBase.continuous_token_builder`` or
            ``create_continuous_token_builder(tok, hf_model_type=...)``).
        max_response_tokens: budget for ``response_ids`` (sampled + appended context),
            normally verl's ``rollout.response_length``.
        max_prompt_tokens: limit for the first prompt (verl's ``rollout.prompt_length``:
            verl pads every prompt to it, so a longer one cannot be trained on); None = no limit.
            A longer first prompt is refused with ``context_length_exceeded``.
        sampling_params: the trainer's sampling parameters (vLLM keys); they win over
            the agent's temperature/top_p.
        tool_parser: verl tool-parser name for the model's tool-call format.
        model_name: the name reported in responses and ``/v1/models``.
        request_id: stable id sent with every ``generate`` (sticky routing / prefix
            cache); a fresh uuid when None.
        on_phase: called with ``"inference"`` when a request arrives and ``"tool"``
            when its response leaves (resource-shim hook; must be quick, exceptions
            are logged and ignored).
    """

    backend: GenerationBackend
    tokenizer: Any
    token_builder: Any
    max_response_tokens: int
    sampling_params: dict[str, Any] = field(default_factory=dict)
    tool_parser: str = "hermes"
    model_name: str = "swe-policy"
    request_id: str | None = None
    on_phase: Callable[[str], None] | None = None
    max_prompt_tokens: int | None = None


@dataclass
class TurnRecord:
    """One assistant turn sent to the backend (an aborted one included).

    Attributes:
        index: 0-based assistant-turn number.
        prompt_tokens: length of the prompt sent to the backend.
        context_tokens: tokens appended (mask 0) before this turn, boundary tokens included.
        completion_tokens: sampled tokens kept (mask 1).
        finish_reason: what the agent got: "stop", "tool_calls", "length", or
            "abort" (answered with an error).
        max_tokens: the per-turn limit passed to the backend.
        generate_ms: wall time inside ``backend.generate``, milliseconds.
        agent_params: what the agent asked for (temperature, top_p, max_tokens), not applied
            except max_tokens as an upper bound.
        num_tool_calls: tool calls parsed from the turn.
    """

    index: int
    prompt_tokens: int
    context_tokens: int
    completion_tokens: int
    finish_reason: str
    max_tokens: int
    generate_ms: float
    agent_params: dict[str, Any] = field(default_factory=dict)
    num_tool_calls: int = 0


@dataclass
class SessionResult:
    """The training record of one session (``ModelProxyServer.close_session``).

    Invariant: ``len(response_ids) == len(response_mask) == len(response_logprobs)``
    (when logprobs is not None) and ``prompt_ids + response_ids`` is exactly the last
    prompt the backend received plus its last sampled ids.

    Attributes:
        prompt_ids: the first request's prompt (empty if no request got that far).
        response_ids: everything after it: sampled turns and appended context.
        response_mask: 1 on sampled tokens, 0 on context and builder-inserted tokens.
        response_logprobs: per response token, 0.0 where mask is 0; None when some
            turn's backend returned no logprobs.
        messages: the conversation as recorded (normalised requests + assistant turns as
            returned).
        num_turns: assistant turns generated.
        stop: None, ``"context_limit"`` (budget exhausted or a turn cut by max_tokens)
            or ``"aborted"`` (the backend aborted a generation).
        error: None or the last refusal that indicates a broken protocol
            (``"history_mismatch"``, ``"backend_error: ..."``).
        generation_s: total seconds inside ``backend.generate``.
        tool_s: total seconds between a response leaving and the next request arriving.
        turns: per-turn records.
    """

    prompt_ids: list[int]
    response_ids: list[int]
    response_mask: list[int]
    response_logprobs: list[float] | None
    messages: list[dict[str, Any]]
    num_turns: int
    stop: str | None
    error: str | None
    generation_s: float
    tool_s: float
    turns: list[TurnRecord]


class ProxySession:
    """Token state and request handling of one rollout (see module doc)."""

    def __init__(self, session_id: str, api_key: str, config: SessionConfig, executor: Executor) -> None:
        if config.max_response_tokens <= 0:
            raise ValueError(f"max_response_tokens must be positive, got {config.max_response_tokens}")
        self.session_id = session_id
        self.api_key = api_key
        self.config = config
        self.request_id = config.request_id or uuid.uuid4().hex
        self.finished = asyncio.Event()
        self.closed = False
        self._executor = executor
        self._lock = asyncio.Lock()
        self._parser = TurnParser(config.tokenizer, config.tool_parser)
        # Token state; None until the first request is tokenized.
        self._prompt_len: int | None = None
        self._runtime_ids: list[int] = []  # prompt_ids + response_ids
        self._mask: list[int] = []
        self._logprobs: list[float] = []
        self._logprobs_complete = True
        # Conversation state.
        self._messages: list[dict[str, Any]] = []
        self._tools: list[dict[str, Any]] | None = None
        self._tools_key = ""
        self._last_request: list[dict[str, Any]] | None = None
        self._last_response: dict[str, Any] | None = None
        self._last_stop_reason: str | None = None
        # Outcome and timing.
        self._stop: str | None = None
        self._error: str | None = None
        self._generation_s = 0.0
        self._tool_s = 0.0
        self._response_left_at: float | None = None
        self._turns: list[TurnRecord] = []

    # -- phase and timing -------------------------------------------------------------------

    def request_arrived(self) -> None:
        now = time.monotonic()
        if self._response_left_at is not None:
            self._tool_s += now - self._response_left_at
            self._response_left_at = None
        self._emit_phase("inference")

    def response_left(self) -> None:
        self._response_left_at = time.monotonic()
        self._emit_phase("tool")

    def _emit_phase(self, phase: Phase) -> None:
        if self.config.on_phase is None:
            return
        try:
            self.config.on_phase(phase)
        except Exception:  # a hook must never break the agent's request
            logger.exception("on_phase(%r) failed for session %s", phase, self.session_id)

    # -- result -------------------------------------------------------------------------------

    def result(self) -> SessionResult:
        """A consistent copy of the current state."""
        prompt_len = self._prompt_len or 0
        response_ids = self._runtime_ids[prompt_len:]
        return SessionResult(
            prompt_ids=list(self._runtime_ids[:prompt_len]),
            response_ids=list(response_ids),
            response_mask=list(self._mask),
            response_logprobs=list(self._logprobs) if self._logprobs_complete else None,
            messages=[dict(m) for m in self._messages],
            num_turns=len(self._turns),
            stop=self._stop,
            error=self._error,
            generation_s=self._generation_s,
            tool_s=self._tool_s,
            turns=list(self._turns),
        )

    def close(self) -> SessionResult:
        self.closed = True
        self.finished.set()
        return self.result()

    # -- the request ---------------------------------------------------------------------------

    async def chat(self, request: ChatCompletionRequest) -> dict[str, Any]:
        """Answer one chat-completions request.

        Returns:
            The ``chat.completion`` JSON object.

        Raises:
            ProxyError: 400 ``history_mismatch`` / ``context_length_exceeded`` /
                ``invalid_messages``, 404 when the session was closed meanwhile,
                500 ``backend_error`` / ``internal_error``, 503 ``generation_aborted``.
        """
        async with self._lock:
            try:
                return await self._chat_locked(request)
            except ProxyError:
                raise
            except Exception as exc:  # a bug or a builder/parser failure: keep the server serving
                logger.exception("session %s: unexpected error", self.session_id)
                self._error = f"internal_error: {type(exc).__name__}: {exc}"
                raise ProxyError(
                    500, "Internal error in the model proxy.", type="server_error", code="internal_error"
                ) from exc

    async def _chat_locked(self, request: ChatCompletionRequest) -> dict[str, Any]:
        """``chat`` with the session lock held."""
        if self.closed:
            raise session_not_found()
        messages = normalize_messages(request.messages)
        tools = normalize_tools(request.tools)
        if (
            self._last_request is not None
            and self._last_response is not None
            and tools_key(tools) == self._tools_key
            and same_history(messages, self._last_request)
        ):
            # A client retry (timeout, dropped connection) of the request just answered:
            # answer it again instead of sampling a second, unrecorded turn.
            return self._last_response
        self._refuse_if_stopped()
        if self._prompt_len is None:
            state = await self._initial_state(messages, tools)
        else:
            state = await self._extended_state(messages, tools)
        return await self._generate_turn(request, messages, state)

    def _refuse_if_stopped(self) -> None:
        if self._stop == "context_limit":
            raise context_length_exceeded("the session's response budget is used up")
        if self._stop == "aborted":
            raise _aborted_error()
        if self._last_stop_reason == "length":
            # A truncated turn has no end-of-turn token; context after it would be off-format.
            self._end_session("context_limit")
            raise context_length_exceeded("the previous turn reached its token limit without finishing")

    async def _initial_state(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> _State:
        builder = self.config.token_builder
        try:
            prompt_ids = await self._run_cpu(lambda: list(builder.build_initial_tokens(messages, tools=tools)))
        except (ValueError, TypeError, KeyError, jinja2.TemplateError) as exc:
            raise ProxyError(
                400, f"The messages cannot be rendered with the chat template: {exc}", code="invalid_messages"
            ) from exc
        limit = self.config.max_prompt_tokens
        if limit is not None and len(prompt_ids) > limit:
            self._end_session("context_limit")
            raise context_length_exceeded(f"the prompt has {len(prompt_ids)} tokens, more than the {limit}-token limit")
        return _State(
            runtime_ids=prompt_ids,
            mask=[],
            logprobs=[],
            messages=messages,
            tools=tools,
            context_tokens=0,
            prompt_len=len(prompt_ids),
        )

    async def _extended_state(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> _State:
        if tools_key(tools) != self._tools_key:
            self._error = "history_mismatch"
            raise history_mismatch("the tool definitions changed during the session")
        diverged = first_difference(self._messages, messages)
        if diverged is not None:
            self._error = "history_mismatch"
            raise history_mismatch(
                f"message {diverged} differs from the recorded conversation "
                f"({len(self._messages)} recorded, {len(messages)} received)"
            )
        tail = messages[len(self._messages) :]
        if not tail:
            self._error = "history_mismatch"
            raise history_mismatch("no new message after the last assistant turn")
        previous = self._messages
        updated = previous + tail
        builder = self.config.token_builder
        runtime_ids, mask = self._runtime_ids, self._mask
        logprobs = self._logprobs

        def merge() -> tuple[list[int], list[int], list[float]]:
            result = builder.merge_context_tokens(previous, updated, runtime_ids, tools=self._tools)
            new_mask, new_logprobs = builder.align_response_metadata(result, mask, logprobs)
            return list(result.token_ids), list(new_mask), list(new_logprobs or [])

        try:
            new_ids, new_mask, new_logprobs = await self._run_cpu(merge)
        except ValueError as exc:
            # verl's builder refuses tails it cannot tokenize append-only (e.g. ending
            # with an assistant message).
            self._error = "history_mismatch"
            raise history_mismatch(f"the new messages cannot be appended: {exc}") from exc
        if len(new_mask) >= self.config.max_response_tokens:
            self._end_session("context_limit")
            raise context_length_exceeded(
                f"appending {len(new_mask) - len(mask)} context tokens leaves no room in the "
                f"{self.config.max_response_tokens}-token response budget"
            )
        return _State(
            runtime_ids=new_ids,
            mask=new_mask,
            logprobs=new_logprobs,
            messages=updated,
            tools=self._tools,
            context_tokens=len(new_mask) - len(mask),
            prompt_len=self._prompt_len or 0,
        )

    async def _generate_turn(
        self, request: ChatCompletionRequest, request_messages: list[dict[str, Any]], state: _State
    ) -> dict[str, Any]:
        remaining = self.config.max_response_tokens - len(state.mask)
        if remaining <= 0:
            self._end_session("context_limit")
            raise context_length_exceeded(f"the {self.config.max_response_tokens}-token response budget is used up")
        agent_max = request.max_completion_tokens or request.max_tokens
        if agent_max is not None and agent_max < 1:
            raise ProxyError(400, "max_tokens must be at least 1.", param="max_tokens", code="invalid_value")
        max_tokens = min(agent_max, remaining) if agent_max is not None else remaining
        params = turn_sampling_params(
            self.config.sampling_params,
            max_tokens=max_tokens,
            agent_temperature=request.temperature,
            agent_top_p=request.top_p,
        )
        agent_params = {
            "temperature": request.temperature,
            "top_p": request.top_p,
            "max_tokens": agent_max,
        }

        started = time.monotonic()
        try:
            output = await self.config.backend.generate(self.request_id, list(state.runtime_ids), params)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._generation_s += time.monotonic() - started
            logger.exception("backend.generate failed for session %s", self.session_id)
            self._error = f"backend_error: {type(exc).__name__}: {exc}"
            raise ProxyError(
                500, f"The generation backend failed: {type(exc).__name__}", type="server_error", code="backend_error"
            ) from exc
        elapsed = time.monotonic() - started
        self._generation_s += elapsed
        try:
            _check_output(output)
        except ProxyError as exc:
            self._error = f"backend_error: {exc.message}"
            raise

        record = TurnRecord(
            index=len(self._turns),
            prompt_tokens=len(state.runtime_ids),
            context_tokens=state.context_tokens,
            completion_tokens=len(output.token_ids),
            finish_reason="abort",
            max_tokens=max_tokens,
            generate_ms=elapsed * 1000.0,
            agent_params=agent_params,
        )
        if self.closed:
            raise session_not_found()
        if output.stop_reason == "abort":
            # The agent never sees these tokens, so they are not part of its trajectory.
            self._turns.append(record)
            self._end_session("aborted")
            raise _aborted_error()

        builder = self.config.token_builder
        logprobs_given = output.logprobs is not None
        assistant_logprobs = list(output.logprobs) if logprobs_given else [0.0] * len(output.token_ids)

        def merge() -> tuple[list[int], list[int], list[float]]:
            result = builder.merge_assistant_tokens(state.runtime_ids, output.token_ids)
            new_mask, new_logprobs = builder.align_response_metadata(
                result, state.mask, state.logprobs, assistant_logprobs=assistant_logprobs
            )
            return list(result.token_ids), list(new_mask), list(new_logprobs or [])

        new_ids, new_mask, new_logprobs = await self._run_cpu(merge)
        parsed: ParsedTurn = await self._parser.parse(list(output.token_ids), with_tools=state.tools is not None)
        if output.stop_reason == "length":
            finish_reason = "length"
        elif parsed.tool_calls:
            finish_reason = "tool_calls"
        else:
            finish_reason = "stop"
        record.finish_reason = finish_reason
        record.num_tool_calls = len(parsed.tool_calls)
        response = ChatCompletionResponse(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=self.config.model_name,
            choices=[{"index": 0, "message": parsed.as_message(), "finish_reason": finish_reason}],
            usage={
                "prompt_tokens": len(state.runtime_ids),
                "completion_tokens": len(output.token_ids),
                "total_tokens": len(state.runtime_ids) + len(output.token_ids),
            },
        ).model_dump(mode="json")
        if self.closed:
            raise session_not_found()

        # Commit: one synchronous block, no awaits.
        if self._prompt_len is None:
            self._prompt_len = state.prompt_len
            self._tools = state.tools
            self._tools_key = tools_key(state.tools)
        self._runtime_ids, self._mask, self._logprobs = new_ids, new_mask, new_logprobs
        self._logprobs_complete = self._logprobs_complete and logprobs_given
        self._messages = state.messages + [parsed.as_message()]
        self._last_request = request_messages
        self._last_response = response
        self._last_stop_reason = output.stop_reason
        self._turns.append(record)
        return response

    def _end_session(self, stop: str) -> None:
        self._stop = stop
        self.finished.set()

    async def _run_cpu(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)


@dataclass
class _State:
    """A candidate token state for the next turn (committed only if the turn succeeds)."""

    runtime_ids: list[int]
    mask: list[int]
    logprobs: list[float]
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    context_tokens: int
    prompt_len: int


def _aborted_error() -> ProxyError:
    return ProxyError(
        503, "The generation was aborted by the rollout server.", type="server_error", code="generation_aborted"
    )


def _check_output(output: GenerationOutput) -> None:
    if output.logprobs is not None and len(output.logprobs) != len(output.token_ids):
        raise ProxyError(
            500,
            f"The backend returned {len(output.logprobs)} logprobs for {len(output.token_ids)} tokens.",
            type="server_error",
            code="backend_error",
        )
    if output.stop_reason not in ("stop", "length", "abort"):
        raise ProxyError(
            500, f"The backend returned stop_reason {output.stop_reason!r}.", type="server_error", code="backend_error"
        )
