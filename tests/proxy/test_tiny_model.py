"""prepare.tiny_model: deterministic, loadable, and compatible with verl's Qwen token builder."""

from __future__ import annotations

import json

from prepare.tiny_model import IM_END, PAD_TOKEN, TOOL_TOKENS, build_tiny_model, build_tokenizer

from .helpers import BASH_TOOL, render


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path, tiny_model_dir):
    again = build_tiny_model(tmp_path / "again", seed=0)
    other = build_tiny_model(tmp_path / "other", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "chat_template.jinja"):
        assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name
    assert (other / "model.safetensors").read_bytes() != (tiny_model_dir / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (tiny_model_dir / "tokenizer.json").read_bytes()


def test_config_and_model_load(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["model_type"] == "qwen2"
    assert config["num_hidden_layers"] == 2 and config["hidden_size"] == 64
    assert config["eos_token_id"] == tokenizer.convert_tokens_to_ids(IM_END) == tokenizer.eos_token_id
    assert config["pad_token_id"] == tokenizer.convert_tokens_to_ids(PAD_TOKEN) == tokenizer.pad_token_id
    assert config["vocab_size"] == len(tokenizer)
    assert 1900 <= len(tokenizer) <= 2010
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert sum(p.numel() for p in model.parameters()) < 400_000


def test_special_and_tool_tokens(tokenizer):
    for token in ["<|im_start|>", IM_END, PAD_TOKEN, *TOOL_TOKENS]:
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1, token
    assert len(tokenizer.encode("\n", add_special_tokens=False)) == 1
    ids = tokenizer.encode('<tool_call>\n{"name": "bash"}\n</tool_call><|im_end|>', add_special_tokens=False)
    # Tool tags are ordinary added tokens (as in Qwen2.5): they survive skip_special_tokens.
    assert tokenizer.decode(ids, skip_special_tokens=True) == '<tool_call>\n{"name": "bash"}\n</tool_call>'


def test_saved_tokenizer_encodes_like_the_built_one(tokenizer):
    built = build_tokenizer()
    samples = [
        "def f(x):\n    return x  # ünïcödé\n\n\n",
        "   leading spaces\tand\ttabs   ",
        "<|im_start|>user\nhello<|im_end|>\n<tool_call>",
        "sed -i 's/a - b/a + b/' src/calc.py && python -m pytest -q",
    ]
    for text in samples:
        assert built.encode(text) == tokenizer.encode(text)
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_template_renders_tools_calls_and_responses(tokenizer):
    text = tokenizer.apply_chat_template(
        [
            {"role": "system", "content": "S"},
            {"role": "user", "content": [{"type": "text", "text": "U", "cache_control": {"type": "ephemeral"}}]},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "1", "type": "function", "function": {"name": "bash", "arguments": '{"command": "ls"}'}}
                ],
            },
            {"role": "tool", "tool_call_id": "1", "content": "a"},
            {"role": "tool", "tool_call_id": "2", "content": "b"},
        ],
        tools=[BASH_TOOL],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text.startswith("<|im_start|>system\nS\n\n# Tools\n")
    assert json.dumps(BASH_TOOL) in text
    assert "<|im_start|>user\nU<|im_end|>\n" in text
    call = '<tool_call>\n{"name": "bash", "arguments": {"command": "ls"}}\n</tool_call>'
    assert f"<|im_start|>assistant\n{call}<|im_end|>\n" in text
    assert text.endswith(
        "<|im_start|>user\n<tool_response>\na\n</tool_response>\n<tool_response>\nb\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_continuous_token_builder_with_tool_calls_matches_full_render(tokenizer, token_builder):
    from verl.utils.tokenizer.continuous_token import QwenContinuousTokenBuilder

    assert isinstance(token_builder, QwenContinuousTokenBuilder)
    tools = [BASH_TOOL]
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "fix it"}]
    ids = token_builder.build_initial_tokens(messages, tools=tools)
    assert ids == render(tokenizer, messages, tools, add_generation_prompt=True)
    mask: list[int] = []
    logprobs: list[float] = []

    calls = [("ls", "c1"), ("cat a.py", "c2")]
    sampled = "Let me look.\n" + "\n".join(
        f'<tool_call>\n{{"name": "bash", "arguments": {{"command": "{c}"}}}}\n</tool_call>' for c, _ in calls
    )
    sampled_ids = tokenizer.encode(sampled, add_special_tokens=False) + [tokenizer.eos_token_id]
    merge = token_builder.merge_assistant_tokens(ids, sampled_ids)
    mask, logprobs = token_builder.align_response_metadata(
        merge, mask, logprobs, assistant_logprobs=[-0.5] * len(sampled_ids)
    )
    assistant = {
        "role": "assistant",
        "content": "Let me look.",
        "tool_calls": [
            {"id": i, "type": "function", "function": {"name": "bash", "arguments": json.dumps({"command": c})}}
            for c, i in calls
        ],
    }
    previous = messages + [assistant]
    updated = previous + [
        {"role": "tool", "tool_call_id": "c1", "content": "a.py"},
        {"role": "tool", "tool_call_id": "c2", "content": "print(1)"},
        {"role": "user", "content": "go on"},
    ]
    merge2 = token_builder.merge_context_tokens(previous, updated, merge.token_ids, tools=tools)
    mask, logprobs = token_builder.align_response_metadata(merge2, mask, logprobs)
    newline = tokenizer.encode("\n", add_special_tokens=False)
    assert merge2.inserted_token_ids == newline  # Qwen boundary after <|im_end|>
    assert merge2.token_ids == render(tokenizer, updated, tools, add_generation_prompt=True)
    n_prompt = len(ids)
    assert mask == [1] * len(sampled_ids) + [0] * (len(merge2.token_ids) - n_prompt - len(sampled_ids))
    assert logprobs[: len(sampled_ids)] == [-0.5] * len(sampled_ids)
    assert set(logprobs[len(sampled_ids) :]) == {0.0}
