"""verl's custom reward entry point, called as verl calls it."""

from __future__ import annotations

import pytest

from reward.compute_score import compute_score

KEYS = {"score", "resolved", "patch_applied", "error"}


def _extra(task) -> dict:
    return {**task.to_extra_info(), "index": 3, "split": "train", "num_turns": 4}


def test_resolved_outside_event_loop(calc_task):
    result = compute_score(calc_task.data_source, calc_task.patch, calc_task.patch, _extra(calc_task))
    assert result == {"score": 1.0, "resolved": 1.0, "patch_applied": 1.0, "error": ""}


async def test_inside_running_loop_and_model_patch_key(calc_task):
    # verl passes the decoded response as solution_str; the loop's extracted patch wins.
    extra = {**_extra(calc_task), "model_patch": "not a diff at all\n"}
    result = compute_score(calc_task.data_source, calc_task.patch, calc_task.patch, extra_info=extra)
    assert set(result) == KEYS
    assert result == {"score": 0.0, "resolved": 0.0, "patch_applied": 0.0, "error": "patch_parse_error"}


def test_empty_patch_is_not_graded(calc_task):
    result = compute_score(calc_task.data_source, "", calc_task.patch, _extra(calc_task), timeout_s=30)
    assert result == {"score": 0.0, "resolved": 0.0, "patch_applied": 0.0, "error": "empty_patch"}


def test_missing_extra_info_is_a_programmer_error():
    with pytest.raises(ValueError):
        compute_score("swe_simple", "", "", None)
