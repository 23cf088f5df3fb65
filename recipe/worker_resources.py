"""What one agent-loop worker owns and shares between its rollouts.

verl makes a new ``SWEAgentLoop`` object for every sample, but some things belong to
the worker process: the ModelProxy server every rollout's agent talks to (one port,
one executor), the resource shim (one memory pool for all of the worker's sandboxes),
the graders (their grade caches must see every rollout of a GRPO group) and, for the
docker backend, the container factory (one start-concurrency cap, one reaper).
``WorkerResources`` owns them, makes each on first use and closes them together.

Who makes it:
- the rollout CLI (``recipe.rollout``) makes one per run and closes it at the end;
- tests and other callers of ``SWEAgentLoop.standalone`` pass one (``resources=``);
- under verl's ``AgentLoopWorker`` (which has no hook for per-worker state) the first
  loop of a worker's event loop makes it (``for_running_loop``), and it lives as long
  as that event loop.

A loop whose settings for a shared part differ from the ones it was made with is
refused (``ValueError`` naming the setting) rather than silently given the first
loop's server or pool.
"""

from __future__ import annotations

import asyncio
import dataclasses
import weakref
from typing import Any

from model_proxy.server import ModelProxyServer
from reward.config import RewardConfig
from reward.container import ContainerGrading
from reward.grader import Grader
from sandbox.docker_sandbox import DockerSandboxFactory
from sandbox.shim import ResourceShim

from core.pristine import PristineTrees
from recipe.config import SWEAgentConfig
from recipe.runners.warm_start import WarmStartPool


class WorkerResources:
    """The proxy server, resource shim and graders of one agent-loop worker.

    Args:
        config: the ``swe_agent`` settings the shared parts are made from (``proxy.host``,
            ``proxy.port``, ``proxy.freeze_gc``, ``sandbox.shim``); loops using this object
            must agree on them (``check``).

    Use ``async with WorkerResources(cfg) as resources:`` or call ``aclose()``.
    """

    def __init__(self, config: SWEAgentConfig) -> None:
        self._proxy_settings = {
            "host": config.proxy.host, "port": config.proxy.port, "freeze_gc": config.proxy.freeze_gc,
        }
        self._shim_settings = dataclasses.replace(config.sandbox.shim)
        self._sandbox_backend = config.sandbox.backend
        if self._sandbox_backend == "docker" and _remote_engine(config.sandbox.docker.base_url):
            self._sandbox_backend = "docker-remote"  # its containers' cgroups are not on this host
        self._docker_settings = dataclasses.replace(config.sandbox.docker)
        self._docker: DockerSandboxFactory | None = None
        self._proxy_start: asyncio.Task[ModelProxyServer] | None = None
        self._shim: ResourceShim | None = None
        self._graders: dict[RewardConfig, Grader] = {}
        self._max_prepared_trees = config.sandbox.max_prepared_trees
        self._trees: PristineTrees | None = None
        self._warm_start_timeout_s = config.agent.warm_start_timeout_s
        self._warm: WarmStartPool | None = None
        self.closed = False

    # -- the per-event-loop default (verl's AgentLoopWorker) ---------------------------------

    _by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, WorkerResources] = weakref.WeakKeyDictionary()

    @classmethod
    def for_running_loop(cls, config: SWEAgentConfig) -> WorkerResources:
        """The resources of the running event loop's worker, made on first use.

        Raises:
            RuntimeError: no running event loop.
            ValueError: ``config`` disagrees with the settings they were made with.
        """
        loop = asyncio.get_running_loop()
        resources = cls._by_loop.get(loop)
        if resources is None or resources.closed:
            resources = cls._by_loop[loop] = cls(config)
        resources.check(config)
        return resources

    @classmethod
    async def close_for_running_loop(cls) -> None:
        """Close and forget the running event loop's resources, if it has any (tests, scripts)."""
        resources = cls._by_loop.pop(asyncio.get_running_loop(), None)
        if resources is not None:
            await resources.aclose()

    # -- the parts ------------------------------------------------------------------------------

    def check(self, config: SWEAgentConfig) -> None:
        """Refuse a loop whose shared-part settings differ from these.

        Raises:
            ValueError: naming the first differing ``swe_agent`` key and both values.
        """
        for key, value in self._proxy_settings.items():
            theirs = getattr(config.proxy, key)
            if theirs != value:
                raise ValueError(f"swe_agent.proxy.{key}={theirs!r} differs from this worker's proxy ({value!r}): "
                                 "one worker serves one proxy")
        if config.sandbox.docker != self._docker_settings:
            raise ValueError(f"swe_agent.sandbox.docker={config.sandbox.docker} differs from this worker's "
                             f"({self._docker_settings}): one worker has one container factory")
        if config.agent.warm_start_timeout_s != self._warm_start_timeout_s:
            raise ValueError(f"swe_agent.agent.warm_start_timeout_s={config.agent.warm_start_timeout_s} differs from "
                             f"this worker's ({self._warm_start_timeout_s}): one worker has one set of fork servers")
        if config.sandbox.shim != self._shim_settings:
            raise ValueError(f"swe_agent.sandbox.shim={config.sandbox.shim} differs from this worker's "
                             f"({self._shim_settings}): one worker has one memory pool")

    async def proxy(self) -> ModelProxyServer:
        """The worker's proxy server, started on first use (concurrent first callers share
        one start; a start that failed is retried by the next caller).

        Raises:
            RuntimeError: the resources are closed.
            OSError / RuntimeError: the server could not start (``ModelProxyServer.start``).
        """
        self._refuse_if_closed()
        task = self._proxy_start
        if task is not None and task.done() and (task.cancelled() or task.exception() is not None):
            task = None
        if task is None:
            task = self._proxy_start = asyncio.get_running_loop().create_task(
                ModelProxyServer.start(**self._proxy_settings), name="worker-proxy-start")
        # shield: a caller cancelled while waiting must not cancel the start for the others.
        return await asyncio.shield(task)

    def sandbox_trees(self) -> PristineTrees:
        """The checkouts rollout sandboxes are copied from (``sandbox.prepared_trees``): one per
        (repository, commit), made on first use; the graders keep their own."""
        self._refuse_if_closed()
        if self._trees is None:
            self._trees = PristineTrees(max_trees=self._max_prepared_trees, prefix="sandbox-pristine-")
        return self._trees

    def warm_starts(self) -> WarmStartPool:
        """The worker's warm-start fork servers (``recipe.runners.warm_start``), started on first use."""
        self._refuse_if_closed()
        if self._warm is None:
            self._warm = WarmStartPool(self._warm_start_timeout_s)
        return self._warm

    def shim(self) -> ResourceShim:
        """The worker's resource shim (its one memory pool), made on first use."""
        self._refuse_if_closed()
        if self._shim is None:
            self._shim = ResourceShim(self._shim_settings, sandbox_backend=self._sandbox_backend)
        return self._shim

    async def docker(self) -> DockerSandboxFactory:
        """The worker's Docker sandbox factory (its start-concurrency cap shared by every rollout),
        made on first use; containers of dead owners are reaped then, this worker's own at close.

        Raises:
            docker.errors.DockerException: no engine answers at ``sandbox.docker.base_url``.
        """
        self._refuse_if_closed()
        if self._docker is None:
            import docker

            settings = self._docker_settings
            client = await asyncio.to_thread(
                lambda: docker.DockerClient(base_url=settings.base_url) if settings.base_url else docker.from_env())
            factory = DockerSandboxFactory(client, settings)
            await asyncio.to_thread(factory.reap)
            if self._docker is None:  # another rollout made one meanwhile: keep the first
                self._docker = factory
            else:
                client.close()
        return self._docker

    def grader(self, config: RewardConfig) -> Grader:
        """The worker's grader for these reward settings (its grade cache shared by every
        rollout of the worker), made on first use."""
        self._refuse_if_closed()
        grader = self._graders.get(config)
        if grader is None:
            # Grades in containers share the rollouts' engine connection and image trees when there is one.
            containers = None if self._docker is None else ContainerGrading(
                self._docker.client, self._docker_settings, trees=self._docker.trees, owner=self._docker.owner)
            grader = self._graders[config] = Grader(config=config, containers=containers,
                                                    docker_settings=self._docker_settings)
        return grader

    # -- lifetime -------------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop the proxy (closing its sessions), drop the shim, close the graders (their
        prepared trees). Idempotent."""
        if self.closed:
            return
        self.closed = True
        task, self._proxy_start = self._proxy_start, None
        if task is not None:
            try:
                server = await asyncio.shield(task)
            except Exception:  # it never started: nothing to stop
                server = None
            if server is not None:
                await server.stop()
        warm, self._warm = self._warm, None
        if warm is not None:
            await warm.aclose()  # the servers' running children die with them
        trees, self._trees = self._trees, None
        if trees is not None:
            await asyncio.to_thread(trees.close)
        # The shim holds no process resources of its own: each rollout's lease releases its group.
        self._shim = None
        for grader in self._graders.values():
            await asyncio.to_thread(grader.close)  # may remove trees and talk to the engine
        self._graders.clear()
        docker, self._docker = self._docker, None
        if docker is not None:
            await asyncio.to_thread(docker.reap, own=True)  # every container this worker made
            await asyncio.to_thread(docker.close)

    async def __aenter__(self) -> WorkerResources:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    def _refuse_if_closed(self) -> None:
        if self.closed:
            raise RuntimeError("these worker resources are closed")


def _remote_engine(base_url: str | None) -> bool:
    """Whether the Docker engine is on another host (``base_url`` or ``DOCKER_HOST`` not a unix socket)."""
    import os

    url = base_url or os.environ.get("DOCKER_HOST") or ""
    return bool(url) and not url.startswith("unix://")
