"""A grader: one reward config, one network policy, one cache, shared by many grades."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from core.task import SWETask
from reward.cache import GradeCache
from reward.config import RewardConfig
from reward.grading import GradeResult, grade_patch, score
from reward.isolation import NetworkPolicy, grading_policy
from reward.pristine import PristineTrees


@dataclass
class Grader:
    """Grades patches with a fixed ``RewardConfig``, reusing results of identical patches.

    Args:
        config: the reward settings.
        use_cache: share grades of identical filtered patches per instance
            (``reward.cache``); False grades every call from scratch.
        work_root: directory for temporary repository copies (None = system temp).
        use_pristine: copy each grade's tree from a checkout prepared once per
            (repository, commit) (``reward.pristine``) instead of cloning; the
            tree is the same. False clones for every grade.

    Thread- and loop-safe: ``grade`` may be awaited from several event loops
    (verl reward threads) at once.
    """

    config: RewardConfig = field(default_factory=RewardConfig)
    use_cache: bool = True
    work_root: str | None = None
    use_pristine: bool = True
    network: NetworkPolicy = field(init=False)
    cache: GradeCache[GradeResult] | None = field(init=False)
    pristine: PristineTrees | None = field(init=False)

    def __post_init__(self) -> None:
        self.network = grading_policy(self.config)
        self.cache = GradeCache() if self.use_cache else None
        self.pristine = PristineTrees(self.work_root) if self.use_pristine else None
        # Reference patches' outcomes by instance id (the ones an XFAIL/SKIPPED test is compared with).
        self._references: GradeCache[dict[str, str]] = GradeCache()

    def close(self) -> None:
        """Remove the prepared trees (also done when the grader is garbage-collected)."""
        if self.pristine is not None:
            self.pristine.close()

    async def grade(self, task: SWETask, model_patch: str, *, skip_empty: bool = True) -> GradeResult:
        """Grade one patch (``reward.grading.grade_patch``); an empty patch runs nothing by default.

        When a listed test ended XFAIL/XPASS/SKIPPED, the task's reference patch is graded
        once (per grader and instance) and the result re-scored with its outcomes: such a
        test passes only if it ends the same way with the reference.
        """
        result = await grade_patch(
            task,
            model_patch,
            work_root=self.work_root,
            skip_empty=skip_empty,
            config=self.config,
            network=self.network,
            cache=self.cache,
            pristine=self.pristine,
        )
        if not result.needs_reference:
            return result
        reference = await self.reference_outcomes(task)
        rescored = copy.deepcopy(result)
        score(rescored, task, self.config.variant, reference)
        return rescored

    async def reference_outcomes(self, task: SWETask) -> dict[str, str]:
        """The reference patch's outcomes of the task's listed tests (graded once per instance)."""

        async def compute() -> dict[str, str]:
            graded = await grade_patch(task, task.patch, work_root=self.work_root, config=self.config,
                                       network=self.network, pristine=self.pristine, as_reference=True)
            return dict(graded.outcomes)

        outcomes, _ = await self._references.get_or_compute(task.instance_id, compute)
        return outcomes
