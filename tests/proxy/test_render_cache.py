"""The render cache under verl's Continuous Token builder changes no token.

Over random conversations (hypothesis) the cached builder's initial prompts and
appended-context merges equal those of verl's own builder for the same tokenizer, a
second tool result is answered partly from the cache, ``encode_text`` and the
piecewise cache equal the tokenizer's own encoding over random text full of special
tokens, tokens whose match depends on context are never split at, a tokenizer whose
pieces do not encode independently is cached whole, a builder whose rendering the
cache would change is left uncached, and two real servers (cache on / off) give a
session the same token state.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model_proxy.render_cache import TextTokenCache, with_render_cache
from model_proxy.token_pieces import encode_text, special_token_splitter
from model_proxy.server import ModelProxyServer

from model_proxy.tool_format import hermes_tool_call_text

from .helpers import BASH_TOOL, replay_conversation

TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=0, max_size=60)


@st.composite
def appends(draw) -> list[dict[str, Any]]:
    """One append group: tool results (answering the last call) or one user message."""
    if draw(st.booleans()):
        return [{"role": "tool", "tool_call_id": f"call_{i}", "content": draw(TEXT)} for i in range(draw(st.integers(1, 3)))]
    return [{"role": "user", "content": draw(TEXT)}]


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(system=TEXT, task=TEXT, command=TEXT, groups=st.lists(appends(), min_size=1, max_size=4), tools=st.booleans())
def test_cached_builder_gives_verls_tokens(token_builder, system, task, command, groups, tools):
    cached = with_render_cache(token_builder, TextTokenCache(max_entries=8))
    assert cached is not token_builder
    schemas = [BASH_TOOL] if tools else None
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}, {"role": "user", "content": task}]
    expected = token_builder.build_initial_tokens(messages, tools=schemas)
    assert cached.build_initial_tokens(messages, tools=schemas) == expected
    ids = expected
    for group in groups:
        call = {"id": "call_0", "type": "function", "function": {"name": "bash", "arguments": f'{{"command": "{command!r}"}}'}}
        assistant = {"role": "assistant", "content": "", "tool_calls": [call]}
        previous = messages + [assistant]
        updated = previous + group
        ids = ids + [7, 8]  # stands for the sampled assistant turn
        want = token_builder.merge_context_tokens(copy.deepcopy(previous), copy.deepcopy(updated), ids, tools=schemas)
        got = cached.merge_context_tokens(previous, updated, ids, tools=schemas)
        assert (got.token_ids, got.appended_token_count, got.inserted_token_ids) == (
            want.token_ids, want.appended_token_count, want.inserted_token_ids)
        messages, ids = updated, list(want.token_ids)


def test_repeated_tool_results_hit_the_cache(token_builder):
    cache = TextTokenCache()
    cached = with_render_cache(token_builder, cache)
    call = {"id": "call_a", "type": "function", "function": {"name": "bash", "arguments": '{"command": "ls"}'}}
    previous = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                {"role": "assistant", "content": "", "tool_calls": [call]}]
    for turn in range(3):
        updated = previous + [{"role": "tool", "tool_call_id": f"call_{turn}", "content": f"output {turn}"}]
        cached.merge_context_tokens(previous, updated, [1, 2, 3], tools=[BASH_TOOL])
    # The synthetic prefix (system, user, assistant + tool schemas) renders to the same
    # text every time; only the first was encoded.
    assert cache.hits >= 2


@settings(max_examples=200, deadline=None, database=None)
@given(text=st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=200)
       | st.sampled_from(["<|im_start|>user\nhi<|im_end|>\n", "<tool_call>\n{}\n</tool_call><|im_end|>", "  \n\n\t x"]))
def test_encode_text_equals_the_tokenizer(tokenizer, text):
    assert encode_text(tokenizer, text) == tokenizer(text, add_special_tokens=False)["input_ids"]


SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
PIECE = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30) | st.sampled_from(
    ["", "\n", " ", "  \n\t", "user\n", "assistant\n", "<|im", "_end|>", "tool_call", "ü", "😀"])


@settings(max_examples=300, deadline=None, database=None)
@given(parts=st.lists(st.tuples(PIECE, st.sampled_from(SPECIALS)), max_size=6), tail=PIECE)
def test_piecewise_cache_equals_the_tokenizer(tokenizer, parts, tail):
    text = "".join(piece + special for piece, special in parts) + tail
    cache = TextTokenCache(max_entries=4)
    want = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert cache.ids(tokenizer, text) == want
    assert cache.ids(tokenizer, text) == want  # now (partly) from the cache


def _word_level_tokenizer(pre_tokenizer, added):
    """A small real fast tokenizer (Rust ``tokenizers`` + transformers wrapper)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = ["x", "y", "ü", "\t", "\n"]
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words + ["\u2581" + w for w in words] + ["\u2581"])}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizer
    backend.add_tokens(added)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def test_tokens_whose_match_depends_on_context_are_not_split_at():
    from tokenizers import AddedToken, pre_tokenizers

    tok = _word_level_tokenizer(pre_tokenizers.WhitespaceSplit(), [
        AddedToken("<s>", special=True, normalized=False),
        AddedToken("<l>", special=True, normalized=False, lstrip=True),  # takes the whitespace before it
        AddedToken("<o>", special=True, normalized=False),
        AddedToken("o>x", special=False, normalized=False),  # overlaps "<o>" in "<o>x"
    ])
    splitter = special_token_splitter(tok)
    assert splitter is not None and "<s>" in splitter.token_ids
    assert not {"<l>", "<o>", "o>x"} & set(splitter.token_ids)
    for text in ["x <l>y", "x<o>x y", "<s> x <l> <o>x<s>"]:
        assert TextTokenCache().ids(tok, text) == tok(text, add_special_tokens=False)["input_ids"]


def test_tokenizer_whose_pieces_do_not_encode_independently_is_cached_whole():
    from tokenizers import AddedToken, pre_tokenizers

    # Metaspace(prepend_scheme="first") adds "\u2581" to the first piece only: "y" after <s>
    # is "y" in the whole text but would be "\u2581y" encoded alone.
    tok = _word_level_tokenizer(pre_tokenizers.Metaspace(prepend_scheme="first"),
                                [AddedToken("<s>", special=True, normalized=False)])
    assert special_token_splitter(tok) is None
    cache = TextTokenCache()
    assert cache.ids(tok, "x<s>y x") == tok("x<s>y x", add_special_tokens=False)["input_ids"]


def test_a_cache_serves_one_tokenizer(tokenizer):
    from tokenizers import pre_tokenizers

    cache = TextTokenCache()
    cache.ids(tokenizer, "hello")
    with pytest.raises(ValueError, match="one tokenizer"):
        cache.ids(_word_level_tokenizer(pre_tokenizers.WhitespaceSplit(), []), "hello")


def test_builder_whose_rendering_would_change_stays_uncached(tokenizer, token_builder):
    class AppendsMarker:
        """A tokenizer whose chat-template tokenization adds an id its text path does not."""

        def __init__(self, inner):
            self._inner = inner

        def __getattr__(self, name):
            return getattr(self._inner, name)

        def __call__(self, *args, **kwargs):
            return self._inner(*args, **kwargs)

        def apply_chat_template(self, *args, **kwargs):
            out = self._inner.apply_chat_template(*args, **kwargs)
            if kwargs.get("tokenize", True):  # verl asks for a plain list (return_dict=False)
                out = list(out) + [5]
            return out

    odd = copy.copy(token_builder)
    odd.tokenizer = AppendsMarker(tokenizer)
    assert with_render_cache(odd) is odd


def test_cache_is_bounded():
    cache = TextTokenCache(max_entries=2, max_text_chars=10)

    class Counting:
        is_fast = False
        calls = 0

        def __call__(self, text, add_special_tokens):
            Counting.calls += 1
            return {"input_ids": [len(text)]}

    tok = Counting()
    for text in ["a", "b", "c", "a"]:
        assert cache.ids(tok, text) == [len(text)]
    assert len(cache) == 2 and Counting.calls == 4  # "a" was evicted by "c"
    cache.ids(tok, "x" * 11)
    assert len(cache) == 2  # too long to keep
    with pytest.raises(ValueError):
        TextTokenCache(max_entries=-1)


async def _session_state(tokenizer, token_builder, entries: int, inline_chars: int = 8192):
    server = await ModelProxyServer.start(render_cache_entries=entries, inline_tokenize_max_chars=inline_chars)
    try:
        texts = [hermes_tool_call_text("bash", {"command": "ls -la"}),
                 hermes_tool_call_text("bash", {"command": "cat a.py"}), "Done."]
        result = await replay_conversation(server, tokenizer, token_builder, texts, lambda turn: f"result {turn} ünï\n",
                                           turns=3)
        return result.prompt_ids, result.response_ids, result.response_mask, result.response_logprobs
    finally:
        await server.stop()


async def test_servers_with_and_without_the_cache_record_the_same_tokens(tokenizer, token_builder):
    on = await _session_state(tokenizer, token_builder, entries=64)
    off = await _session_state(tokenizer, token_builder, entries=0, inline_chars=0)  # all in the executor
    assert on == off
    assert sum(on[2]) > 0 and 0 in on[2]  # sampled and context tokens both present


async def test_freeze_gc_moves_the_heap_out_of_the_collector():
    """``freeze_gc`` (on in the recipe) leaves the import-time heap out of later full GC passes."""
    import gc

    gc.unfreeze()  # another test (a recipe loop) may have frozen this process already
    assert gc.get_freeze_count() == 0
    server = await ModelProxyServer.start(freeze_gc=True)
    try:
        assert gc.get_freeze_count() > 10_000  # torch, transformers, verl, the tokenizer...
        assert "verl.experimental.agent_loop.tool_parser" in __import__("sys").modules
    finally:
        await server.stop()
    plain = await ModelProxyServer.start()  # the default leaves the collector alone
    await plain.stop()
