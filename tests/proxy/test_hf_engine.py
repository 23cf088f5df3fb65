"""The batched HF engine (continuous batching + prefix cache) against plain transformers forwards."""

from __future__ import annotations

import asyncio

import pytest
import torch

from model_proxy.backends.hf_local import EngineSettings, HFLocalBackend

GREEDY = {"temperature": 0.0, "stop_token_ids": []}


def _reference_greedy(model, prompt: list[int], n: int, stop_ids: set[int]) -> tuple[list[int], list[float]]:
    """Greedy decoding by re-running the whole sequence each step (no cache, batch of one)."""
    ids, out, logprobs = list(prompt), [], []
    with torch.inference_mode():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            token = int(logits.argmax())
            out.append(token)
            logprobs.append(float(torch.log_softmax(logits, -1)[token]))
            ids.append(token)
            if token in stop_ids:
                break
    return out, logprobs


@pytest.fixture(scope="module")
def no_eos_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with its end-of-turn bias reversed (``prepare.tiny_model``), so turns run long."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.lm_head.weight[2, 0] = -10.0  # <|im_end|>'s logit ~ -80: never sampled
    out = tmp_path_factory.mktemp("no_eos_model")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def reference_model(no_eos_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(no_eos_model_dir, attn_implementation="eager").eval()


def _engine(path, **settings) -> HFLocalBackend:
    return HFLocalBackend(path, seed=0, num_threads=1, settings=EngineSettings(**settings))


async def test_concurrent_requests_are_batched_and_equal_unbatched_greedy(no_eos_model_dir, reference_model):
    prompts = [[1, 10 + i, 11, 12, 13, 14, 15 + i, 16, 17][: 3 + i] for i in range(6)]
    engine = _engine(no_eos_model_dir, max_num_seqs=4, prefill_chunk_tokens=2)
    try:
        outputs = await asyncio.gather(
            *[engine.generate(f"r{i}", p, {**GREEDY, "max_tokens": 6 + i}) for i, p in enumerate(prompts)]
        )
        stats = engine.stats
    finally:
        engine.close()
    for i, (prompt, output) in enumerate(zip(prompts, outputs)):
        tokens, logprobs = _reference_greedy(reference_model, prompt, 6 + i, engine.stop_token_ids)
        assert output.token_ids == tokens
        assert output.logprobs == pytest.approx(logprobs, abs=1e-4)
        assert output.stop_reason == "length"
    # Six requests through four slots: decode steps carried several sequences at once.
    assert stats.mean_batch > 1.5
    assert stats.decode_steps < sum(6 + i for i in range(6))


async def test_next_turn_prefills_only_its_new_tokens(no_eos_model_dir, reference_model):
    engine = _engine(no_eos_model_dir)
    try:
        prompt = [1, 20, 21, 22, 23, 24, 25, 26]
        first = await engine.generate("traj", prompt, {**GREEDY, "max_tokens": 5})
        before = engine.reset_stats()
        # The agent's next request: the history plus a tool result.
        turn2 = prompt + first.token_ids + [30, 31, 32]
        second = await engine.generate("traj", turn2, {**GREEDY, "max_tokens": 5})
        stats = engine.reset_stats()
    finally:
        engine.close()
    assert before.reused_prompt_tokens == 0
    # Everything the first turn computed is reused (its last sampled token was never fed).
    assert stats.reused_prompt_tokens == len(prompt) + len(first.token_ids) - 1
    assert stats.prefilled_tokens == 4
    tokens, _ = _reference_greedy(reference_model, turn2, 5, engine.stop_token_ids)
    assert second.token_ids == tokens


async def test_group_siblings_share_the_first_prompt(no_eos_model_dir):
    engine = _engine(no_eos_model_dir)
    try:
        prompt = list(range(40, 90))
        sampled = {"temperature": 1.0, "max_tokens": 4, "stop_token_ids": []}
        outputs = await asyncio.gather(*[engine.generate(f"g{i}", prompt, sampled) for i in range(4)])
        stats = engine.stats
    finally:
        engine.close()
    assert len({tuple(o.token_ids) for o in outputs}) > 1  # seeded per request id: different samples
    assert stats.prefilled_tokens < 2 * len(prompt)
    assert stats.reused_prompt_tokens >= 3 * (len(prompt) - 1)


async def test_new_weights_change_samples_and_drop_the_cache(no_eos_model_dir):
    engine = _engine(no_eos_model_dir)
    try:
        prompt = [1, 5, 6, 7, 8]
        before = await engine.generate("w", prompt, {**GREEDY, "max_tokens": 4})
        state = {k: v + 0.5 * torch.randn_like(v) for k, v in engine.model.state_dict().items()}
        checksum = engine.parameter_checksum()
        report = engine.load_state_dict(state)
        assert engine.parameter_checksum() != checksum
        engine.reset_stats()
        after = await engine.generate("w", prompt, {**GREEDY, "max_tokens": 4})
        stats = engine.stats
    finally:
        engine.close()
    assert report["version"] == 1 and not report["unexpected"]
    assert after.weight_version == 1 and before.weight_version == 0
    assert stats.reused_prompt_tokens == 0  # keys computed with the old weights are gone
    assert before.token_ids != after.token_ids


async def test_abort_limits_and_bad_requests(no_eos_model_dir):
    engine = _engine(no_eos_model_dir, max_model_len=64, max_num_seqs=1)
    try:
        running = asyncio.ensure_future(engine.generate("a", [1, 2, 3], {**GREEDY, "max_tokens": 60}))
        queued = asyncio.ensure_future(engine.generate("b", [1, 2, 3], {**GREEDY, "max_tokens": 5}))
        while engine.stats.decode_steps < 2:
            await asyncio.sleep(0.01)
        assert await asyncio.to_thread(engine.abort_all) == 2
        aborted = await running
        assert aborted.stop_reason == "abort" and 0 < len(aborted.token_ids) < 60
        assert (await queued).stop_reason == "abort"
        # max_tokens past the context is cut to what fits.
        capped = await engine.generate("c", list(range(1, 61)), {**GREEDY, "max_tokens": 50})
        assert len(capped.token_ids) == 4 and capped.stop_reason == "length"
        with pytest.raises(ValueError, match="context"):
            await engine.generate("d", list(range(1, 65)), GREEDY)
        with pytest.raises(ValueError, match="empty"):
            await engine.generate("e", [], GREEDY)
        with pytest.raises(ValueError, match="top_p"):
            await engine.generate("f", [1], {"top_p": 0.0})
    finally:
        engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        await engine.generate("g", [1], GREEDY)
