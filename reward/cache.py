"""Grade each distinct (instance, patch) once: a result cache with shared in-flight work.

In a GRPO group many rollouts of one task submit the same patch (empty patches,
identical fixes). The key is ``(instance_id, sha256(normalised patch))``
(``reward.patch.normalize_patch`` of the patch with protected changes removed), so
patches that differ only in stripped test edits or git ``index`` lines share a
grade. Safe across threads and event loops: verl may call ``compute_score`` from
several threads, each running its own loop, so the in-flight marker is a
``concurrent.futures.Future`` that any loop can await.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")

CacheKey = tuple[str, str]


def cache_key(instance_id: str, normalized_patch: str) -> CacheKey:
    """``(instance_id, sha256 hex of the normalised patch)``."""
    return instance_id, hashlib.sha256(normalized_patch.encode("utf-8")).hexdigest()


class _Abandoned(Exception):
    """The grading that owned a key was cancelled; a waiter grades it itself."""


@dataclass
class CacheStats:
    """Counters: ``hits`` (finished result reused), ``joins`` (waited on an in-flight grade), ``misses``."""

    hits: int = 0
    joins: int = 0
    misses: int = 0


@dataclass
class GradeCache(Generic[T]):
    """A bounded LRU of finished results plus the futures of grades in flight.

    Args:
        max_entries: finished results kept (least recently used dropped first).

    Exceptions raised by a grade are passed to every waiter and not cached; a
    cancelled owner hands the key to the next waiter, which grades it again.
    """

    max_entries: int = 100_000
    stats: CacheStats = field(default_factory=CacheStats)
    _done: OrderedDict[CacheKey, T] = field(default_factory=OrderedDict, init=False, repr=False)
    _inflight: dict[CacheKey, Future] = field(default_factory=dict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._done)

    async def get_or_compute(self, key: CacheKey, compute: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """The result for ``key``, computing it at most once at a time.

        Returns:
            ``(result, shared)``: ``shared`` is True when the result came from the
            cache or from another caller's grade in flight.

        Raises:
            Whatever ``compute`` raises (also to callers that joined it).
            asyncio.CancelledError: this caller was cancelled.
        """
        while True:
            with self._lock:
                if key in self._done:
                    self._done.move_to_end(key)
                    self.stats.hits += 1
                    return self._done[key], True
                future = self._inflight.get(key)
                owner = future is None
                if owner:
                    future = Future()
                    # RUNNING futures cannot be cancelled: a waiter that is itself
                    # cancelled (wrap_future cancels its source) leaves it alone.
                    future.set_running_or_notify_cancel()
                    self._inflight[key] = future
                    self.stats.misses += 1
                else:
                    self.stats.joins += 1
            if not owner:
                try:
                    return await asyncio.wrap_future(future), True
                except _Abandoned:
                    continue
            try:
                result = await compute()
            except BaseException as exc:
                with self._lock:
                    self._inflight.pop(key, None)
                if isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt, SystemExit)):
                    future.set_exception(_Abandoned())
                else:
                    future.set_exception(exc)
                raise
            with self._lock:
                self._done[key] = result
                while len(self._done) > self.max_entries:
                    self._done.popitem(last=False)
                self._inflight.pop(key, None)
            future.set_result(result)
            return result, False
