"""Start-up check: does verl's continuous-token builder reproduce the chat template?

The proxy never re-renders a conversation: it keeps the sampled ids and appends
each new message through verl's continuous-token builder. The builder family is
picked from the model config's ``model_type`` (``create_continuous_token_builder``);
an unregistered type (e.g. ``llama``) gets verl's generic builder, which does not
insert the ``\\n`` a ChatML template puts after ``<|im_end|>``, so every appended
message shifts the training tokens away from what the template (and the model at
inference) sees. ``check_token_builder`` catches that before any rollout: it
replays a probe conversation (tool calls, tool results, plain turns) through the
builder the way a session does, with each assistant turn sampled exactly as the
template renders it up to the end-of-turn token, and compares the result with the
tokenizer's own render of the whole conversation.
"""

from __future__ import annotations

import json
from typing import Any

from verl.utils.tokenizer.continuous_token_wiring import create_continuous_token_builder

_BASH_TOOL = {
    "type": "function",
    "function": {
        "name": "bash",
        "description": "Run a bash command.",
        "parameters": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]},
    },
}


class TokenBuilderMismatch(ValueError):
    """The builder's tokens differ from the chat template's render (the message names the fix)."""


def _probe(with_tools: bool) -> list[dict[str, Any]]:
    call = {"id": "call_0", "type": "function",
            "function": {"name": "bash", "arguments": json.dumps({"command": "ls -la"})}}
    assistant_call = {"role": "assistant", "content": "Let me look.", "tool_calls": [call]} if with_tools else {
        "role": "assistant", "content": "Let me look.\n```bash\nls -la\n```"}
    observation = {"role": "tool", "tool_call_id": "call_0", "content": "a.py\nb.py"} if with_tools else {
        "role": "user", "content": "<output>\na.py\nb.py\n</output>"}
    return [
        {"role": "system", "content": "You are a careful engineer."},
        {"role": "user", "content": "Fix the bug in a.py."},
        assistant_call,
        observation,
        {"role": "assistant", "content": "Done."},
        {"role": "user", "content": "Submit."},
    ]


def _ids(tokenizer: Any, messages: list[dict[str, Any]], tools: Any, generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, add_generation_prompt=generation_prompt)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def _eos_ids(tokenizer: Any) -> set[int]:
    eos = tokenizer.eos_token_id
    return {eos} if isinstance(eos, int) else set(eos or [])


def _sampled(tokenizer: Any, before: list[dict[str, Any]], assistant: dict[str, Any], tools: Any) -> list[int]:
    """The ids a model following the template samples for ``assistant``: its render up to end-of-turn."""
    prompt = _ids(tokenizer, before, tools, True)
    full = _ids(tokenizer, [*before, assistant], tools, False)
    if full[: len(prompt)] != prompt:
        raise TokenBuilderMismatch("the chat template renders an assistant turn that does not extend its prompt")
    turn = full[len(prompt):]
    ends = [i for i, t in enumerate(turn) if t in _eos_ids(tokenizer)]
    if not ends:
        raise TokenBuilderMismatch(
            f"the chat template does not end assistant turns with the eos token {tokenizer.eos_token!r}: "
            "generation would never stop at a turn boundary (fix the tokenizer's eos_token)"
        )
    return turn[: ends[0] + 1]


def replay(tokenizer: Any, builder: Any, messages: list[dict[str, Any]], tools: Any) -> list[int]:
    """The ids a proxy session holds after ``messages`` (which end with a user or tool message)."""
    first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    ids = list(builder.build_initial_tokens(messages[:first], tools=tools))
    done = first
    while done < len(messages):
        message = messages[done]
        if message["role"] == "assistant":
            ids = builder.merge_assistant_tokens(ids, _sampled(tokenizer, messages[:done], message, tools)).token_ids
            done += 1
            continue
        end = done
        while end < len(messages) and messages[end]["role"] != "assistant":
            end += 1
        ids = builder.merge_context_tokens(messages[:done], messages[:end], ids, tools=tools).token_ids
        done = end
    return list(ids)


def check_token_builder(tokenizer: Any, builder: Any, *, family: str = "auto") -> None:
    """Raise unless ``builder`` rebuilds the probe conversations exactly as the template renders them.

    Both agent modes are probed: with the bash tool (tool calls and tool results)
    and without tools (plain text turns).

    Raises:
        TokenBuilderMismatch: the first differing position, both tokens, and the setting to change.
    """
    for with_tools in (True, False):
        tools = [_BASH_TOOL] if with_tools else None
        messages = _probe(with_tools)
        expected = _ids(tokenizer, messages, tools, True)
        try:
            got = replay(tokenizer, builder, messages, tools)
        except TokenBuilderMismatch:
            raise
        except Exception as exc:  # verl's builder refuses what it cannot append
            raise TokenBuilderMismatch(
                f"verl's continuous-token builder ({type(builder).__name__}, family {family!r}) cannot replay "
                f"this chat template ({type(exc).__name__}: {exc}); set swe_agent.proxy.token_builder to the "
                "family of the template (e.g. qwen for ChatML)"
            ) from exc
        if got != expected:
            at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
            raise TokenBuilderMismatch(
                f"verl's continuous-token builder ({type(builder).__name__}, family {family!r}) diverges from the "
                f"chat template at token {at} ({'tools' if with_tools else 'text'} probe): builder "
                f"{tokenizer.decode(got[max(0, at - 8): at + 4])!r} vs template "
                f"{tokenizer.decode(expected[max(0, at - 8): at + 4])!r}. Training tokens would not be what the "
                "model sees at inference. Set swe_agent.proxy.token_builder to the template's family "
                "(e.g. qwen for ChatML templates that end turns with '<|im_end|>\\n')."
            )


def make_token_builder(tokenizer: Any, *, family: str = "auto", hf_model_type: str | None = None,
                       check: bool = True) -> Any:
    """verl's continuous-token builder for ``tokenizer``: ``family`` (a verl family name) or, with
    ``auto``, the one verl infers from ``hf_model_type``; checked with ``check_token_builder``.

    Raises:
        TokenBuilderMismatch: the builder does not reproduce the template.
        ValueError: an unknown family (verl's message lists the known ones).
    """
    builder = create_continuous_token_builder(tokenizer, model_family=family, hf_model_type=hf_model_type)
    if check:
        check_token_builder(tokenizer, builder, family=family)
    return builder
