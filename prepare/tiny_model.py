"""Build a tiny local chat model (tokenizer + random Qwen2) for CPU tests and dry runs.

Nothing can be downloaded from a model hub on development machines, yet the
agent loop, the ModelProxy and verl's Continuous Token builder all need a real
Hugging Face tokenizer with a ChatML chat template and a real causal LM. This
module builds both from scratch, deterministically for a seed, in a few seconds:

- a byte-level BPE (``tokenizers``) trained on a small built-in corpus of code,
  shell commands and English, wrapped in ``PreTrainedTokenizerFast``;
- special tokens as in Qwen2.5-Instruct: ``<|endoftext|>`` (pad),
  ``<|im_start|>``, ``<|im_end|>`` (eos); ``<tool_call>``, ``</tool_call>``,
  ``<tool_response>``, ``</tool_response>`` are single added tokens that are
  NOT special (as in Qwen2.5), so ``decode(skip_special_tokens=True)`` keeps them;
- a ChatML ``chat_template`` written for this project that renders tools the way
  Qwen2.5-Instruct does (tool schemas in the system prompt, assistant tool calls
  as ``<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>``, ``tool``
  messages grouped into one user turn as ``<tool_response>\\n...\\n</tool_response>``);
- a randomly initialised 2-layer, 64-wide ``Qwen2ForCausalLM`` (``model_type:
  qwen2``, so verl picks ``QwenContinuousTokenBuilder``).

The random model gets one deliberate, documented tweak: an end-of-turn bias, so
that sampled turns end with ``<|im_end|>`` after ``mean_turn_tokens`` tokens on
average instead of almost never (a uniform 2k-token model emits eos once per ~2k
tokens, so every turn would hit ``max_tokens``). The bias is built from weights
only (see ``_add_end_of_turn_bias``); the model is otherwise untrained and its
text is noise. It is a plumbing fixture, never a policy.

CLI: ``python -m prepare.tiny_model OUT_DIR [--seed N] [--vocab-size N]``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from prepare.chat_template import chatml_tools_template

# Special tokens first so their ids are small and stable: 0, 1, 2.
PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END]
# Added but not special (Qwen2.5 marks them special=false): they survive
# skip_special_tokens decoding, which the hermes tool parser relies on.
TOOL_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]

# transformers' Qwen2Tokenizer.PRETOKENIZE_REGEX (same as Qwen2.5's tokenizer.json).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

CHAT_TEMPLATE = chatml_tools_template(DEFAULT_SYSTEM_PROMPT)

_CODE = '''
import os
import sys
import json
from pathlib import Path


def read_config(path: str) -> dict:
    """Read a JSON config file and return it as a dict."""
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        if not self.items:
            raise IndexError("pop from empty stack")
        return self.items.pop()

    def __len__(self):
        return len(self.items)


def fibonacci(n: int) -> list[int]:
    result = [0, 1]
    for index in range(2, n):
        result.append(result[index - 1] + result[index - 2])
    return result[:n]


def test_stack_push_pop():
    stack = Stack()
    stack.push(1)
    stack.push(2)
    assert stack.pop() == 2
    assert len(stack) == 1


if __name__ == "__main__":
    print(fibonacci(10))
    sys.exit(0)
'''

_SHELL = """
ls -la
cd /repo && git status
git diff --stat
grep -rn "def " src/ | head -20
find . -name "*.py" -not -path "./.git/*"
cat setup.py
sed -n '1,40p' src/module.py
sed -i 's/return a - b/return a + b/' src/calc.py
python -m pytest -q tests/test_calc.py
python -c "import sys; print(sys.version)"
nl -ba src/calc.py | sed -n '10,20p'
echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT
"""

_ENGLISH = """
The function returns the wrong value when the list is empty. We should check the
length of the input before we index into it. Let me look at the file and find the
bug. I will run the tests to see which ones fail, then fix the code and run them
again. The issue says that the parser crashes on an empty string, so a guard at
the start of the function should solve the problem. This change is small and safe.
THOUGHT: I need to understand the structure of the repository first.
Please solve this issue. You can execute bash commands and edit files.
"""

_CHAT = """
<tool_call>
{"name": "bash", "arguments": {"command": "ls -la"}}
</tool_call>
<tool_response>
<returncode>0</returncode>
<output>
README.md
src
tests
</output>
</tool_response>
```mswea_bash_command
cat src/calc.py
```
"""


_WORDS = (
    "the a an and or but if then else when while for with without from into onto of to in on at by as is are "
    "was were be been being have has had do does did not no yes this that these those it its we you they he she "
    "i me my our your their them us all any some each every more most less least many much few other another "
    "same new old first last next previous small large long short high low good bad right wrong true false "
    "function method class object module package file files directory path line lines word words value values "
    "list dict set tuple string number integer float boolean none null empty error errors exception warning bug "
    "issue fix patch change changes test tests case cases check checks run runs running build install import "
    "export return returns call calls called argument arguments parameter parameters option options config "
    "setting settings default defaults input output result results data type types name names key keys index "
    "item items element elements node nodes tree graph edge edges user users request response server client "
    "model models token tokens text message messages command commands shell script scripts repository branch "
    "commit commits diff merge version release update delete create read write open close start stop begin end "
    "should would could can will may might must need needs want make makes made use uses used using find found "
    "look looks see show shows print prints log logs debug trace stack frame memory time date year day hour "
    "minute second because since so than there here where what which who how why also only just still even "
    "already again after before between during under over above below inside outside about around through "
    "problem solution reason explain understand analyze reproduce verify expected actual behavior correct "
    "incorrect missing extra invalid valid parse parser format formatted encode decode json yaml csv html url "
    "http api cli sql query table column row database cache queue thread process lock async await task tasks"
).split()

_IDENTIFIERS = (
    "self cls args kwargs result value values items item index count total size length path name names "
    "config options data buffer stream reader writer parser lexer token tokens node nodes parent child children "
    "left right head tail start end begin stop step offset limit timeout retries attempt callback handler "
    "logger request response session client server cursor connection query params headers payload status "
    "message error exc err tmp_path monkeypatch capsys fixture expected actual assert_equal is_valid has_key "
    "get_value set_value to_dict from_dict to_json from_json load_config save_config parse_args main run "
    "compute_score normalize_path read_file write_file split_lines join_words merge_dicts flatten unique"
).split()

_KEYWORDS = (
    "def class return if elif else for while in not and or is None True False import from with as "
    "try except finally raise pass yield lambda async await"
).split()


def _sentence(rng) -> str:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(5, 16))]
    return " ".join(words).capitalize() + rng.choice([".", ".", ".", "?", ":", ","])


def _code_line(rng) -> str:
    ident = lambda: rng.choice(_IDENTIFIERS)  # noqa: E731
    templates = [
        lambda: f"def {ident()}({ident()}, {ident()}=None):",
        lambda: f"    {ident()} = {ident()}.{ident()}({ident()})",
        lambda: f"    if {ident()} is None:",
        lambda: f"        return {ident()}[{rng.randint(0, 9)}]",
        lambda: f"    for {ident()} in {ident()}:",
        lambda: f"        {ident()}.append({ident()})",
        lambda: f"    assert {ident()} == {rng.randint(0, 100)}",
        lambda: f"from {ident()} import {ident()}",
        lambda: f"class {ident().title().replace('_', '')}({ident().title().replace('_', '')}):",
        lambda: f'    raise ValueError(f"invalid {{{ident()}}}")',
        lambda: f"    # {_sentence(rng)}",
        lambda: f"{rng.choice(['ls', 'cat', 'grep -rn', 'sed -n', 'python -m pytest', 'git diff'])} {ident()}.py",
        lambda: f'{{"name": "bash", "arguments": {{"command": "cat {ident()}.py"}}}}',
        lambda: f"    {rng.choice(_KEYWORDS)} {ident()}",
    ]
    return rng.choice(templates)()


def _corpus() -> list[str]:
    """The built-in training text: fixed samples plus ~150 KB generated from word lists.

    Generated with a fixed ``random.Random`` seed, so the tokenizer never depends on
    the model seed or on anything installed on the machine.
    """
    import random

    rng = random.Random(20240601)
    pieces = [_CODE, _SHELL, _ENGLISH, _CHAT] * 4
    for _ in range(600):
        if rng.random() < 0.5:
            pieces.append(" ".join(_sentence(rng) for _ in range(rng.randint(2, 6))))
        else:
            pieces.append("\n".join(_code_line(rng) for _ in range(rng.randint(4, 12))))
    return pieces


def build_tokenizer(vocab_size: int = 2000):
    """Train the byte-level BPE and wrap it as a ``PreTrainedTokenizerFast``.

    Returns:
        PreTrainedTokenizerFast with ``eos_token=<|im_end|>``, ``pad_token=<|endoftext|>``,
        no bos, ``chat_template`` = ``CHAT_TEMPLATE``. ``len(tokenizer) <= vocab_size + 4``
        (the BPE may stop early on this small corpus; the 4 tool tags are added after).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Exactly Qwen2's normalizer and pre-tokenizer: ``AutoTokenizer`` loads a
    # ``model_type: qwen2`` directory as ``Qwen2Tokenizer``, which installs these
    # regardless of tokenizer.json, so training with anything else would make the
    # saved tokenizer encode differently from the one returned here. Byte-level:
    # every string round-trips and "\n" is one token (QwenContinuousTokenBuilder needs that).
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_TOKENS])

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        unk_token=None,
        extra_special_tokens=[IM_START],
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


def _add_end_of_turn_bias(model, eos_id: int, mean_turn_tokens: int) -> None:
    """Make ``eos_id`` about ``1 / mean_turn_tokens`` likely at every position.

    Qwen2's ``lm_head`` has no bias, so one is emulated: residual dimension 0 of
    every input embedding is set to a constant ``c`` much larger than the other
    entries (std 0.02), so after the final RMSNorm that dimension is ~``sqrt(hidden)``
    at every position whatever the context. ``lm_head`` (untied) reads dimension 0
    only for ``eos_id``, with the weight that turns it into a logit bias ``b``
    where ``exp(b) / (exp(b) + V - 1) = 1 / mean_turn_tokens``.
    """
    import torch

    with torch.no_grad():
        hidden = model.config.hidden_size
        vocab = model.config.vocab_size
        model.model.embed_tokens.weight[:, 0] = 1.0
        bias = math.log((vocab - 1) / max(mean_turn_tokens - 1, 1))
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[eos_id, 0] = bias / math.sqrt(hidden)


def build_tiny_model(
    out_dir: str | Path,
    *,
    seed: int = 0,
    vocab_size: int = 2000,
    hidden_size: int = 64,
    num_layers: int = 2,
    mean_turn_tokens: int = 24,
) -> Path:
    """Build the tokenizer and a random ``Qwen2ForCausalLM`` into ``out_dir``.

    Args:
        out_dir: directory to (over)write; created if missing.
        seed: torch seed for the weights (the tokenizer is seed-independent).
        vocab_size: BPE target size before the 4 added tool tags.
        hidden_size / num_layers: model width and depth (4 attention heads, 2 KV heads).
        mean_turn_tokens: mean sampled turn length at temperature 1 (see module doc).

    Returns:
        ``Path(out_dir)``, loadable with ``AutoTokenizer.from_pretrained`` /
        ``AutoModelForCausalLM.from_pretrained`` (config ``model_type == "qwen2"``).
        Same seed -> byte-identical weights and tokenizer.
    """
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_size)
    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        tie_word_embeddings=False,
        bos_token_id=pad_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.eval()
    _add_end_of_turn_bias(model, eos_id, mean_turn_tokens)
    # Qwen2.5-Instruct stops on either end token; so do generation utilities here.
    model.generation_config = GenerationConfig(
        bos_token_id=pad_id, eos_token_id=[eos_id, pad_id], pad_token_id=pad_id, do_sample=True
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=2000)
    args = parser.parse_args(argv)
    path = build_tiny_model(args.out_dir, seed=args.seed, vocab_size=args.vocab_size)
    print(path)


if __name__ == "__main__":
    main()
