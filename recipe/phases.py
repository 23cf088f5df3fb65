"""Where a rollout's wall time goes: named phases that add up to its total.

``PhaseClock.lap(name)`` gives the time since the previous lap to ``name``; ``split`` breaks a lap
into parts measured elsewhere (the proxy session's agent start, LLM calls, tool calls); ``finish``
adds ``other`` (what no lap named) so that the phases sum to ``total`` exactly. The phases, in
seconds, land in each rollout's record (``TrajectoryRecord.phases``) and the rollout summary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

# The rollout's phases in order (``SWEAgentLoop._rollout``): the resource shim's admission, the
# sandbox's creation, the agent process from its start to its first LLM request, the LLM calls
# (generation inside the backend; proxy = rendering, tokenizing and serving around it), the tool
# calls (a response leaving to the next request), the agent's exit after its last response, patch
# extraction, sandbox teardown (and the lease's release), grading, and what none of these covers.
PHASES = ("admission", "sandbox", "agent_start", "generation", "proxy", "tool", "agent_exit", "patch",
          "teardown", "grading", "other")


@dataclass
class PhaseClock:
    """Attributes one rollout's wall time (monotonic seconds) to phases.

    Attributes:
        started: ``time.monotonic()`` at the rollout's start.
        phases: seconds per phase name so far.
    """

    started: float = field(default_factory=time.monotonic)
    phases: dict[str, float] = field(default_factory=dict)
    _last: float | None = None

    def elapsed(self) -> float:
        """Seconds since ``started``."""
        return time.monotonic() - self.started

    def lap(self, name: str) -> float:
        """Give the seconds since the previous lap (or the start) to ``name``; returns them."""
        now = time.monotonic()
        spent = now - (self.started if self._last is None else self._last)
        self._last = now
        self.phases[name] = self.phases.get(name, 0.0) + spent
        return spent

    def split(self, name: str, parts: dict[str, float]) -> None:
        """Replace phase ``name`` by ``parts`` (seconds measured inside it); what they leave of it
        stays under ``name``. Parts larger than the phase (clock skew) are scaled down to fit it."""
        whole = self.phases.pop(name, 0.0)
        measured = sum(max(0.0, v) for v in parts.values())
        scale = min(1.0, whole / measured) if measured > 0 else 1.0
        for part, seconds in parts.items():
            self.phases[part] = self.phases.get(part, 0.0) + max(0.0, seconds) * scale
        rest = whole - measured * scale
        if rest > 0:
            self.phases[name] = self.phases.get(name, 0.0) + rest

    def finish(self) -> dict[str, float]:
        """The phases with ``other`` = the total no phase covers, and ``total``; they sum to it."""
        total = self.elapsed()
        phases = dict(self.phases)
        phases["other"] = phases.get("other", 0.0) + max(0.0, total - sum(phases.values()))
        return {**phases, "total": total}
