"""A rollout whose agent rewrote its history: one AgentLoopOutput per token segment."""

from __future__ import annotations


import pytest
from transformers import AutoTokenizer

from model_proxy.server import Segment, SessionResult
from recipe.outcome import ExitStatus
from recipe.phases import PhaseClock
from recipe.runners.mini_swe_agent import AgentRun
from recipe.swe_agent_loop import RolloutInfo, SWEAgentLoop
from recipe.trajectory import TrajectoryRecord


@pytest.fixture(scope="module")
def loop(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return SWEAgentLoop.standalone(tokenizer=tok, hf_model_type="qwen2", prompt_length=64, response_length=8)


def segment(prompt, response, mask):
    return Segment(prompt_ids=prompt, response_ids=response, response_mask=mask,
                   response_logprobs=[-0.5 if m else 0.0 for m in mask], messages=[{"role": "user", "content": "x"}],
                   num_turns=1)


def session(segments):
    last = segments[-1]
    return SessionResult(prompt_ids=last.prompt_ids, response_ids=last.response_ids, response_mask=last.response_mask,
                         response_logprobs=last.response_logprobs, messages=last.messages, num_turns=len(segments),
                         stop=None, error=None, generation_s=1.5, tool_s=0.5, turns=[], segments=segments)


def agent(status=ExitStatus.SUBMITTED):
    return AgentRun(exit_status=status, raw_exit_status="Submitted", n_calls=2, duration_s=3.0)


def test_each_segment_becomes_an_output_with_the_rollout_reward(loop):
    segments = [segment([1, 2, 3], [4, 5, 6], [1, 1, 0]),
                segment([1, 2, 9], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [1] * 10)]
    info = RolloutInfo(instance_id="i", rollout_id="r", exit_status="submitted", resolved=True, reward=1.0)
    outputs = loop._output_from_session(session(segments), agent(), info, PhaseClock())
    assert isinstance(outputs, list) and len(outputs) == 2
    assert outputs[0].prompt_ids == [1, 2, 3] and outputs[0].response_ids == [4, 5, 6]
    assert outputs[0].response_mask == [1, 1, 0]
    # The response budget caps every segment (rollout.response_length = 8).
    assert len(outputs[1].response_ids) == len(outputs[1].response_mask) == len(outputs[1].response_logprobs) == 8
    assert all(o.reward_score == 1.0 for o in outputs)
    assert [o.extra_fields["segment"] for o in outputs] == [0, 1]
    assert all(o.extra_fields["num_segments"] == 2 for o in outputs)
    record = TrajectoryRecord.from_output(outputs, data_source="d", policy="model")
    assert record.num_segments == 2 and record.response_tokens == 3 + 8 and record.sampled_tokens == 2 + 8


def test_masking_covers_every_segment(loop):
    segments = [segment([1], [2, 3], [1, 1]), segment([1, 4], [5], [1])]
    info = RolloutInfo(instance_id="i", rollout_id="r", exit_status="step_limit")
    outputs = loop._output_from_session(session(segments), agent(ExitStatus.STEP_LIMIT), info, PhaseClock())
    assert all(sum(o.response_mask) == 0 for o in outputs)
    # Every row says so, not only the last (earlier segments recorded masked=False).
    assert all(o.extra_fields["masked"] and o.extra_fields["segment_masked"] for o in outputs)


def test_a_segment_without_samples_is_masked_alone(loop):
    # The agent's last request was a rewrite answered by nothing: only that row trains nothing.
    segments = [segment([1], [2, 3], [1, 1]), segment([1, 4], [5], [0])]
    info = RolloutInfo(instance_id="i", rollout_id="r", exit_status="submitted", reward=1.0)
    outputs = loop._output_from_session(session(segments), agent(), info, PhaseClock())
    assert [o.extra_fields["segment_masked"] for o in outputs] == [False, True]
    assert outputs[0].response_mask == [1, 1]
    assert not any(o.extra_fields["masked"] for o in outputs)  # the trajectory still trains


def test_single_segment_is_a_single_output(loop):
    info = RolloutInfo(instance_id="i", rollout_id="r", exit_status="submitted")
    out = loop._output_from_session(session([segment([1], [2], [1])]), agent(), info, PhaseClock())
    assert not isinstance(out, list) and out.response_ids == [2]
