"""verl's custom reward entry point, called as verl calls it."""

from __future__ import annotations

import pytest

from reward.compute_score import SCORE_KEYS, compute_score

KEYS = set(SCORE_KEYS)


def _extra(task) -> dict:
    return {**task.to_extra_info(), "index": 3, "split": "train", "num_turns": 4}


def _core(result: dict) -> dict:
    return {key: result[key] for key in ("score", "resolved", "patch_applied", "error")}


def test_resolved_outside_event_loop(calc_task, tmp_path):
    result = compute_score(calc_task.data_source, calc_task.patch, calc_task.patch, _extra(calc_task),
                           work_root=str(tmp_path))
    assert set(result) == KEYS
    assert _core(result) == {"score": 1.0, "resolved": 1.0, "patch_applied": 1.0, "error": ""}
    assert result["f2p_pass_fraction"] == 1.0 and result["p2p_broken"] == 0.0
    # The same patch again (another rollout of the group) is served by the grader's cache.
    again = compute_score(calc_task.data_source, calc_task.patch, calc_task.patch, _extra(calc_task),
                          work_root=str(tmp_path))
    assert again["cached"] == 1.0 and _core(again) == _core(result)


async def test_inside_running_loop_and_model_patch_key(calc_task):
    # verl passes the decoded response as solution_str; the loop's extracted patch wins.
    extra = {**_extra(calc_task), "model_patch": "not a diff at all\n"}
    result = compute_score(calc_task.data_source, calc_task.patch, calc_task.patch, extra_info=extra)
    assert set(result) == KEYS
    assert _core(result) == {"score": 0.0, "resolved": 0.0, "patch_applied": 0.0, "error": "patch_parse_error"}


def test_empty_patch_is_not_graded(calc_task):
    result = compute_score(calc_task.data_source, "", calc_task.patch, _extra(calc_task), timeout_s=30)
    assert set(result) == KEYS
    assert _core(result) == {"score": 0.0, "resolved": 0.0, "patch_applied": 0.0, "error": "empty_patch"}


def test_partial_variant(calc_task):
    # Fixes test_single ([5] -> 5) but not test_sum: one of two FAIL_TO_PASS tests.
    half = calc_task.patch.replace("+    for value in values:", "+    for value in values[len(values) > 2:]:")
    assert half != calc_task.patch
    result = compute_score("s", half, calc_task.patch, _extra(calc_task), variant="partial", use_cache=False)
    assert set(result) == KEYS
    assert result["score"] == 0.5 and result["resolved"] == 0.0 and result["f2p_pass_fraction"] == 0.5
    binary = compute_score("s", half, calc_task.patch, _extra(calc_task), use_cache=False)
    assert binary["score"] == 0.0


def test_similarity_variant_runs_no_tests(calc_task):
    missing_repo = {**_extra(calc_task), "repo_path": "/nonexistent/repo"}  # tests could not run at all
    same = compute_score("s", calc_task.patch, calc_task.patch, missing_repo, variant="similarity")
    other = compute_score("s", calc_task.patch.replace("values:", "values[0:]:"), calc_task.patch, missing_repo,
                          variant="similarity")
    junk = compute_score("s", "no diff here", calc_task.patch, missing_repo, variant="similarity")
    empty = compute_score("s", "", calc_task.patch, missing_repo, variant="similarity")
    for result in (same, other, junk, empty):
        assert set(result) == KEYS
    assert same["score"] == 1.0 and same["error"] == ""
    assert 0.5 < other["score"] < 1.0
    assert junk["score"] == -1.0 and junk["error"] == "patch_parse_error"
    assert empty["score"] == 0.0


def test_bad_settings_and_missing_extra_info_are_errors(calc_task):
    with pytest.raises(ValueError):
        compute_score("swe_simple", "", "", None)
    with pytest.raises(ValueError, match="variant"):
        compute_score("s", "", "", _extra(calc_task), variant="best")


def test_similarity_respects_the_size_limit(calc_task):
    result = compute_score("s", calc_task.patch, calc_task.patch, _extra(calc_task), variant="similarity",
                           max_patch_bytes=50)
    assert set(result) == KEYS and result["score"] == 0.0 and result["error"] == "patch_too_large"
