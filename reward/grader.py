"""A grader: one reward config, one network policy, one cache, shared by many grades."""

from __future__ import annotations

from dataclasses import dataclass, field

from prepare.task import SWETask
from reward.cache import GradeCache
from reward.config import RewardConfig
from reward.grading import GradeResult, grade_patch
from reward.isolation import NetworkPolicy


@dataclass
class Grader:
    """Grades patches with a fixed ``RewardConfig``, reusing results of identical patches.

    Args:
        config: the reward settings.
        use_cache: share grades of identical filtered patches per instance
            (``reward.cache``); False grades every call from scratch.
        work_root: directory for temporary repository copies (None = system temp).

    Thread- and loop-safe: ``grade`` may be awaited from several event loops
    (verl reward threads) at once.
    """

    config: RewardConfig = field(default_factory=RewardConfig)
    use_cache: bool = True
    work_root: str | None = None
    network: NetworkPolicy = field(init=False)
    cache: GradeCache[GradeResult] | None = field(init=False)

    def __post_init__(self) -> None:
        self.network = NetworkPolicy(self.config.network)
        self.cache = GradeCache() if self.use_cache else None

    async def grade(self, task: SWETask, model_patch: str, *, skip_empty: bool = True) -> GradeResult:
        """Grade one patch (``reward.grading.grade_patch``); an empty patch runs nothing by default."""
        return await grade_patch(
            task,
            model_patch,
            work_root=self.work_root,
            skip_empty=skip_empty,
            config=self.config,
            network=self.network,
            cache=self.cache,
        )
