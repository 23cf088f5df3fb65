"""The in-line hermes parser reads every text exactly as verl's ``HermesToolParser``.

Random texts mix call tags, well-formed calls with arbitrary JSON arguments, and
broken blocks (bad JSON, missing keys, a non-string name, a list); the proxy's
``parse_hermes`` must return the same content and the same calls as verl's parser
given the same decoded text. A session parses sampled ids the same way with either.
"""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st
from verl.experimental.agent_loop.tool_parser import HermesToolParser

from model_proxy.tool_format import TurnParser, hermes_tool_call_text, parse_hermes

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)
CALL = st.builds(lambda name, args: json.dumps({"name": name, "arguments": args}, ensure_ascii=False),
                 st.text(max_size=10), JSON_VALUES)
BROKEN = st.sampled_from(['{"name": "bash"', '{"arguments": {}}', '{"name": 5, "arguments": {}}', "[1, 2]",
                          '{"name": null, "arguments": 1}', '"text"', "", '{"name": "a", "arguments": NaN}'])
FRAGMENT = st.one_of(
    st.sampled_from(["<tool_call>", "</tool_call>", "\n", " "]),
    st.builds(lambda body: f"<tool_call>\n{body}\n</tool_call>", CALL | BROKEN),
    st.text(max_size=20),
)


class _Decoded:
    """Stands in for the tokenizer: verl's parser decodes ids first; here the text is given."""

    def __init__(self, text: str) -> None:
        self.text = text

    def decode(self, ids, **kwargs):
        return self.text


@settings(max_examples=400, deadline=None, database=None)
@given(fragments=st.lists(FRAGMENT, max_size=8))
async def test_parse_hermes_equals_verls_parser(fragments):
    text = "".join(fragments)
    content, calls = await HermesToolParser(_Decoded(text)).extract_tool_calls([0])
    assert parse_hermes(text) == (content, [(call.name, call.arguments, call.tool_call_id) for call in calls])


async def test_a_session_parser_reads_sampled_ids_like_verl(tokenizer):
    text = "I will look.\n" + hermes_tool_call_text("bash", {"command": "ls -la ü"}) + "\n" + \
        hermes_tool_call_text("submit", {})
    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    turn = await TurnParser(tokenizer, "hermes").parse(ids, with_tools=True)
    content, calls = await HermesToolParser(tokenizer).extract_tool_calls(ids[:-1])
    assert turn.content == content.strip() == "I will look."
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in turn.tool_calls] == \
        [(c.name, c.arguments) for c in calls] == [("bash", '{"command": "ls -la ü"}'), ("submit", "{}")]
    assert all(c["id"].startswith("call_") for c in turn.tool_calls)
