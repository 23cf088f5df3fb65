"""One explicit object owns a worker's proxy server, resource shim and graders.

It makes each part once (concurrent first users share one proxy start), is one per
event loop when verl's worker makes it implicitly, refuses a loop whose settings for a
shared part differ (instead of silently handing it the first loop's server or pool),
and closes everything together.
"""

from __future__ import annotations

import asyncio

import pytest

from recipe.config import load_swe_agent_config
from recipe.worker_resources import WorkerResources
from reward.config import RewardConfig


async def test_parts_are_made_once_and_closed_together():
    config = load_swe_agent_config()
    async with WorkerResources(config) as resources:
        first, second = await asyncio.gather(resources.proxy(), resources.proxy())
        assert first is second and not first.stopped
        assert resources.shim() is resources.shim()
        grader = resources.grader(RewardConfig())
        assert resources.grader(RewardConfig()) is grader
        assert resources.grader(RewardConfig(variant="partial")) is not grader
    assert first.stopped and resources.closed
    with pytest.raises(RuntimeError, match="closed"):
        await resources.proxy()


async def test_one_per_event_loop_and_settings_must_agree():
    config = load_swe_agent_config()
    mine = WorkerResources.for_running_loop(config)
    assert WorkerResources.for_running_loop(config) is mine

    def other_loop() -> int:
        async def run():
            theirs = WorkerResources.for_running_loop(config)
            await theirs.aclose()
            return id(theirs)
        return asyncio.run(run())

    assert await asyncio.to_thread(other_loop) != id(mine)
    with pytest.raises(ValueError, match=r"swe_agent\.proxy\.port=8123 differs"):
        WorkerResources.for_running_loop(load_swe_agent_config({"proxy": {"port": 8123}}))
    with pytest.raises(ValueError, match=r"swe_agent\.sandbox\.shim=.*differs"):
        mine.check(load_swe_agent_config({"sandbox": {"shim": {"enabled": True}}}))
    await mine.aclose()
    assert WorkerResources.for_running_loop(config) is not mine  # a closed one is replaced
    await WorkerResources.for_running_loop(config).aclose()
