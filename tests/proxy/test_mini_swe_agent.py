"""mini-swe-agent (2.x, in-process DefaultAgent + LocalEnvironment) driven through the proxy.

The scripted policy replays commands through the agent's own tool calls / text
actions; the agent runs them in a temporary directory and submits. This is the
harness check of the whole protocol path: litellm request shapes, echoed
``provider_specific_fields``, tool results, the submit signal.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml

from model_proxy.backends.scripted import ScriptedPolicyBackend
from recipe.runners.mini_swe_agent_entry import keep_failed_turns

from .helpers import RecordingBackend, check_exact_state, make_config, render

COMMANDS = ["echo hello > out.txt", "cat out.txt && ls"]


def _run_agent(
    mode: str, base_url: str, api_key: str, cwd: Path, *, keep_failed: bool = False
) -> tuple[dict, list[dict]]:
    import minisweagent
    from minisweagent.agents.default import DefaultAgent
    from minisweagent.environments.local import LocalEnvironment
    from minisweagent.models import get_model

    builtin = "mini.yaml" if mode == "tool_call" else "mini_textbased.yaml"
    config = yaml.safe_load((Path(minisweagent.__file__).parent / "config" / builtin).read_text())
    model_config = dict(config["model"])
    model_config.update(
        model_name="openai/swe-policy",
        model_class="litellm" if mode == "tool_call" else "litellm_textbased",
        cost_tracking="ignore_errors",
        model_kwargs={
            **model_config.get("model_kwargs", {}),
            "api_base": base_url,
            "api_key": api_key,
            "num_retries": 0,
        },
    )
    model = get_model(config=model_config)
    if keep_failed:
        keep_failed_turns(model)
    env = LocalEnvironment(cwd=str(cwd), timeout=20, env=config.get("environment", {}).get("env", {}))
    agent_config = {k: v for k, v in config["agent"].items() if k != "mode"}
    agent_config["step_limit"] = 10
    agent = DefaultAgent(model, env, **agent_config)
    info = agent.run("Write hello into out.txt.")
    return info, agent.messages


@pytest.mark.parametrize("mode", ["tool_call", "text"])
async def test_mini_swe_agent_runs_the_script_and_submits(proxy, tokenizer, token_builder, tmp_path, monkeypatch, mode):
    monkeypatch.setenv("MSWEA_MODEL_RETRY_STOP_AFTER_ATTEMPT", "1")
    backend = RecordingBackend(ScriptedPolicyBackend(tokenizer, COMMANDS, mode=mode))
    handle = proxy.open_session(make_config(backend, tokenizer, token_builder, max_response_tokens=8192))
    info, agent_messages = await asyncio.to_thread(_run_agent, mode, handle.base_url, handle.api_key, tmp_path)
    result = proxy.close_session(handle.session_id)

    assert info["exit_status"] == "Submitted", info
    assert (tmp_path / "out.txt").read_text() == "hello\n"
    assert result.num_turns == len(COMMANDS) + 1 and result.stop is None and result.error is None
    check_exact_state(result, backend.calls)
    # The recorded conversation is what the agent sent (minus its "exit" message).
    assert [m["role"] for m in result.messages] == [m["role"] for m in agent_messages if m["role"] != "exit"]
    tools = [_bash_tool()] if mode == "tool_call" else None
    newline = tokenizer.encode("\n", add_special_tokens=False)
    assert result.prompt_ids + result.response_ids + newline == render(tokenizer, result.messages, tools)


def _bash_tool() -> dict:
    from minisweagent.models.utils.actions_toolcall import BASH_TOOL

    return BASH_TOOL


async def test_stock_mini_swe_agent_drops_failed_turns_error_mode(
    proxy, tokenizer, token_builder, hf_backend, tmp_path, monkeypatch
):
    """The random tiny model never makes a valid tool call: mini-swe-agent's FormatError path
    drops the failed turn from its history; with on_history_rewrite="error" that is refused."""
    monkeypatch.setenv("MSWEA_MODEL_RETRY_STOP_AFTER_ATTEMPT", "1")
    handle = proxy.open_session(
        make_config(hf_backend, tokenizer, token_builder, max_response_tokens=2048, on_history_rewrite="error")
    )
    import litellm

    with pytest.raises(litellm.BadRequestError, match="history"):
        await asyncio.to_thread(_run_agent, "tool_call", handle.base_url, handle.api_key, tmp_path)
    result = proxy.close_session(handle.session_id)
    assert result.error == "history_mismatch" and result.num_turns == 1 and len(result.segments) == 1


async def test_stock_mini_swe_agent_drops_failed_turns_new_segments(
    proxy, tokenizer, token_builder, hf_backend, tmp_path, monkeypatch
):
    """Default policy: each dropped turn closes a segment; every segment is exact on its own."""
    monkeypatch.setenv("MSWEA_MODEL_RETRY_STOP_AFTER_ATTEMPT", "1")
    backend = RecordingBackend(hf_backend)
    handle = proxy.open_session(make_config(backend, tokenizer, token_builder, max_response_tokens=2048))
    info, agent_messages = await asyncio.to_thread(_run_agent, "tool_call", handle.base_url, handle.api_key, tmp_path)
    result = proxy.close_session(handle.session_id)
    assert info["exit_status"] == "RepeatedFormatError", info
    assert result.error is None and result.stop is None and result.num_turns == 3
    # Stock mini-swe-agent never shows the model its own failed turn: three one-turn segments,
    # each a fresh prompt of the history it was sent (system, task, then the format errors so far).
    assert [s.num_turns for s in result.segments] == [1, 1, 1]
    assert [t.segment for t in result.turns] == [0, 1, 2]
    for segment, call in zip(result.segments, backend.calls):
        check_exact_state(segment, [call])
        roles = [m["role"] for m in segment.messages]
        assert roles[-1] == "assistant" and "assistant" not in roles[:-1]
    assert result.prompt_ids == result.segments[-1].prompt_ids
    assert result.response_ids == result.segments[-1].response_ids


@pytest.mark.parametrize("mode", ["tool_call", "text"])
async def test_mini_swe_agent_keeping_failed_turns_is_append_only(
    proxy, tokenizer, token_builder, hf_backend, tmp_path, monkeypatch, mode
):
    monkeypatch.setenv("MSWEA_MODEL_RETRY_STOP_AFTER_ATTEMPT", "1")
    backend = RecordingBackend(hf_backend)
    handle = proxy.open_session(make_config(backend, tokenizer, token_builder, max_response_tokens=4096))
    info, agent_messages = await asyncio.to_thread(
        _run_agent, mode, handle.base_url, handle.api_key, tmp_path, keep_failed=True
    )
    result = proxy.close_session(handle.session_id)
    # Three format errors in a row end the run (DefaultAgent.max_consecutive_format_errors).
    assert info["exit_status"] == "RepeatedFormatError", info
    assert result.error is None and result.stop is None and result.num_turns == 3
    check_exact_state(result, backend.calls)
    assert [m["role"] for m in result.messages] == ["system", "user"] + ["assistant", "user"] * 2 + ["assistant"]
