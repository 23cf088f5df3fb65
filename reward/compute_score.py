"""verl custom reward function: hidden-test grading of a model patch.

Configure with ``custom_reward_function.path=reward/compute_score.py``
``custom_reward_function.name=compute_score``; keys under
``custom_reward_function.reward_kwargs`` arrive as ``**kwargs``: the fields of
``reward.config.RewardConfig`` (``variant``, ``timeout_s``, ``max_patch_bytes``,
``allow_binary``, ``network``) plus ``work_root`` and ``use_cache``.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from core.task import SWETask
from reward.config import RewardConfig
from reward.grader import Grader
from reward.grading import GradeResult

# The extra_info key an agent loop may fill (through AgentLoopOutput.extra_fields,
# which verl merges into extra_info) with the patch it extracted from the sandbox.
MODEL_PATCH_KEY = "model_patch"

# verl calls a plain function, so the graders (and their caches) that must outlive
# one call live here, one per distinct (config, work_root, use_cache); guarded for
# verl's reward threads. Cleared only with the process.
_GRADERS: dict[tuple[RewardConfig, str | None, bool], Grader] = {}
_GRADERS_LOCK = threading.Lock()

# The keys of every compute_score result (verl needs the same keys every time).
SCORE_KEYS = (
    "score",
    "resolved",
    "patch_applied",
    "error",
    "f2p_pass_fraction",
    "p2p_broken",
    "removed_files",
    "cached",
)


def get_grader(config: RewardConfig, work_root: str | None = None, use_cache: bool = True) -> Grader:
    """The process-wide grader for these settings (created on first use)."""
    key = (config, work_root, use_cache)
    with _GRADERS_LOCK:
        grader = _GRADERS.get(key)
        if grader is None:
            grader = _GRADERS[key] = Grader(config=config, use_cache=use_cache, work_root=work_root)
        return grader


def _grade_sync(grader: Grader, task: SWETask, patch: str) -> GradeResult:
    def run() -> GradeResult:
        return asyncio.run(grader.grade(task, patch, skip_empty=True))

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return run()
    # Called from code running inside an event loop: asyncio.run would refuse, so
    # grade on a worker thread with its own loop (this call still blocks its caller).
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="swe-grade") as pool:
        return pool.submit(run).result()


def score_dict(result: GradeResult) -> dict[str, float | str]:
    """The ``SCORE_KEYS`` dict of a grade: floats, and ``error`` as a string ("" if none)."""
    return {
        "score": float(result.reward),
        "resolved": 1.0 if result.resolved else 0.0,
        "patch_applied": 1.0 if result.patch_applied else 0.0,
        "error": result.error or "",
        "f2p_pass_fraction": float(result.f2p_pass_fraction),
        "p2p_broken": 1.0 if result.p2p_broken else 0.0,
        "removed_files": float(result.n_removed),
        "cached": 1.0 if result.cached else 0.0,
    }


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: str,
    extra_info: dict[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, float | str]:
    """Grade one rollout's patch against the task's hidden tests (or by similarity).

    Args:
        data_source: the row's data source (unused; every source is graded alike).
        solution_str: the model patch (a unified diff against ``base_commit``).
            When ``extra_info["model_patch"]`` is a string it is used instead:
            verl passes the decoded response tokens here, which for a multi-turn
            agent is the transcript, not the patch.
        ground_truth: the reference patch (the similarity variant uses the
            task's ``patch`` from ``extra_info``, which is the same text).
        extra_info: the row's ``extra_info`` (``SWETask.to_extra_info()`` plus
            verl's keys); the task is rebuilt from it.
        **kwargs: ``RewardConfig`` fields (``variant``: binary | partial |
            similarity; ``timeout_s``: seconds per test run, default 300; ...),
            ``work_root`` (str, directory for temporary copies), ``use_cache``
            (bool, default True).

    Returns:
        Always the keys of ``SCORE_KEYS``: ``score`` (the variant's reward),
        ``resolved``, ``patch_applied``, ``p2p_broken``, ``cached`` (1.0/0.0),
        ``f2p_pass_fraction`` (0..1), ``removed_files`` (count of stripped
        files), ``error`` (the grade's error class, "" if none).

    Raises:
        ValueError: ``extra_info`` is missing, or a reward setting is unknown (named,
            with the closest valid one) or invalid.
        pydantic.ValidationError: ``extra_info`` does not describe a task.
    """
    settings = {k: v for k, v in kwargs.items() if k not in ("work_root", "use_cache")}
    config = RewardConfig.from_mapping(settings, section="custom_reward_function.reward_kwargs")
    if extra_info is None:
        raise ValueError("compute_score needs the row's extra_info to rebuild the task")
    task = SWETask.from_extra_info(extra_info)
    candidate = extra_info.get(MODEL_PATCH_KEY)
    patch = candidate if isinstance(candidate, str) else (solution_str or "")
    use_cache = kwargs.get("use_cache", True)
    if isinstance(use_cache, str):
        use_cache = use_cache.strip().lower() in ("1", "true", "yes", "on")
    grader = get_grader(config, kwargs.get("work_root"), bool(use_cache))
    return score_dict(_grade_sync(grader, task, patch))
