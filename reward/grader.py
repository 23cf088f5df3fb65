"""A grader: one reward config, one network policy, one cache, shared by many grades."""

from __future__ import annotations

import asyncio
import copy
import threading
from dataclasses import dataclass, field

from core.task import SWETask
from reward.cache import GradeCache
from reward.config import RewardConfig
from reward.container import ContainerGrading, in_container
from reward.grading import GradeResult, grade_patch, score
from reward.isolation import NetworkPolicy, grading_policy
from core.pristine import PristineTrees
from sandbox.docker_sandbox import DockerSettings


@dataclass
class Grader:
    """Grades patches with a fixed ``RewardConfig``, reusing results of identical patches.

    Args:
        config: the reward settings.
        use_cache: share grades of identical filtered patches per instance
            (``reward.cache``); False grades every call from scratch.
        work_root: directory for temporary repository copies (None = system temp).
        use_pristine: copy each grade's tree from a checkout prepared once per
            (repository, commit) (``core.pristine``) instead of cloning; the
            tree is the same. False clones for every grade.
        containers: the Docker engine for grades in containers (``RewardConfig.backend``;
            pass the rollouts' so both share one image-tree store); None = connected on
            the first grade that needs one, with ``docker_settings``.
        docker_settings: engine address, limits and base image of that connection.

    Thread- and loop-safe: ``grade`` may be awaited from several event loops
    (verl reward threads) at once.
    """

    config: RewardConfig = field(default_factory=RewardConfig)
    use_cache: bool = True
    work_root: str | None = None
    use_pristine: bool = True
    containers: ContainerGrading | None = None
    docker_settings: DockerSettings = field(default_factory=DockerSettings)
    network: NetworkPolicy = field(init=False)
    cache: GradeCache[GradeResult] | None = field(init=False)
    pristine: PristineTrees | None = field(init=False)

    def __post_init__(self) -> None:
        self.network = grading_policy(self.config)
        self.cache = GradeCache() if self.use_cache else None
        self.pristine = PristineTrees(self.work_root) if self.use_pristine else None
        # Reference patches' outcomes by instance id (the ones an XFAIL/SKIPPED test is compared with).
        self._references: GradeCache[dict[str, str]] = GradeCache()
        self._connect_lock = threading.Lock()
        self._own_containers = False

    async def containers_for(self, task: SWETask) -> ContainerGrading | None:
        """The engine connection when ``task``'s grade runs in a container (connects once); None when
        it does not or no engine answers (the grade then reports ``sandbox_error``)."""
        if not in_container(task, self.config.backend):
            return None

        def connect() -> ContainerGrading | None:
            with self._connect_lock:
                if self.containers is None:
                    try:
                        self.containers = ContainerGrading.connect(self.docker_settings)
                        self._own_containers = True
                    except Exception:  # noqa: BLE001 - reported per grade as sandbox_error
                        return None
                return self.containers

        return self.containers if self.containers is not None else await asyncio.to_thread(connect)

    def close(self) -> None:
        """Remove the prepared trees (also done when the grader is garbage-collected) and close the
        engine connection this grader made."""
        if self.pristine is not None:
            self.pristine.close()
        if self._own_containers and self.containers is not None:
            self.containers.close()
            self.containers, self._own_containers = None, False

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
            containers=await self.containers_for(task),
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
                                       network=self.network, pristine=self.pristine, as_reference=True,
                                       containers=await self.containers_for(task))
            return dict(graded.outcomes)

        outcomes, _ = await self._references.get_or_compute(task.instance_id, compute)
        return outcomes
