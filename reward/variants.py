"""Reward variants (``RewardConfig.variant``): from a grade's test report to a number.

- ``binary``: 1.0 when resolved (every FAIL_TO_PASS and PASS_TO_PASS test passes,
  SWE-bench's ``ResolvedStatus.FULL``), else 0.0.
- ``partial``: the fraction of FAIL_TO_PASS tests passing, 0.0 when any
  PASS_TO_PASS test fails (a fix that breaks working code earns nothing).
- ``similarity``: SWE-RL (Wei et al. 2025, "SWE-RL: Advancing LLM Reasoning via
  Reinforcement Learning on Open Software Evolution", eq. 1):
  ``difflib.SequenceMatcher(None, predicted, oracle).ratio()`` between the model
  patch and the reference patch, -1.0 when the model output is not a patch.
  Runs no test: the cheap fallback when no tests can run.
"""

from __future__ import annotations

import difflib

from reward.patch import PatchError, normalize_patch, split_protected_changes

# Similarity of an output that is not a unified diff (SWE-RL's format penalty).
UNPARSABLE_SIMILARITY = -1.0


def binary_reward(tests: dict[str, dict[str, list[str]]]) -> float:
    """1.0 when no FAIL_TO_PASS or PASS_TO_PASS test failed and at least one test is listed, else 0.0."""
    listed = any(tests[key]["success"] or tests[key]["failure"] for key in ("FAIL_TO_PASS", "PASS_TO_PASS"))
    failed = any(tests[key]["failure"] for key in ("FAIL_TO_PASS", "PASS_TO_PASS"))
    return 1.0 if listed and not failed else 0.0


def partial_reward(tests: dict[str, dict[str, list[str]]]) -> float:
    """Fraction of FAIL_TO_PASS tests passing in [0, 1]; 0.0 if any PASS_TO_PASS test failed or none is listed."""
    if tests["PASS_TO_PASS"]["failure"]:
        return 0.0
    passed, failed = len(tests["FAIL_TO_PASS"]["success"]), len(tests["FAIL_TO_PASS"]["failure"])
    return passed / (passed + failed) if passed + failed else 0.0


def patch_similarity(model_patch: str, reference_patch: str) -> float:
    """SWE-RL patch similarity in [0, 1], or -1.0 when ``model_patch`` is not a unified diff.

    Both patches are compared after removing protected-file changes and git
    ``index`` lines (``reward.patch.normalize_patch``), so editing tests or
    object ids neither earns nor costs similarity. An empty model patch scores
    0.0 against a non-empty reference.
    """
    try:
        kept, _ = split_protected_changes(model_patch)
    except PatchError:
        return UNPARSABLE_SIMILARITY
    try:
        reference, _ = split_protected_changes(reference_patch)
    except PatchError:
        reference = reference_patch
    return difflib.SequenceMatcher(None, normalize_patch(kept), normalize_patch(reference)).ratio()
