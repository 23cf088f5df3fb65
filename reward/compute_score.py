"""verl custom reward function: hidden-test grading of a model patch.

Configure with ``custom_reward_function.path=reward/compute_score.py``
``custom_reward_function.name=compute_score``; keys under
``custom_reward_function.reward_kwargs`` arrive as ``**kwargs`` (``timeout_s``).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prepare.task import SWETask
from reward.grading import GradeResult, grade_patch

# The extra_info key an agent loop may fill (through AgentLoopOutput.extra_fields,
# which verl merges into extra_info) with the patch it extracted from the sandbox.
MODEL_PATCH_KEY = "model_patch"


def _grade_sync(task: SWETask, patch: str, timeout_s: float, work_root: str | None) -> GradeResult:
    def run() -> GradeResult:
        return asyncio.run(grade_patch(task, patch, timeout_s=timeout_s, work_root=work_root, skip_empty=True))

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return run()
    # Called from code running inside an event loop: asyncio.run would refuse, so
    # grade on a worker thread with its own loop (this call still blocks its caller).
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="swe-grade") as pool:
        return pool.submit(run).result()


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: str,
    extra_info: dict[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, float | str]:
    """Grade one rollout's patch against the task's hidden tests.

    Args:
        data_source: the row's data source (unused; every source is graded alike).
        solution_str: the model patch (a unified diff against ``base_commit``).
            When ``extra_info["model_patch"]`` is a string it is used instead:
            verl passes the decoded response tokens here, which for a multi-turn
            agent is the transcript, not the patch.
        ground_truth: the reference patch (unused: grading runs the tests).
        extra_info: the row's ``extra_info`` (``SWETask.to_extra_info()`` plus
            verl's keys); the task is rebuilt from it.
        **kwargs: ``timeout_s`` (float, seconds for the test run, default 300),
            ``work_root`` (str, directory for temporary copies).

    Returns:
        Always the same keys: ``score`` (1.0 resolved / 0.0), ``resolved`` (1.0/0.0),
        ``patch_applied`` (1.0/0.0), ``error`` (the grade's error class, "" if none).

    Raises:
        ValueError: ``extra_info`` is missing.
        pydantic.ValidationError: ``extra_info`` does not describe a task.
    """
    if extra_info is None:
        raise ValueError("compute_score needs the row's extra_info to rebuild the task")
    task = SWETask.from_extra_info(extra_info)
    candidate = extra_info.get(MODEL_PATCH_KEY)
    patch = candidate if isinstance(candidate, str) else (solution_str or "")
    timeout_s = float(kwargs.get("timeout_s", 300.0))
    work_root = kwargs.get("work_root")
    result = _grade_sync(task, patch, timeout_s, work_root)
    return {
        "score": float(result.reward),
        "resolved": 1.0 if result.resolved else 0.0,
        "patch_applied": 1.0 if result.patch_applied else 0.0,
        "error": result.error or "",
    }
