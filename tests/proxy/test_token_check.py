"""The start-up check of verl's continuous-token builder against the policy's chat template."""

from __future__ import annotations

import copy

import pytest

from model_proxy.token_check import TokenBuilderMismatch, check_token_builder, make_token_builder, replay


def test_the_qwen_family_reproduces_the_chatml_template(tokenizer):
    make_token_builder(tokenizer, hf_model_type="qwen2")
    make_token_builder(tokenizer, family="qwen", hf_model_type="llama")


def test_the_generic_builder_on_a_chatml_template_fails_naming_the_setting(tokenizer):
    # What verl picks for a ChatML model whose model_type it does not know (SmolLM2: llama).
    with pytest.raises(TokenBuilderMismatch, match="swe_agent.proxy.token_builder") as err:
        make_token_builder(tokenizer, hf_model_type="llama")
    assert "<|im_end|>\\n<|im_start|>" in str(err.value)  # the template's newline the builder drops


def test_a_tokenizer_whose_eos_is_not_the_end_of_turn_fails(tokenizer):
    broken = copy.deepcopy(tokenizer)
    broken.eos_token = "<|im_start|>"  # transformers' GGUF conversion of SmolLM2 does this
    with pytest.raises(TokenBuilderMismatch, match="eos"):
        make_token_builder(broken, family="qwen")


def test_replay_equals_the_template_render_token_for_token(tokenizer):
    from verl.utils.tokenizer.continuous_token_wiring import create_continuous_token_builder

    builder = create_continuous_token_builder(tokenizer, hf_model_type="qwen2")
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "one"},
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": "three"},
        {"role": "user", "content": "four"},
    ]
    expected = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    assert replay(tokenizer, builder, messages, None) == expected
    check_token_builder(tokenizer, builder)
