"""The three generation backends against the GenerationBackend contract."""

from __future__ import annotations

import json
import math

import pytest

from model_proxy.backends.base import GenerationBackend, GenerationOutput
from model_proxy.backends.scripted import ScriptedPolicyBackend
from model_proxy.backends.verl_server import VerlServerBackend
from model_proxy.tool_format import SUBMIT_COMMAND, TurnParser

PARAMS = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_tokens": 64}


# -- hf_local -------------------------------------------------------------------------------


async def test_hf_local_is_deterministic_and_returns_aligned_logprobs(hf_backend, tokenizer):
    assert isinstance(hf_backend, GenerationBackend)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    prompt = list(prompt if isinstance(prompt, list) else prompt["input_ids"])
    first = await hf_backend.generate("traj-a", prompt, PARAMS)
    again = await hf_backend.generate("traj-a", prompt, PARAMS)
    other = await hf_backend.generate("traj-b", prompt, PARAMS)
    # Same seed and request: the same tokens. Logprobs agree to float noise only: CPU GEMM kernels
    # may round a position differently between calls (4.8e-7 seen), far below the ~1e-5 rollout/actor gap.
    assert (first.token_ids, first.stop_reason) == (again.token_ids, again.stop_reason)
    assert first.logprobs == pytest.approx(again.logprobs, abs=1e-5)
    assert first.token_ids != other.token_ids
    assert len(first.logprobs) == len(first.token_ids) >= 1
    assert all(lp <= 0.0 and math.isfinite(lp) for lp in first.logprobs)
    if first.stop_reason == "stop":
        assert first.token_ids[-1] in hf_backend.stop_token_ids
    else:
        assert len(first.token_ids) == PARAMS["max_tokens"]


async def test_hf_local_stop_length_and_greedy(hf_backend, tokenizer):
    prompt = tokenizer.encode("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n")
    # The tiny model ends a turn after ~24 tokens on average: some seed ends early.
    outputs = [await hf_backend.generate(f"r{i}", prompt, {**PARAMS, "max_tokens": 200}) for i in range(8)]
    stopped = [o for o in outputs if o.stop_reason == "stop"]
    assert stopped and all(o.token_ids[-1] == tokenizer.eos_token_id for o in stopped)
    assert all(o.token_ids.count(tokenizer.eos_token_id) <= 1 for o in outputs)

    short = await hf_backend.generate("r0", prompt, {**PARAMS, "max_tokens": 3, "stop_token_ids": []})
    if short.stop_reason == "length":
        assert len(short.token_ids) == 3

    greedy = await hf_backend.generate("x", prompt, {"temperature": 0.0, "max_tokens": 5})
    greedy2 = await hf_backend.generate("y", prompt, {"temperature": 0.0, "max_tokens": 5})
    top1 = await hf_backend.generate("z", prompt, {"temperature": 1.0, "top_k": 1, "max_tokens": 5})
    assert greedy.token_ids == greedy2.token_ids == top1.token_ids
    # Under top_k=1 the sampled distribution is a point mass: processed logprob 0.
    assert top1.logprobs == [0.0] * len(top1.logprobs)
    assert all(lp < 0.0 for lp in greedy.logprobs)


async def test_hf_local_top_p_keeps_only_the_nucleus(hf_backend, tokenizer):
    prompt = tokenizer.encode("def f(x):\n    return")
    out = await hf_backend.generate("p", prompt, {"temperature": 1.0, "top_p": 0.05, "max_tokens": 8})
    # With a near-uniform model a 5% nucleus has ~100 tokens: logprob >= log(1/vocab) and > uniform.
    assert all(lp > -math.log(len(tokenizer)) for lp in out.logprobs)


# -- scripted -------------------------------------------------------------------------------


async def test_scripted_tool_call_turns_parse_with_verl_hermes(tokenizer):
    backend = ScriptedPolicyBackend(tokenizer, ["ls -la", "cat <<'EOF' > a.py\nprint('ü')\nEOF"], mode="tool_call")
    parser = TurnParser(tokenizer, "hermes")
    commands = []
    for _ in range(4):
        out = await backend.generate("t", [1, 2], {"max_tokens": 500})
        assert out.stop_reason == "stop" and out.token_ids[-1] == tokenizer.eos_token_id
        assert out.logprobs == [0.0] * len(out.token_ids)
        turn = await parser.parse(out.token_ids, with_tools=True)
        assert turn.content is None and len(turn.tool_calls) == 1
        assert turn.tool_calls[0]["function"]["name"] == "bash"
        commands.append(json.loads(turn.tool_calls[0]["function"]["arguments"])["command"])
    assert commands == backend.commands + [SUBMIT_COMMAND, SUBMIT_COMMAND]
    # Turns are counted per trajectory.
    other = await backend.generate("u", [1], {"max_tokens": 500})
    assert other.token_ids == tokenizer.encode(backend.turn_text(0)) + [tokenizer.eos_token_id]


async def test_scripted_text_turns_parse_with_mini_swe_agent_regex(tokenizer):
    from minisweagent.models.litellm_textbased_model import LitellmTextbasedModelConfig
    from minisweagent.models.utils.actions_text import parse_regex_actions

    regex = LitellmTextbasedModelConfig.model_fields["action_regex"].default
    script = ["grep -rn 'def ' src | head", "cat <<'EOF' > f.txt\nline 1\nline 2\nEOF"]
    backend = ScriptedPolicyBackend(tokenizer, script, mode="text")
    parser = TurnParser(tokenizer)
    for expected in script + [SUBMIT_COMMAND]:
        out = await backend.generate("t", [1], {"max_tokens": 500})
        content = (await parser.parse(out.token_ids, with_tools=False)).content
        actions = parse_regex_actions(content, action_regex=regex, format_error_template="{{error}}")
        assert actions == [{"command": expected}]


async def test_scripted_empty_script_submits_and_max_tokens_truncates(tokenizer):
    backend = ScriptedPolicyBackend(tokenizer, [])
    assert SUBMIT_COMMAND in backend.turn_text(0)
    out = await backend.generate("t", [1], {"max_tokens": 4})
    assert out.stop_reason == "length" and len(out.token_ids) == 4 == len(out.logprobs)
    with pytest.raises(ValueError):
        ScriptedPolicyBackend(tokenizer, [], mode="json")


def test_scripted_submit_tool_is_called_after_the_commands_forever(tokenizer):
    """SWE-agent submits with its `submit` tool, and its review step asks for a second submit."""
    backend = ScriptedPolicyBackend(tokenizer, ["ls"], submit_tool="submit")
    assert '"name": "bash"' in backend.turn_text(0) and "ls" in backend.turn_text(0)
    for turn in (1, 2, 5):
        assert backend.turn_text(turn) == '<tool_call>\n{"name": "submit", "arguments": {}}\n</tool_call>'
    with pytest.raises(ValueError, match="tool_call"):
        ScriptedPolicyBackend(tokenizer, [], mode="text", submit_tool="submit")


# -- verl server manager ----------------------------------------------------------------------


class FakeServerManager:
    """The one fake in these tests: verl's rollout servers need GPUs (vLLM/SGLang), none here.

    Mimics ``LLMServerClient.generate(request_id, *, prompt_ids, sampling_params)`` returning
    verl's real ``TokenOutput`` model.
    """

    def __init__(self, outputs):
        self.outputs = list(outputs)
        self.calls = []

    async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs):
        self.calls.append((request_id, list(prompt_ids), dict(sampling_params), kwargs))
        return self.outputs.pop(0)


async def test_verl_server_backend_derives_stop_reasons(tokenizer):
    from verl.workers.rollout.replica import TokenOutput

    eos = tokenizer.eos_token_id
    manager = FakeServerManager(
        [
            TokenOutput(token_ids=[5, 6, eos], log_probs=[-0.1, -0.2, -0.3], stop_reason="completed"),
            TokenOutput(token_ids=[5, 6, 7, 8], log_probs=[-0.1] * 4, stop_reason="completed"),
            TokenOutput(token_ids=[5], log_probs=[-1.0], stop_reason="aborted"),
            TokenOutput(token_ids=[5, 9], log_probs=None, stop_reason="completed"),
            TokenOutput(token_ids=[5, 42], log_probs=[], stop_reason=None),
        ]
    )
    backend = VerlServerBackend(manager, tokenizer)
    assert isinstance(backend, GenerationBackend)
    params = {"temperature": 1.0, "max_tokens": 4, "logprobs": True}
    assert await backend.generate("rid", [1, 2], params) == GenerationOutput([5, 6, eos], [-0.1, -0.2, -0.3], "stop")
    assert (await backend.generate("rid", [1, 2], params)).stop_reason == "length"
    assert (await backend.generate("rid", [1, 2], params)).stop_reason == "abort"
    assert await backend.generate("rid", [1, 2], params) == GenerationOutput([5, 9], None, "stop")
    assert await backend.generate("rid", [1], {**params, "stop_token_ids": [42]}) == GenerationOutput(
        [5, 42], None, "stop"
    )
    request_id, prompt_ids, sent, kwargs = manager.calls[0]
    assert (request_id, prompt_ids, sent, kwargs) == ("rid", [1, 2], params, {})


async def test_verl_server_backend_rejects_misaligned_logprobs(tokenizer):
    from verl.workers.rollout.replica import TokenOutput

    manager = FakeServerManager([TokenOutput(token_ids=[5, 6], log_probs=[-0.1], stop_reason="completed")])
    with pytest.raises(ValueError):
        await VerlServerBackend(manager, tokenizer).generate("rid", [1], {"max_tokens": 8})
