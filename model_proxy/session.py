"""The exact token state of one rollout behind the proxy.

One ``ProxySession`` per trajectory. It owns the runtime token stream
``prompt_ids + response_ids`` of the CURRENT SEGMENT and its response-side
``response_mask`` / ``response_logprobs``, built ONLY through verl's Continuous
Token builder (``verl.utils.tokenizer.continuous_token``), the machinery verl's own
``ToolAgentLoop`` uses:

- first request of a segment: ``build_initial_tokens(messages, tools=tools)`` -> prompt_ids;
- every generated turn: the sampled ids are appended verbatim with
  ``merge_assistant_tokens`` + ``align_response_metadata(..., assistant_logprobs=...)``
  (mask 1, the backend's logprobs);
- every later request: the messages appended since the recorded history (tool
  results, user messages) are tokenized with ``merge_context_tokens`` (mask 0,
  logprob 0.0; boundary tokens the builder inserts, e.g. Qwen's ``\\n`` after
  ``<|im_end|>``, are mask 0 too).

The whole conversation is never re-tokenized (verl's docs: re-applying the chat
template "makes PPO training not even converge").

Segments. When a request's history does not extend the recorded one (a history
processor elided an old observation, the agent compacted its context, the tool list
changed), ``SessionConfig.on_history_rewrite`` decides:

- ``"new_segment"`` (default): the current segment is closed as it is and a new one
  starts from the request's full history (a new initial prompt, mask 0 throughout;
  its response budget starts again). verl's v1 trainer takes one ``AgentLoopOutput``
  per segment. Every assistant message in the new history must be one this session
  produced (or one the session's first request already carried, e.g. SWE-agent
  demonstrations): a history with any other assistant text is refused with
  ``unknown_assistant_message``, because it would put text the policy never sampled
  where the agent claims it did.
- ``"error"``: the request is refused with ``history_mismatch`` (400) and the token
  state is untouched.

Budget: each segment's response side may not exceed ``max_response_tokens``;
a turn is given at most the remaining budget as ``max_tokens``; a turn cut there (or
at the agent's own ``max_tokens``) is answered with ``finish_reason: "length"`` and
ends the session (``stop = "context_limit"``, ``handle.finished`` set): appending
context after a truncated turn (no end-of-turn token) would train on a token
sequence the chat format never produces, so the next request is refused with
``context_length_exceeded``. So is a request whose appended context leaves no room.

Builder work is CPU-bound: small renders (``inline_tokenize_max_chars``) run in
line, larger ones in the server's executor; between awaits the session mutates its
state in one synchronous block, so a concurrent
``close_session`` always sees a consistent snapshot. Requests of one session are
serialized by a lock.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from array import array
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal

import jinja2
from verl.utils.tokenizer.continuous_token import ContinuousTokenBuilder

from .backends.base import GenerationBackend, GenerationOutput, StopReason
from .errors import ProxyError, context_length_exceeded, history_mismatch, session_not_found
from .messages import first_difference, message_key, normalize_messages, normalize_tools, tools_key
from .profiling import ProfileWriter
from .sampling import turn_sampling_params
from .schemas import ChatCompletionRequest, ChatCompletionResponse
from .tool_format import ParsedTurn, TurnParser

logger = logging.getLogger(__name__)

Phase = Literal["inference", "tool"]
HistoryRewritePolicy = Literal["new_segment", "error"]


class SessionStop(str, Enum):
    """Why a session accepts no more turns (``SessionResult.stop``); the agent loop maps
    these to its exit statuses (``recipe.swe_agent_loop``)."""

    CONTEXT_LIMIT = "context_limit"  # the response budget is used up, or a turn was cut by max_tokens
    ABORTED = "aborted"  # the backend aborted a generation (e.g. a weight sync)


@dataclass
class SessionConfig:
    """What one rollout's session needs.

    Attributes:
        backend: generates a turn from prompt ids (``backends.base.GenerationBackend``).
        tokenizer: the policy's Hugging Face tokenizer (decode, special ids, tool parser).
        token_builder: verl Continuous Token builder for that tokenizer
            (``AgentLoopBase.continuous_token_builder`` or
            ``create_continuous_token_builder(tok, hf_model_type=...)``).
        max_response_tokens: budget for one segment's ``response_ids`` (sampled +
            appended context), normally verl's ``rollout.response_length``.
        max_prompt_tokens: limit for a segment's first prompt (verl's
            ``rollout.prompt_length``: verl pads every prompt to it, so a longer one
            cannot be trained on); None = no limit. A longer prompt is refused with
            ``context_length_exceeded`` and ends the session.
        sampling_params: the trainer's sampling parameters (vLLM keys); they win over
            the agent's temperature/top_p.
        tool_parser: verl tool-parser name for the model's tool-call format.
        model_name: the name reported in responses and ``/v1/models``.
        request_id: stable id sent with every ``generate`` (sticky routing / prefix
            cache); a fresh uuid when None.
        on_phase: called with ``"inference"`` when a request arrives and ``"tool"``
            when its response leaves (resource-shim hook; must be quick, exceptions
            are logged and ignored).
        on_history_rewrite: ``"new_segment"`` (close the segment, start a new one from
            the rewritten history) or ``"error"`` (refuse with ``history_mismatch``).
            See the module doc.
        profile_log_dir: directory for this session's per-call JSONL profile lines
            (``profiling.py``); None = the server's ``profile_log_dir`` (itself off by
            default).
        max_turn_tokens: tokens one turn may sample at most, whatever the agent asks
            (mini-swe-agent sends no ``max_tokens``, so without it one rambling turn
            could use the whole response budget); None = only the budget limits it.
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
    on_history_rewrite: HistoryRewritePolicy = "new_segment"
    profile_log_dir: str | None = None
    max_turn_tokens: int | None = None


@dataclass
class TurnRecord:
    """One assistant turn sent to the backend (an aborted one included).

    Attributes:
        index: 0-based assistant-turn number over the whole session.
        segment: 0-based segment the turn belongs to.
        prompt_tokens: length of the prompt sent to the backend.
        context_tokens: tokens appended (mask 0) before this turn, boundary tokens
            included (a segment's first turn: 0).
        completion_tokens: sampled tokens kept (mask 1).
        finish_reason: what the agent got: "stop", "tool_calls", "length", or
            "abort" (answered with an error).
        max_tokens: the per-turn limit passed to the backend.
        generate_ms: wall time inside ``backend.generate``, milliseconds.
        queue_ms: from the request's arrival at the server to the ``generate`` call
            (session lock wait, body parsing, tokenization), milliseconds.
        agent_params: what the agent asked for (temperature, top_p, max_tokens, stop,
            stream), not applied except max_tokens as an upper bound.
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
    segment: int = 0
    queue_ms: float = 0.0


@dataclass
class Segment:
    """One append-only token stream of a session (one verl ``AgentLoopOutput``).

    Invariant: ``len(response_ids) == len(response_mask) == len(response_logprobs)``
    (when logprobs is not None); ``prompt_ids + response_ids`` is exactly the last
    prompt the backend received in this segment plus the ids it sampled then.

    Attributes:
        prompt_ids: the segment's first prompt (``build_initial_tokens`` of the full
            history the agent sent).
        response_ids: everything after it: sampled turns and appended context.
        response_mask: 1 on sampled tokens, 0 on context and builder-inserted tokens.
        response_logprobs: per response token, 0.0 where mask is 0; None when some
            turn's backend returned no logprobs.
        messages: the conversation of this segment (normalised requests + assistant
            turns as returned).
        num_turns: assistant turns generated in this segment.
        first_turn: session-wide index of its first turn (``TurnRecord.index``).
    """

    prompt_ids: list[int]
    response_ids: list[int]
    response_mask: list[int]
    response_logprobs: list[float] | None
    messages: list[dict[str, Any]]
    num_turns: int
    first_turn: int = 0


@dataclass
class SessionResult:
    """The training record of one session (``ModelProxyServer.close_session``).

    ``prompt_ids``, ``response_ids``, ``response_mask``, ``response_logprobs`` and
    ``messages`` describe the LAST segment (the whole session when the agent never
    rewrote its history; empty lists when no turn was generated). ``segments`` lists
    every segment in order, the last one included, so a loop returns
    ``[one AgentLoopOutput per segment]``. ``num_turns``, ``turns``, ``generation_s``,
    ``tool_s``, ``stop`` and ``error`` cover the whole session.

    Attributes:
        prompt_ids: the last segment's first prompt.
        response_ids: the last segment's response side.
        response_mask: 1 on sampled tokens, 0 on context and builder-inserted tokens.
        response_logprobs: per response token, 0.0 where mask is 0; None when some
            turn's backend returned no logprobs.
        messages: the last segment's conversation.
        num_turns: assistant turns generated in the whole session.
        stop: None or a ``SessionStop``.
        error: None or the last refusal that indicates a broken protocol
            (``"history_mismatch"``, ``"unknown_assistant_message"``,
            ``"backend_error: ..."``).
        generation_s: total seconds inside ``backend.generate``.
        tool_s: total seconds between a response leaving and the next request arriving.
        agent_start_s: seconds from the session's opening to its first request (the whole
            session so far when none came): the agent process's start.
        request_s: total seconds from a request arriving to its response leaving (answered
            requests; ``generation_s`` is inside it, the rest is the proxy's own work).
        turns: per-turn records.
        segments: every segment (``[]`` when no turn was generated).
        min_weight_version, max_weight_version: the oldest and newest policy versions
            that sampled a turn (``GenerationOutput.weight_version``); None when unknown.
    """

    prompt_ids: list[int]
    response_ids: list[int]
    response_mask: list[int]
    response_logprobs: list[float] | None
    messages: list[dict[str, Any]]
    num_turns: int
    stop: SessionStop | None
    error: str | None
    generation_s: float
    tool_s: float
    turns: list[TurnRecord]
    agent_start_s: float = 0.0
    request_s: float = 0.0
    segments: list[Segment] = field(default_factory=list)
    min_weight_version: int | None = None
    max_weight_version: int | None = None


@dataclass
class ChatOutcome:
    """A successful answer: the ``chat.completion`` object and what it cost.

    ``record`` is None when the request was a client retry answered from the cache
    (no new sample, nothing to profile).
    """

    response: ChatCompletionResponse
    record: TurnRecord | None


class ProxySession:
    """Token state and request handling of one rollout (see module doc)."""

    def __init__(
        self,
        session_id: str,
        api_key: str,
        config: SessionConfig,
        executor: Executor,
        profile: ProfileWriter | None = None,
        inline_tokenize_max_chars: int = 0,
    ) -> None:
        if config.max_response_tokens <= 0:
            raise ValueError(f"max_response_tokens must be positive, got {config.max_response_tokens}")
        if config.on_history_rewrite not in ("new_segment", "error"):
            raise ValueError(
                f"on_history_rewrite must be 'new_segment' or 'error', got {config.on_history_rewrite!r}"
            )
        self.session_id = session_id
        self.api_key = api_key
        self.config = config
        self.request_id = config.request_id or uuid.uuid4().hex
        self.finished = asyncio.Event()
        self.closed = False
        self.profile = profile
        self._executor = executor
        self._inline_tokenize_max_chars = inline_tokenize_max_chars
        self._lock = asyncio.Lock()
        self._parser = TurnParser(config.tokenizer, config.tool_parser)
        # Token state of the current segment; None until its first request is tokenized.
        self._prompt_len: int | None = None
        # Kept out of the young GC generations: a new list (or tuple) of a session's ~10^4
        # ids per turn would be traversed by the next young collection, one of which runs
        # every few dozen requests and stalls every session (``bench/proxy_overhead.py``).
        # So the ids are ONE list per session, overwritten in place at each commit (it ages
        # into the oldest generation, which only full collections visit), and mask and
        # logprobs are typed arrays, which the GC never traverses (``_aligned``).
        self._runtime_ids: list[int] = []  # prompt_ids + response_ids
        self._mask = array("b")
        self._logprobs = array("d")
        self._logprobs_complete = True
        self._segment_first_turn = 0
        self._segment_turns = 0  # committed turns of the current segment
        self._closed_segments: list[Segment] = []
        # Conversation state.
        self._messages: list[dict[str, Any]] = []
        self._message_keys: list[tuple[Any, ...]] = []  # message_key of each recorded message
        self._tools: list[dict[str, Any]] | None = None
        self._tools_key = ""
        # Length of the last answered request's history: its message keys are
        # ``_message_keys[:_last_request_len]`` (keys, not the request's dicts, are kept so
        # each request's copy of the history does not outlive it and load the cyclic GC).
        self._last_request_len: int | None = None
        self._last_response: ChatCompletionResponse | None = None
        self._last_stop_reason: StopReason | None = None
        # Assistant messages a new segment may contain (message_key): every turn this
        # session produced, plus those in its first request (demonstrations).
        self._known_assistant: set[tuple[Any, ...]] = set()
        # Outcome and timing.
        self._stop: SessionStop | None = None
        self._error: str | None = None
        self._generation_s = 0.0
        self._tool_s = 0.0
        self._min_version: int | None = None
        self._max_version: int | None = None
        self._response_left_at: float | None = None
        self._opened_at = time.monotonic()
        self._first_request_at: float | None = None
        self._request_arrived_at: float | None = None
        self._request_s = 0.0
        self._turns: list[TurnRecord] = []

    # -- phase and timing -------------------------------------------------------------------

    def request_arrived(self) -> None:
        now = time.monotonic()
        if self._first_request_at is None:
            self._first_request_at = now
        self._request_arrived_at = now
        if self._response_left_at is not None:
            duration = now - self._response_left_at
            self._tool_s += duration
            self._response_left_at = None
            if self.profile is not None:
                self.profile.write(
                    {
                        "type": "tool_phase",
                        "session": self.session_id,
                        "request_id": self.request_id,
                        "turn": len(self._turns) - 1,
                        "duration_ms": duration * 1000.0,
                    }
                )
        self._emit_phase("inference")

    def response_left(self) -> None:
        self._response_left_at = time.monotonic()
        if self._request_arrived_at is not None:
            self._request_s += self._response_left_at - self._request_arrived_at
            self._request_arrived_at = None
        self._emit_phase("tool")

    def _emit_phase(self, phase: Phase) -> None:
        if self.config.on_phase is None:
            return
        try:
            self.config.on_phase(phase)
        except Exception:  # a hook must never break the agent's request
            logger.exception("on_phase(%r) failed for session %s", phase, self.session_id)

    # -- result -------------------------------------------------------------------------------

    def _current_segment(self) -> Segment | None:
        if self._prompt_len is None or self._segment_turns == 0:
            return None
        prompt_len = self._prompt_len
        return Segment(
            prompt_ids=list(self._runtime_ids[:prompt_len]),
            response_ids=list(self._runtime_ids[prompt_len:]),
            response_mask=list(self._mask),
            response_logprobs=list(self._logprobs) if self._logprobs_complete else None,
            messages=[dict(m) for m in self._messages],
            num_turns=self._segment_turns,
            first_turn=self._segment_first_turn,
        )

    def result(self) -> SessionResult:
        """A consistent copy of the current state."""
        current = self._current_segment()
        segments = list(self._closed_segments) + ([current] if current is not None else [])
        last = segments[-1] if segments else Segment([], [], [], [], [], 0)
        return SessionResult(
            prompt_ids=list(last.prompt_ids),
            response_ids=list(last.response_ids),
            response_mask=list(last.response_mask),
            response_logprobs=None if last.response_logprobs is None else list(last.response_logprobs),
            messages=[dict(m) for m in last.messages],
            num_turns=len(self._turns),
            stop=self._stop,
            error=self._error,
            generation_s=self._generation_s,
            tool_s=self._tool_s,
            agent_start_s=(self._first_request_at or time.monotonic()) - self._opened_at,
            request_s=self._request_s,
            turns=list(self._turns),
            segments=segments,
            min_weight_version=self._min_version,
            max_weight_version=self._max_version,
        )

    def close(self) -> SessionResult:
        self.closed = True
        self.finished.set()
        return self.result()

    # -- the request ---------------------------------------------------------------------------

    async def chat(self, request: ChatCompletionRequest, arrived: float | None = None) -> ChatOutcome:
        """Answer one chat-completions request.

        Args:
            request: the validated request.
            arrived: ``time.perf_counter()`` when the request reached the server (for
                ``TurnRecord.queue_ms``); now when None.

        Returns:
            ``ChatOutcome`` with the ``chat.completion`` JSON object.

        Raises:
            ProxyError: 400 ``history_mismatch`` / ``unknown_assistant_message`` /
                ``context_length_exceeded`` / ``invalid_messages`` / ``concurrent_request``
                (another request was answered while this one waited, and this one is not
                its retry), 404 when the
                session was closed meanwhile, 500 ``backend_error`` /
                ``internal_error``, 503 ``generation_aborted``.
        """
        arrived = time.perf_counter() if arrived is None else arrived
        answered_before = len(self._turns)
        async with self._lock:
            try:
                return await self._chat_locked(request, arrived, answered_before)
            except ProxyError:
                raise
            except Exception as exc:  # a bug or a builder/parser failure: keep the server serving
                logger.exception("session %s: unexpected error", self.session_id)
                self._error = f"internal_error: {type(exc).__name__}: {exc}"
                raise ProxyError(
                    500, "Internal error in the model proxy.", type="server_error", code="internal_error"
                ) from exc

    async def _chat_locked(self, request: ChatCompletionRequest, arrived: float, answered_before: int) -> ChatOutcome:
        """``chat`` with the session lock held; ``answered_before``: turns answered when the
        request arrived."""
        if self.closed:
            raise session_not_found()
        messages = normalize_messages(request.messages)
        tools = normalize_tools(request.tools)
        key = tools_key(tools)
        if (
            self._last_request_len is not None
            and self._last_response is not None
            and len(messages) == self._last_request_len
            and key == self._tools_key
            and first_difference(self._message_keys[: self._last_request_len], messages) is None
        ):
            # A client retry (timeout, dropped connection) of the request just answered:
            # answer it again instead of sampling a second, unrecorded turn.
            return ChatOutcome(self._last_response, None)
        if len(self._turns) != answered_before:
            # It was sent before the answer it waited for existed, so it cannot extend it: taking
            # it would silently fork the session into a new segment per concurrent request.
            raise ProxyError(
                400,
                "Another request on this session was answered while this one waited; requests on one "
                "session must be sent one at a time (send the next after reading the answer).",
                code="concurrent_request",
                param="messages",
            )
        self._refuse_if_stopped()
        if self._prompt_len is None:
            state = await self._initial_state(messages, tools, key, first=True)
        else:
            state = await self._extended_state(messages, tools, key)
        return await self._generate_turn(request, messages, state, arrived)

    def _refuse_if_stopped(self) -> None:
        if self._stop is SessionStop.CONTEXT_LIMIT:
            raise context_length_exceeded("the session's response budget is used up")
        if self._stop is SessionStop.ABORTED:
            raise _aborted_error()
        if self._last_stop_reason == "length":  # (stop is already "context_limit" then)
            # A truncated turn has no end-of-turn token; context after it would be off-format.
            self._end_session(SessionStop.CONTEXT_LIMIT)
            raise context_length_exceeded("the previous turn reached its token limit without finishing")

    async def _initial_state(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, key: str, *, first: bool
    ) -> _State:
        """A new segment's state: ``build_initial_tokens`` of the whole history."""
        builder = self.config.token_builder
        try:
            prompt_ids = await self._run_cpu(
                lambda: list(builder.build_initial_tokens(messages, tools=tools)), _text_chars(messages, key)
            )
        except (ValueError, TypeError, KeyError, jinja2.TemplateError) as exc:
            raise ProxyError(
                400, f"The messages cannot be rendered with the chat template: {exc}", code="invalid_messages"
            ) from exc
        limit = self.config.max_prompt_tokens
        if limit is not None and len(prompt_ids) > limit:
            self._end_session(SessionStop.CONTEXT_LIMIT)
            raise context_length_exceeded(f"the prompt has {len(prompt_ids)} tokens, more than the {limit}-token limit")
        return _State(
            runtime_ids=prompt_ids,
            mask=array("b"),
            logprobs=array("d"),
            messages=messages,
            tools=tools,
            context_tokens=0,
            prompt_len=len(prompt_ids),
            new_segment=True,
            first_request=first,
        )

    def _rewrite(self, messages: list[dict[str, Any]], reason: str) -> None:
        """Refuse a rewritten history (policy "error"), or check it may start a segment.

        Raises:
            ProxyError(400, history_mismatch): policy "error".
            ProxyError(400, unknown_assistant_message): the history carries an assistant
                message this session never produced.
        """
        if self.config.on_history_rewrite == "error":
            self._error = "history_mismatch"
            raise history_mismatch(reason)
        for index, message in enumerate(messages):
            if message["role"] == "assistant" and message_key(message) not in self._known_assistant:
                self._error = "unknown_assistant_message"
                raise ProxyError(
                    400,
                    f"Message {index} is an assistant message this session never produced; "
                    "only the proxy's own answers may appear as assistant turns.",
                    code="unknown_assistant_message",
                    param="messages",
                )

    async def _extended_state(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, key: str
    ) -> _State:
        if key != self._tools_key:
            self._rewrite(messages, "the tool definitions changed during the session")
            return await self._initial_state(messages, tools, key, first=False)
        diverged = first_difference(self._message_keys, messages)
        if diverged is not None:
            self._rewrite(
                messages,
                f"message {diverged} differs from the recorded conversation "
                f"({len(self._messages)} recorded, {len(messages)} received)",
            )
            return await self._initial_state(messages, tools, key, first=False)
        tail = messages[len(self._messages) :]
        if not tail:
            self._error = "history_mismatch"
            raise history_mismatch("no new message after the last assistant turn")
        if any(m["role"] == "assistant" for m in tail):
            # verl's builder cannot append assistant text as context (it would carry mask 0 where
            # the policy's own samples belong): a history re-inserting assistant turns is a rewrite,
            # and one with assistant text the session never produced is refused (_rewrite).
            self._rewrite(messages, "the new messages contain an assistant message")
            return await self._initial_state(messages, tools, key, first=False)
        previous = self._messages
        updated = previous + tail
        builder = self.config.token_builder
        runtime_ids, mask = self._runtime_ids, self._mask
        logprobs = self._logprobs

        def merge() -> tuple[list[int], array, array]:
            result = builder.merge_context_tokens(previous, updated, runtime_ids, tools=self._tools)
            return (result.token_ids, *_aligned(builder, result, mask, logprobs))

        try:
            new_ids, new_mask, new_logprobs = await self._run_cpu(merge, _text_chars(tail, self._tools_key))
        except ValueError as exc:
            # verl's builder refuses tails it cannot tokenize append-only.
            self._error = "history_mismatch"
            raise history_mismatch(f"the new messages cannot be appended: {exc}") from exc
        if len(new_mask) >= self.config.max_response_tokens:
            self._end_session(SessionStop.CONTEXT_LIMIT)
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
        self, request: ChatCompletionRequest, request_messages: list[dict[str, Any]], state: _State, arrived: float
    ) -> ChatOutcome:
        """Sample, answer and record one assistant turn on top of ``state``."""
        max_tokens, params, agent_params = self._turn_params(request, state)
        started = time.perf_counter()
        output = await self._sample(state, params)
        elapsed = time.perf_counter() - started
        # The segment this turn will belong to: a new segment closes the current one if it has turns.
        segment = len(self._closed_segments) + (1 if state.new_segment and self._segment_turns > 0 else 0)
        record = TurnRecord(
            index=len(self._turns),
            prompt_tokens=len(state.runtime_ids),
            context_tokens=state.context_tokens,
            completion_tokens=len(output.token_ids),
            finish_reason="abort",
            max_tokens=max_tokens,
            generate_ms=elapsed * 1000.0,
            agent_params=agent_params,
            segment=segment,
            queue_ms=(started - arrived) * 1000.0,
        )
        if self.closed:
            raise session_not_found()
        if output.stop_reason == "abort":
            # The agent never sees these tokens, so they are not part of its trajectory.
            self._turns.append(record)  # in no segment: no tokens were kept
            self._end_session(SessionStop.ABORTED)
            raise _aborted_error()
        parsed, response = await self._answer(output, state)
        record.finish_reason = response.choices[0].finish_reason
        record.num_tool_calls = len(parsed.tool_calls)
        if self.closed:
            raise session_not_found()
        self._commit(state, output, parsed, response, record, len(request_messages))
        return ChatOutcome(response, record)

    def _turn_params(
        self, request: ChatCompletionRequest, state: _State
    ) -> tuple[int, dict[str, Any], dict[str, Any]]:
        """The turn's token limit, the backend's sampling parameters and what the agent asked for.

        Raises:
            ProxyError(400): the response budget is used up (``context_length_exceeded``,
                the session ends), or ``max_tokens < 1``.
        """
        remaining = self.config.max_response_tokens - len(state.mask)
        if remaining <= 0:
            self._end_session(SessionStop.CONTEXT_LIMIT)
            raise context_length_exceeded(f"the {self.config.max_response_tokens}-token response budget is used up")
        agent_max = request.max_completion_tokens or request.max_tokens
        if agent_max is not None and agent_max < 1:
            raise ProxyError(400, "max_tokens must be at least 1.", param="max_tokens", code="invalid_value")
        # The per-turn limit: the segment's remaining response budget, lowered by the agent's and the cap.
        max_tokens = min(n for n in (agent_max, remaining, self.config.max_turn_tokens) if n is not None)
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
            "stop": getattr(request, "stop", None),
            "stream": bool(request.stream),
        }
        return max_tokens, params, agent_params

    async def _sample(self, state: _State, params: dict[str, Any]) -> GenerationOutput:
        """``backend.generate`` on the state's tokens, its time counted, its failures mapped.

        Raises:
            ProxyError(500, backend_error): the backend raised or returned a malformed output
                (recorded as the session's error).
        """
        started = time.perf_counter()
        try:
            output = await self.config.backend.generate(self.request_id, list(state.runtime_ids), params)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("backend.generate failed for session %s", self.session_id)
            self._error = f"backend_error: {type(exc).__name__}: {exc}"
            raise ProxyError(
                500, f"The generation backend failed: {type(exc).__name__}", type="server_error", code="backend_error"
            ) from exc
        finally:
            self._generation_s += time.perf_counter() - started
        try:
            _check_output(output)
        except ProxyError as exc:
            self._error = f"backend_error: {exc.message}"
            raise
        return output

    async def _answer(self, output: GenerationOutput, state: _State) -> tuple[ParsedTurn, ChatCompletionResponse]:
        """The sampled tokens as an OpenAI ``chat.completion`` (tool calls parsed)."""
        parsed: ParsedTurn = await self._parser.parse(list(output.token_ids), with_tools=state.tools is not None)
        if output.stop_reason == "length":
            finish_reason = "length"
        elif parsed.tool_calls:
            finish_reason = "tool_calls"
        else:
            finish_reason = "stop"
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
        )
        return parsed, response

    def _commit(
        self,
        state: _State,
        output: GenerationOutput,
        parsed: ParsedTurn,
        response: ChatCompletionResponse,
        record: TurnRecord,
        request_len: int,
    ) -> None:
        """Make the turn part of the session: one synchronous block, no awaits, so a
        concurrent close or a cancelled request never leaves half a turn."""
        builder = self.config.token_builder
        logprobs_given = output.logprobs is not None
        assistant_logprobs = list(output.logprobs) if logprobs_given else [0.0] * len(output.token_ids)
        # Inline, not in the executor: list concatenation, microseconds even for long streams,
        # cheaper than a thread hop.
        result = builder.merge_assistant_tokens(state.runtime_ids, output.token_ids)
        new_mask, new_logprobs = _aligned(builder, result, state.mask, state.logprobs,
                                          assistant_logprobs=assistant_logprobs)
        if state.new_segment:
            current = self._current_segment()
            if current is not None:
                self._closed_segments.append(current)
            if state.first_request:
                self._known_assistant.update(message_key(m) for m in state.messages if m["role"] == "assistant")
            self._segment_first_turn = len(self._turns)
            self._segment_turns = 0
            self._prompt_len = state.prompt_len
            self._tools = state.tools
            self._tools_key = tools_key(state.tools)
            self._logprobs_complete = True
        self._runtime_ids[:] = result.token_ids  # in place: see __init__
        self._mask, self._logprobs = new_mask, new_logprobs
        self._logprobs_complete = self._logprobs_complete and logprobs_given
        assistant = parsed.as_message()
        self._known_assistant.add(message_key(assistant))
        self._messages = state.messages + [assistant]
        if state.new_segment:
            self._message_keys = [message_key(m) for m in self._messages]
        else:
            self._message_keys = self._message_keys + [message_key(m) for m in self._messages[len(self._message_keys):]]
        self._last_request_len = request_len
        self._last_response = response
        self._last_stop_reason = output.stop_reason
        if output.weight_version is not None:
            versions = [v for v in (self._min_version, self._max_version) if v is not None] + [output.weight_version]
            self._min_version, self._max_version = min(versions), max(versions)
        self._turns.append(record)
        self._segment_turns += 1
        if output.stop_reason == "length":
            # The turn is answered (finish_reason "length"), but nothing may follow it: the
            # episode ends here, and the next request is refused with context_length_exceeded.
            self._end_session(SessionStop.CONTEXT_LIMIT)

    def _end_session(self, stop: SessionStop) -> None:
        self._stop = stop
        self.finished.set()

    async def _run_cpu(self, fn: Callable[[], Any], text_chars: int) -> Any:
        """``fn()`` (chat-template rendering + tokenization of about ``text_chars`` characters).

        Small work runs in line: a thread hop and the GIL handoffs around it cost more
        than tokenizing a few KiB (``bench/proxy_overhead.py``); larger work goes to
        the executor so the event loop keeps serving other sessions.
        """
        if text_chars <= self._inline_tokenize_max_chars:
            return fn()
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)


@dataclass
class _State:
    """A candidate token state for the next turn (committed only if the turn succeeds)."""

    runtime_ids: Sequence[int]
    mask: array  # array("b")
    logprobs: array  # array("d")
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    context_tokens: int
    prompt_len: int
    new_segment: bool = False
    first_request: bool = False


def _aligned(
    builder: Any, result: Any, mask: array, logprobs: array, *, assistant_logprobs: list[float] | None = None
) -> tuple[array, array]:
    """verl's ``align_response_metadata`` for a merge, on typed arrays.

    verl's alignment only edits the end of the metadata: it trims the entries of
    ``result.removed_prefix_token_count`` trimmed tokens, then appends entries for the
    inserted and appended tokens (``ContinuousTokenBuilder.align_response_metadata``,
    its docstring and code). So it is given just the entries it may trim, and the
    untouched head is copied as an array: no per-token Python objects per request. A
    builder that overrides the alignment gets the whole metadata instead.

    Returns:
        (mask as ``array("b")``, logprobs as ``array("d")``), one entry per response token.
    """
    if getattr(type(builder), "align_response_metadata", None) is not ContinuousTokenBuilder.align_response_metadata:
        keep = 0
    else:
        keep = max(0, len(mask) - result.removed_prefix_token_count)
    tail_mask, tail_logprobs = builder.align_response_metadata(
        result, list(mask[keep:]), list(logprobs[keep:]), assistant_logprobs=assistant_logprobs
    )
    return mask[:keep] + array("b", tail_mask), logprobs[:keep] + array("d", tail_logprobs or ())


def _text_chars(messages: list[dict[str, Any]], tools_json: str) -> int:
    """Characters a render of ``messages`` with the tools of ``tools_json`` (``tools_key``)
    tokenizes, roughly (template text aside)."""
    size = sum(len(m.get("content") or "") for m in messages)
    size += sum(len(c["function"]["arguments"]) for m in messages for c in m.get("tool_calls") or [])
    return size + len(tools_json)


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
