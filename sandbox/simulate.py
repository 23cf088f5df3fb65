"""Replay memory traces of N concurrent rollouts under four memory policies (``python -m sandbox.simulate``).

Policies (the AgentCgroup paper's comparison, seed 001):

- ``static-peak``: each rollout's limit is its own peak for its whole life (an
  oracle: a real static limit must be set before the peak is known). No OOM
  kills; provisioned = sum of limits.
- ``static-mean``: limit = the rollout's mean; tool bursts above it are OOM-killed.
- ``reactive-<d>ms``: a user-space controller that sets ``memory.max`` to
  ``(1 + headroom) x`` the usage it saw ``d`` ms ago (seed 001: 10-100 ms
  control loops); demand above the lagging limit is an OOM kill of that tool call.
- ``ours``: the shim's policy (``sandbox/shim.py``): baseline reservation with
  admission; at each tool start a learned burst grant from the shared pool;
  ``memory.high`` (throttle, never kill) at reservation + grant; growth requests
  after ``monitor_interval``; the grant returned at tool end (down to usage).
  When the pool is short the tool is queued and runs throttled: it stalls
  whenever its demand exceeds its current limit (the trace does not advance).

Model of a kill: the tool call's remaining demand drops to the rollout's
baseline (its process died) and the call counts one OOM kill. Model of
throttling: a rollout whose demand exceeds its ``memory.high`` does not advance.

Trace sets: ``synthetic`` (generated from seed 001's distributions, see
``synthetic_trace``) and recorded traces (JSONL files written by
``sandbox.measure``: ``{"t": s, "rss": bytes, "sandbox_rss": bytes,
"agent_rss": bytes, "phase": "tool"|"inference"}`` per line) given with
``--traces DIR``. ``--memory`` picks what a recorded trace's demand is:
``sandbox`` (the tool processes: what the shim's cgroup holds when the agent
harness runs outside it, as in Docker), ``sandbox+agent`` (the local
deployment, agent inside the group) or ``rss`` (the column as recorded).

The shim's baseline reservation is a user's knob (``ShimSettings.baseline_bytes``):
``--baseline-mib measured`` sets it the way a user would from measurements, to
the 99th percentile of the traces' inference-phase memory (what a rollout holds
between tool calls), rounded up to a whole MiB.

Outputs: a JSON of all numbers, a PNG plot and a Markdown table (``--out``).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import sys
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sandbox.shim import MiB, ShimPolicy, ShimSettings

MB = 1.0  # traces are in MiB
GB = 1024.0


@dataclass
class Trace:
    """One rollout's memory demand sampled every ``dt`` seconds.

    Attributes:
        mem: demand in MiB, shape (T,).
        tool: True while a tool runs, shape (T,).
        name: where it came from.
    """

    mem: np.ndarray
    tool: np.ndarray
    name: str = ""

    @property
    def peak(self) -> float:
        return float(self.mem.max())

    @property
    def mean(self) -> float:
        return float(self.mem.mean())


# ----------------------------------------------------------------------------------------------
# Synthetic traces from seed 001's measurements
# ----------------------------------------------------------------------------------------------


def synthetic_trace(rng: np.random.Generator, dt: float, name: str = "", duration_scale: float = 1.0) -> Trace:
    """One synthetic rollout following seed 001 (numbers quoted there):

    - duration: log-normal, median 8.1 min (mean ~10 min), clipped to 1-30 min;
    - tool-time share: Beta with mean ~0.37 (median ~35%), clipped at 86%;
    - tool calls: log-normal durations (median 2 s, mean ~3.6 s; Bash mean 3.8-5.9 s);
    - baseline ~185 MB (N(185, 12)); retry loops in the second half keep up to 502 MB;
    - per-task burst scale H: log-normal, median 400 MB, clipped to 30 MB-4 GB
      (peaks 197 MB-4 GB, CV ~147% across tasks);
    - command semantics: tests 44% (0.5-1.0 H), python snippets 27% (0.1-0.6 H),
      package installs 10% (P95 ~233 MB), exploration/git 19% (5-15 MB);
    - burst shape: ramp at <= 3 GB/s, hold 1-2 s, then 10% of the burst until the call ends.
    """
    duration = float(np.clip(rng.lognormal(math.log(486.0), 0.65), 60, 1800)) * duration_scale
    share = float(np.clip(rng.beta(2.0, 3.4), 0.02, 0.86))
    n = max(1, int(duration / dt))
    mem = np.empty(n, dtype=np.float32)
    tool = np.zeros(n, dtype=bool)
    base0 = float(np.clip(rng.normal(185, 12), 140, 260))
    heavy = float(np.clip(rng.lognormal(math.log(400.0), 1.1), 30, 4096))
    calls = []
    total = 0.0
    while total < share * duration:
        d = float(np.clip(rng.lognormal(math.log(2.0), 1.1), 0.05, 120))
        calls.append(d)
        total += d
    gaps = rng.dirichlet(np.ones(len(calls) + 1)) * max(duration - total, dt * (len(calls) + 1))
    t = 0.0
    retained = 0.0
    mem[:] = base0
    for gap, d in zip(gaps, calls + [0.0]):
        t += gap
        if d <= 0:
            break
        i0, i1 = int(t / dt), min(n, int((t + d) / dt) + 1)
        if i0 >= n:
            break
        kind = rng.choice(4, p=[0.44, 0.27, 0.10, 0.19])
        if kind == 0:
            burst = heavy * rng.uniform(0.5, 1.0)
        elif kind == 1:
            burst = heavy * rng.uniform(0.1, 0.6)
        elif kind == 2:
            burst = float(np.clip(rng.lognormal(math.log(110), 0.45), 20, 600))
        else:
            burst = rng.uniform(5, 15)
        base = base0 + retained
        steps = np.arange(i1 - i0) * dt
        ramp = max(burst / 3072.0, 0.05)  # <= 3 GB/s
        hold = rng.uniform(1.0, 2.0)
        shape = np.where(steps < ramp, steps / ramp, np.where(steps < ramp + hold, 1.0, 0.1))
        noise = rng.normal(1.0, 0.03, size=shape.shape)
        mem[i0:i1] = base + burst * shape * noise
        tool[i0:i1] = True
        if kind == 0 and t > duration / 2:
            retained = min(502.0, retained + rng.uniform(0, 25))
        mem[i1:] = base0 + retained
        t += d
    np.maximum(mem, 1.0, out=mem)
    return Trace(mem=mem, tool=tool, name=name)


MEMORY_COLUMNS = ("sandbox", "sandbox+agent", "rss")


def _row_memory(row: dict, memory: str) -> float:
    if memory == "rss" or "sandbox_rss" not in row:
        return float(row["rss"])
    if memory == "sandbox":
        return float(row["sandbox_rss"])
    return float(row["sandbox_rss"]) + float(row.get("agent_rss", 0))


def load_recorded(directory: str | Path, dt: float, memory: str = "sandbox") -> list[Trace]:
    """Traces written by ``sandbox.measure`` (one ``*.jsonl`` or gzipped ``*.jsonl.gz`` per rollout,
    searched recursively), resampled to ``dt``: memory linearly interpolated between samples (a
    sampler at 20 Hz sees 50 ms of growth at once; holding values would turn every ramp into a step
    that no reactive controller could follow); a grid point between a tool sample and an inference
    sample is in the tool.

    ``memory``: ``"sandbox"`` (``sandbox_rss``: tool processes), ``"sandbox+agent"``
    (``sandbox_rss + agent_rss``) or ``"rss"`` (as recorded); traces written before
    the split (only ``rss``) are read as ``rss`` in every case.

    Raises:
        ValueError: unknown ``memory``, or no usable trace file in ``directory`` (the message names it).
    """
    if memory not in MEMORY_COLUMNS:
        raise ValueError(f"memory must be one of {MEMORY_COLUMNS}, got {memory!r}")
    traces = []
    paths = sorted([*Path(directory).rglob("*.jsonl"), *Path(directory).rglob("*.jsonl.gz")])
    for path in paths:
        text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        rows = [r for r in rows if "t" in r and "rss" in r]
        if len(rows) < 2:
            continue
        t = np.array([r["t"] for r in rows], dtype=float)
        t -= t[0]
        rss = np.array([_row_memory(r, memory) for r in rows], dtype=float) / (1 << 20)
        ph = np.array([r.get("phase") == "tool" for r in rows])
        grid = np.arange(0, t[-1] + dt, dt)
        idx = np.clip(np.searchsorted(t, grid, side="right") - 1, 0, len(t) - 1)
        mem = np.interp(grid, t, rss)
        # A step between a tool sample and an inference sample belongs to the tool (its processes
        # starting or exiting), so interpolated ramps are never counted as inference-phase memory.
        tool = ph[idx] | ph[np.minimum(idx + 1, len(t) - 1)]
        traces.append(Trace(mem=mem.astype(np.float32), tool=tool, name=path.name.split(".")[0]))
    if not traces:
        raise ValueError(f"no trace files (*.jsonl with t/rss rows) under {directory}")
    return traces


def measured_baseline_mib(traces: list[Trace], quantile: float = 0.99) -> float:
    """A user's baseline reservation from measurements: the ``quantile`` of all inference-phase
    samples (MiB), rounded up to a whole MiB, at least 1 MiB."""
    idle = np.concatenate([t.mem[~t.tool] for t in traces])
    if idle.size == 0:
        return 1.0
    return float(max(1.0, math.ceil(float(np.quantile(idle, quantile)))))


# ----------------------------------------------------------------------------------------------
# Replay
# ----------------------------------------------------------------------------------------------


@dataclass
class PolicyResult:
    """Numbers of one policy on one replay (MiB, seconds)."""

    policy: str
    n: int
    budget_mib: float | None
    provisioned_mib: float  # max over time of the sum of limits/reservations
    oom_kills: int
    tool_calls: int
    tool_s: float  # tool time in the traces
    throttled_s: float  # rollout-seconds stalled under memory.high (ours, reactive-high): tool slowdown
    queued_s: float  # rollout-seconds waiting for admission before starting (ours)
    makespan_s: float
    extra: dict = field(default_factory=dict)

    @property
    def slowdown(self) -> float:
        """Throttled time as a share of the traces' tool time."""
        return self.throttled_s / max(self.tool_s, 1e-9)


def _layout(traces: list[Trace], offsets_s: np.ndarray, dt: float):
    n = len(traces)
    offs = (offsets_s / dt).astype(int)
    lens = np.array([len(t.mem) for t in traces])
    T = int((offs + lens).max())
    return n, offs, lens, T


def _flat(traces: list[Trace]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All traces concatenated (mem, tool) and each one's start index, for vectorized lookups."""
    starts = np.cumsum([0] + [len(t.mem) for t in traces[:-1]])
    return np.concatenate([t.mem for t in traces]).astype(float), np.concatenate([t.tool for t in traces]), starts


def _tool_stats(traces: list[Trace], dt: float) -> tuple[int, float]:
    calls = sum(int(np.count_nonzero(np.diff(t.tool.astype(np.int8)) == 1) + (1 if t.tool[0] else 0)) for t in traces)
    return calls, float(sum(t.tool.sum() for t in traces) * dt)


def replay_static(traces: list[Trace], offsets_s: np.ndarray, dt: float, *, which: str, budget: float | None) -> PolicyResult:
    """Static limits (own peak or own mean), scaled down proportionally when their sum exceeds ``budget``."""
    n, offs, lens, T = _layout(traces, offsets_s, dt)
    limits = np.array([t.peak if which == "peak" else t.mean for t in traces], dtype=float)
    if which == "peak":
        limits *= 1.0001  # a limit exactly at the peak passes
    active = np.zeros(T + 1)
    np.add.at(active, offs, limits)
    np.add.at(active, offs + lens, -limits)
    provisioned = float(np.cumsum(active).max())
    if budget is not None and provisioned > budget:
        limits *= budget / provisioned
        provisioned = budget
    kills = 0
    for tr, lim in zip(traces, limits):
        edges = np.flatnonzero(np.diff(np.r_[0, tr.tool.astype(np.int8), 0]))
        for a, b in zip(edges[::2], edges[1::2]):
            if tr.mem[a:b].max() > lim:
                kills += 1
        # Demand above the limit outside a tool (the agent itself) also kills.
        if (tr.mem[~tr.tool] > lim).any():
            kills += 1
    calls, tool_s = _tool_stats(traces, dt)
    return PolicyResult(f"static-{which}", n, budget, provisioned, kills, calls, tool_s, 0.0, 0.0, T * dt)


def replay_reactive(
    traces: list[Trace],
    offsets_s: np.ndarray,
    dt: float,
    *,
    delay_s: float,
    headroom: float = 0.2,
    floor: float = 256.0,
    budget: float | None,
    mode: str = "max",
) -> PolicyResult:
    """A user-space controller: limit(t) = max(floor, (1+headroom) * usage(t - delay)), grown only
    while the budget allows. ``mode="max"``: demand above the limit is an OOM kill of the tool call;
    ``mode="high"``: it stalls (throttled) until the limit catches up."""
    n, offs, lens, T = _layout(traces, offsets_s, dt)
    lag = max(1, int(round(delay_s / dt)))
    pos = np.zeros(n, dtype=int)
    killed_until = np.full(n, -1)  # a killed tool call's end index
    history = deque([np.zeros(n)] * lag, maxlen=lag)
    limit = np.full(n, floor)
    flat_mem, flat_tool, starts = _flat(traces)
    kills = 0
    throttled = 0
    provisioned = 0.0
    base = np.array([float(np.median(t.mem[~t.tool])) if (~t.tool).any() else float(t.mem.min()) for t in traces])
    idx = np.arange(n)
    seg_killed = np.zeros(n, dtype=bool)  # this inference segment already had its kill
    prev_tool = np.zeros(n, dtype=bool)
    for step in range(T * 3):
        started = step >= offs
        running = started & (pos < lens)
        if not running.any() and (step >= offs).all():
            break
        p = np.minimum(pos, lens - 1)
        demand = flat_mem[starts + p]
        in_tool = flat_tool[starts + p]
        seg_killed &= in_tool == prev_tool
        prev_tool = in_tool
        dead = pos <= killed_until
        demand = np.where(dead, base, demand)
        demand = np.where(running, demand, 0.0)
        # Controller: the target from the usage it saw `lag` steps ago.
        seen = history[0]
        target = np.where(running, np.maximum(floor, (1 + headroom) * seen), 0.0)
        if budget is not None:
            grow = np.maximum(target - limit, 0)
            room = budget - np.minimum(target, limit).sum()
            if grow.sum() > room:
                ok = np.cumsum(grow) <= max(room, 0)
                target = np.where(ok, target, np.minimum(target, limit))
        limit = np.where(running, target, 0.0)
        over = running & (demand > limit)
        if mode == "max":
            for i in idx[over & in_tool]:
                kills += 1
                # The call dies: skip to its end.
                end = p[i]
                while end < lens[i] and flat_tool[starts[i] + end]:
                    end += 1
                killed_until[i] = end - 1
            agent_over = over & ~in_tool & ~seg_killed
            kills += int(agent_over.sum())
            seg_killed |= agent_over
            usage = np.where(over, np.minimum(demand, limit), demand)
            advance = running
        else:
            throttled += int(over.sum())
            usage = np.minimum(demand, limit)
            advance = running & ~over
        history.append(usage)
        provisioned = max(provisioned, float(limit.sum()))
        pos = pos + advance.astype(int)
    calls, tool_s = _tool_stats(traces, dt)
    name = f"reactive-{mode}-{int(round(delay_s * 1000))}ms"
    return PolicyResult(name, n, budget, provisioned, kills, calls, tool_s, throttled * dt, 0.0, step * dt,
                        extra={"headroom": headroom, "delay_s": delay_s})


def replay_ours(
    traces: list[Trace], offsets_s: np.ndarray, dt: float, *, budget: float | None, params: ShimSettings | None = None,
    write_latency_s: float = 0.0,
) -> PolicyResult:
    """The shim's policy (module docstring), decided by the shim's own ``ShimPolicy`` in MiB;
    ``budget=None`` = an unbounded pool; ``params``: the shim's settings (default ``ShimSettings()``);
    ``write_latency_s``: a decided limit reaches the kernel this much later (a Docker sandbox's
    ``docker update`` round trip, measured live: ``LimitChange.latency_s``; a cgroup file write: 0).
    While a raise is in flight the sandbox stalls at the old limit and asks for nothing more."""
    prm = ShimPolicy.from_settings(params or ShimSettings(), unit=MiB)
    lag_steps = int(round(write_latency_s / dt))
    history: deque[np.ndarray] = deque(maxlen=lag_steps + 1)
    n, offs, lens, T = _layout(traces, offsets_s, dt)
    pool = float("inf") if budget is None else float(budget)
    flat_mem, flat_tool, starts = _flat(traces)
    pos = np.zeros(n, dtype=int)
    admitted = np.zeros(n, dtype=bool)
    reservation = np.zeros(n)
    grant = np.zeros(n)
    largest = np.zeros(n)
    in_tool_prev = np.zeros(n, dtype=bool)
    waiting = np.zeros(n, dtype=bool)  # a grant/admission request is queued
    idle_for = np.zeros(n, dtype=int)
    near_for = np.zeros(n, dtype=int)
    shrink_steps = int(round(prm.shrink_after_s / dt)) if prm.shrink_after_s > 0 else 0
    queue: deque[tuple[int, float, str]] = deque()
    monitor_steps = max(1, int(round(prm.monitor_interval_s / dt)))
    kills = throttled = queued = 0
    provisioned = 0.0
    used = 0.0

    def give(i: int, amount: float, why: str) -> None:
        nonlocal used
        used += amount
        if why == "admit":
            admitted[i] = True
            reservation[i] = amount
        else:
            grant[i] += amount

    def request(i: int, amount: float, why: str) -> None:
        if not queue and used + amount <= pool:
            give(i, amount, why)
        else:
            waiting[i] = True
            queue.append((i, amount, why))

    def serve() -> None:
        while queue:
            i, amount, why = queue[0]
            if not waiting[i]:
                queue.popleft()
                continue
            if used + amount > pool:
                break
            queue.popleft()
            waiting[i] = False
            give(i, amount, why)

    def started_mask(step: int) -> np.ndarray:
        return offs <= step

    step = 0
    no_progress = 0
    finished = np.zeros(n, dtype=bool)
    arrivals: dict[int, list[int]] = {}
    for i, o in enumerate(offs):
        arrivals.setdefault(int(o), []).append(i)
    n_finished = 0
    while n_finished < n:
        for i in arrivals.get(step, ()):
            request(i, prm.baseline, "admit")
        running = admitted & ~finished
        p = np.minimum(pos, lens - 1)
        demand = np.where(running, flat_mem[starts + p], 0.0)
        in_tool = running & flat_tool[starts + p]
        # Phase boundaries (the proxy's events).
        changed = running & (in_tool != in_tool_prev)
        any_changed = changed.any()
        for i in np.flatnonzero(changed & in_tool) if any_changed else ():
            want = prm.tool_grant(largest[i], reservation[i])
            if waiting[i]:
                waiting[i] = False
            request(i, want, "tool")
        for i in np.flatnonzero(changed & ~in_tool) if any_changed else ():
            waiting[i] = False
            new_res = prm.reservation_after_tool(demand[i])
            used += new_res - reservation[i] - grant[i]
            reservation[i] = new_res
            grant[i] = 0.0
        in_tool_prev = np.where(running, in_tool, in_tool_prev)
        if queue:
            serve()
        limit = reservation + grant
        history.append(limit.copy())
        applied = history[0]  # what the kernel has: the limit decided lag_steps ago
        over = running & (demand > applied)
        killed = running & (demand > prm.hard_max)
        kills += int(killed.sum())
        stall = over & ~killed
        any_stall = stall.any()
        # The monitor (every monitor_interval_s): usage at the limit asks for a larger grant,
        # unless a raise is still on its way to the kernel.
        in_flight = applied < limit
        near = running & ~waiting & ~killed & ~in_flight & (prm.needs_growth(demand, limit) | over)
        near_for = np.where(near, near_for + 1, 0)
        for i in np.flatnonzero(near_for >= monitor_steps) if near.any() else ():
            near_for[i] = 0
            extra = prm.growth(grant[i], limit[i])
            if extra > 0:
                request(i, extra, "grow")
        if queue:
            queued += int((started_mask(step) & ~admitted & ~finished).sum())  # waiting for admission
        throttled += int(stall.sum()) if any_stall else 0
        if shrink_steps:
            idle = running & in_tool & ~waiting & prm.grant_unused(demand, limit, grant)
            idle_for = np.where(idle, idle_for + 1, 0)
            shrinking = np.flatnonzero(idle_for >= shrink_steps)
            for i in shrinking:
                new_grant = prm.shrunk_grant(demand[i], reservation[i])
                used -= grant[i] - new_grant
                grant[i] = new_grant
                idle_for[i] = 0
            if len(shrinking) and queue:
                serve()
        # Track each call's peak for the learned grant.
        largest = np.where(running & in_tool & ~stall, np.maximum(largest, demand), largest)
        advance = running & ~stall
        pos = pos + advance.astype(int)
        if running.any() and not advance.any():
            no_progress += 1
            if no_progress * dt > 10.0:
                # Every running rollout stalls on a grant nobody can return: the pool is too small.
                calls, tool_s = _tool_stats(traces, dt)
                return PolicyResult("ours", n, budget, provisioned, kills, calls, tool_s, float("inf"), queued * dt,
                                    step * dt, extra={"params": asdict(prm), "deadlock": True})
        else:
            no_progress = 0
        done = running & (pos >= lens)
        if done.any():
            for i in np.flatnonzero(done):
                used -= reservation[i] + grant[i]
                reservation[i] = grant[i] = 0.0
                waiting[i] = False
                finished[i] = True
                n_finished += 1
            serve()
        provisioned = max(provisioned, used)
        step += 1
        if step > 20 * T:
            raise RuntimeError("replay did not finish (a request larger than the pool?)")
    calls, tool_s = _tool_stats(traces, dt)
    # Stalls (demand above memory.high, waiting for a grant or the monitor) are throttling;
    # rollouts not yet admitted are queued.
    return PolicyResult("ours", n, budget, provisioned, kills, calls, tool_s, throttled * dt, queued * dt, step * dt,
                        extra={"params": asdict(prm)})


# ----------------------------------------------------------------------------------------------
# Experiments
# ----------------------------------------------------------------------------------------------


def fits(r: PolicyResult, slowdown_target: float) -> bool:
    """All N ran at once (no admission wait), no OOM kill, tool slowdown within target."""
    return r.oom_kills == 0 and r.queued_s == 0 and r.slowdown <= slowdown_target


def min_pool_for(traces, offsets, dt, *, slowdown_target: float, lo: float, hi: float, params=None, iters: int = 6,
                 write_latency_s: float = 0.0):
    """Smallest pool (MiB) where ``ours`` has zero OOM kills and slowdown <= target (bisection)."""
    best = replay_ours(traces, offsets, dt, budget=hi, params=params, write_latency_s=write_latency_s)
    if not fits(best, slowdown_target):
        return None, best
    for _ in range(iters):
        mid = (lo + hi) / 2
        r = replay_ours(traces, offsets, dt, budget=mid, params=params, write_latency_s=write_latency_s)
        if fits(r, slowdown_target):
            hi, best = mid, r
        else:
            lo = mid
    return hi, best


def sample_set(bank: list[Trace], n: int, rng: np.random.Generator, start_spread_s: float):
    """``n`` traces drawn from ``bank`` (with replacement past its size) and random start offsets."""
    idx = rng.permutation(len(bank))[:n] if n <= len(bank) else rng.integers(0, len(bank), n)
    return [bank[i] for i in idx], rng.uniform(0, start_spread_s, n)


def evaluate(bank: list[Trace], *, label: str, n: int, dt: float, budget_gib: float | None, delays_ms: list[int],
             slowdown_target: float, machine_gib: float, seed: int, start_spread_s: float, max_n: int = 2048,
             params: ShimSettings | None = None, reactive_floor: float = 256.0, write_latency_s: float = 0.0) -> dict:
    """All numbers for one trace set at concurrency ``n`` (see module docstring).

    ``params``: the shim's settings (default ``ShimSettings()``); ``reactive_floor``: the
    reactive controller's smallest limit, MiB; ``write_latency_s``: the shim's limit writes' latency
    (``replay_ours``).
    """
    params = params or ShimSettings()
    rng = np.random.default_rng(seed)
    traces, offsets = sample_set(bank, n, rng, start_spread_s)
    peak = replay_static(traces, offsets, dt, which="peak", budget=None)
    budget = budget_gib * GB if budget_gib else 0.5 * peak.provisioned_mib
    results = {"static-peak": peak, "static-mean": replay_static(traces, offsets, dt, which="mean", budget=None)}
    for d in delays_ms:
        results[f"reactive-max-{d}ms"] = replay_reactive(traces, offsets, dt, delay_s=d / 1000, budget=None,
                                                         floor=reactive_floor)
    # The throttling variant (memory.high instead of memory.max) at the slowest delay.
    d = max(delays_ms)
    results[f"reactive-high-{d}ms"] = replay_reactive(traces, offsets, dt, delay_s=d / 1000, budget=None, mode="high",
                                                       floor=reactive_floor)
    results["ours-unbounded"] = replay_ours(traces, offsets, dt, budget=None, params=params,
                                            write_latency_s=write_latency_s)
    pool, at_pool = min_pool_for(traces, offsets, dt, slowdown_target=slowdown_target, params=params,
                                 write_latency_s=write_latency_s,
                                 lo=0.0, hi=max(peak.provisioned_mib, results["ours-unbounded"].provisioned_mib))
    results["ours"] = at_pool
    at_budget = {
        "static-peak": replay_static(traces, offsets, dt, which="peak", budget=budget),
        "static-mean": replay_static(traces, offsets, dt, which="mean", budget=budget),
        "ours": replay_ours(traces, offsets, dt, budget=budget, params=params, write_latency_s=write_latency_s),
    }
    for d in delays_ms:
        at_budget[f"reactive-max-{d}ms"] = replay_reactive(traces, offsets, dt, delay_s=d / 1000, budget=budget,
                                                           floor=reactive_floor)
    summary = {
        "label": label,
        "n": n,
        "dt_s": dt,
        "trace_stats": bank_stats(traces, dt),
        "bank_stats": bank_stats(bank, dt),
        "ours_params": asdict(ShimPolicy.from_settings(params, unit=MiB)),
        "reactive_floor_mib": reactive_floor,
        "provisioned_zero_oom_mib": {
            "static-peak": peak.provisioned_mib,
            "ours": pool,
            **{k: (v.provisioned_mib if v.oom_kills == 0 else None) for k, v in results.items() if k.startswith("reactive")},
        },
        "results": {k: {**asdict(v), "slowdown": v.slowdown} for k, v in results.items()},
        "budget_mib": budget,
        "at_budget": {k: {**asdict(v), "slowdown": v.slowdown} for k, v in at_budget.items()},
        "slowdown_target": slowdown_target,
    }
    # Coarser steps for the N search (many large replays); ours has no sub-50 ms delay besides its monitor.
    k = max(1, int(round(0.05 / dt)))
    coarse = [Trace(t.mem[::k], t.tool[::k], t.name) for t in bank]
    summary["largest_n"] = largest_n(coarse, dt=dt * k, machine_gib=machine_gib, slowdown_target=slowdown_target,
                                     seed=seed, start_spread_s=start_spread_s, n_max=max_n, params=params,
                                     write_latency_s=write_latency_s)
    summary["largest_n"]["dt_s"] = dt * k
    return summary


def largest_n(bank, *, dt, machine_gib, slowdown_target, seed, start_spread_s, n_max: int = 2048,
              params: ShimSettings | None = None, write_latency_s: float = 0.0) -> dict:
    """Largest concurrency fitting ``machine_gib``: static-peak by sum of peaks, ours by replay
    (zero OOM kills and slowdown <= target with the machine as the pool), bisection on N."""
    cap = machine_gib * GB
    peaks = np.array([t.peak for t in bank])
    means = np.array([t.mean for t in bank])
    out = {"machine_gib": machine_gib,
           "static-peak": int(cap // peaks.mean()),
           "static-mean (OOMs)": int(cap // means.mean())}

    def ok(n: int) -> bool:
        rng = np.random.default_rng(seed + n)
        traces, offsets = sample_set(bank, n, rng, start_spread_s)
        return fits(replay_ours(traces, offsets, dt, budget=cap, params=params, write_latency_s=write_latency_s),
                    slowdown_target)

    start = max(1, out["static-peak"])
    if ok(start):
        lo, hi = start, start * 2
        while hi < n_max and ok(hi):
            lo, hi = hi, hi * 2
        hi = min(hi, n_max)
    else:  # fewer than static-peak fit: search below it
        lo, hi = 0, start
    while hi - lo > max(1, lo // 16):
        mid = (lo + hi) // 2
        if mid and ok(mid):
            lo = mid
        else:
            hi = mid
    out["ours"] = lo
    return out


def _tool_calls(t: Trace) -> list[tuple[int, int]]:
    edges = np.flatnonzero(np.diff(np.r_[0, t.tool.astype(np.int8), 0]))
    return list(zip(edges[::2], edges[1::2]))


def tool_phase_durations_s(traces: list[Trace], dt: float) -> list[float]:
    """Seconds of every tool phase (a response leaving -> the agent's next request) in
    ``traces`` resampled at ``dt`` seconds (``load_recorded``); one entry per phase."""
    return [float((b - a) * dt) for t in traces for a, b in _tool_calls(t)]


def bank_stats(traces: list[Trace], dt: float = 0.01) -> dict:
    """Trace-set statistics (MiB, seconds): peaks, means, tool share, durations, tool calls and their bursts.

    A tool call's burst is its peak minus the memory held just before it started.
    """
    peaks = np.array([t.peak for t in traces])
    means = np.array([t.mean for t in traces])
    tool_share = np.array([t.tool.mean() for t in traces])
    calls = [_tool_calls(t) for t in traces]
    bursts = np.array([float(t.mem[a:b].max() - (t.mem[a - 1] if a > 0 else 0.0))
                       for t, cs in zip(traces, calls) for a, b in cs] or [0.0])
    call_s = np.array(tool_phase_durations_s(traces, dt) or [0.0])
    idle = np.concatenate([t.mem[~t.tool] for t in traces]) if any((~t.tool).any() for t in traces) else np.zeros(1)
    return {
        "count": len(traces),
        "peak_mib_median": float(np.median(peaks)),
        "peak_mib_max": float(peaks.max()),
        "mean_mib_median": float(np.median(means)),
        "peak_over_mean_max": float((peaks / means).max()),
        "tool_share_median": float(np.median(tool_share)),
        "duration_s_median": float(np.median([len(t.mem) for t in traces]) * dt),
        "tool_calls_per_trace_median": float(np.median([len(c) for c in calls])),
        "tool_call_s_median": float(np.median(call_s)),
        "tool_call_s_p95": float(np.quantile(call_s, 0.95)),
        "burst_mib_median": float(np.median(bursts)),
        "burst_mib_p95": float(np.quantile(bursts, 0.95)),
        "burst_mib_max": float(bursts.max()),
        "inference_mib_p99": float(np.quantile(idle, 0.99)),
    }


def plot(summaries: list[dict], path: Path) -> None:
    """Bars of provisioned memory (zero OOM) and OOM kills / slowdown at the budget, per trace set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(summaries), 2, figsize=(13, 4.2 * len(summaries)), squeeze=False)
    for row, s in zip(axes, summaries):
        names = list(s["results"].keys())
        prov = [s["results"][k]["provisioned_mib"] / GB for k in names]
        if s["provisioned_zero_oom_mib"].get("ours"):
            prov[names.index("ours")] = s["provisioned_zero_oom_mib"]["ours"] / GB
        kills = [s["results"][k]["oom_kills"] for k in names]
        colors = ["tab:red" if k > 0 else "tab:green" for k in kills]
        row[0].barh(names, prov, color=colors)
        for i, (p, k) in enumerate(zip(prov, kills)):
            row[0].text(p, i, f" {p:.1f} GiB, {k} OOM", va="center", fontsize=8)
        row[0].set_xlabel("provisioned memory (GiB); green = zero OOM kills")
        row[0].set_title(f"{s['label']}: N={s['n']}, provisioned memory")
        row[0].set_xlim(0, max(prov) * 1.45)
        nb = list(s["at_budget"].keys())
        kb = [s["at_budget"][k]["oom_kills"] for k in nb]
        # A deadlocked replay (pool too small for any progress) has infinite slowdown: drawn at 100%.
        sb = [min(100 * s["at_budget"][k]["slowdown"], 100.0) for k in nb]
        y = np.arange(len(nb))
        row[1].barh(y - 0.2, kb, height=0.4, label="OOM kills", color="tab:red")
        ax2 = row[1].twiny()
        ax2.barh(y + 0.2, sb, height=0.4, label="tool slowdown %", color="tab:blue")
        for yi, (k, sl) in enumerate(zip(kb, sb)):
            row[1].text(max(kb + [1]) * 0.02, yi, f"{k} OOM, {sl:.1f}% throttled", va="center", fontsize=8)
        row[1].set_yticks(y, nb)
        row[1].set_xlabel("OOM kills (red)")
        ax2.set_xlabel("tool time throttled/queued, % (blue)")
        row[1].set_xlim(0, max(kb + [1]) * 1.2)
        ax2.set_xlim(0, max(sb + [1.0]) * 1.2)
        row[1].set_title(f"at a budget of {s['budget_mib'] / GB:.1f} GiB", pad=28)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(summaries: list[dict]) -> str:
    lines = []
    for s in summaries:
        st = s["trace_stats"]
        lines += [
            f"### {s['label']} traces, N = {s['n']}",
            "",
            f"Traces: {st['count']} rollouts, median peak {st['peak_mib_median']:.0f} MiB (max {st['peak_mib_max']:.0f}), "
            f"median mean {st['mean_mib_median']:.0f} MiB, max peak/mean {st['peak_over_mean_max']:.1f}x, "
            f"median tool share {100 * st['tool_share_median']:.0f}%, median duration {st['duration_s_median']:.0f} s, "
            f"median {st['tool_calls_per_trace_median']:.0f} tool calls per rollout seen (median {st['tool_call_s_median']:.2f} s, "
            f"p95 {st['tool_call_s_p95']:.1f} s), tool bursts median {st['burst_mib_median']:.0f} MiB "
            f"(p95 {st['burst_mib_p95']:.0f}, max {st['burst_mib_max']:.0f}). Replay step {1000 * s['dt_s']:.0f} ms. "
            f"Shim baseline {s['ours_params']['baseline']:.0f} MiB, reactive floor {s['reactive_floor_mib']:.0f} MiB.",
            "",
            "| policy | provisioned (GiB) | OOM kills | tool calls | throttled (% of tool time) |",
            "|---|---:|---:|---:|---:|",
        ]
        for k, r in s["results"].items():
            prov = r["provisioned_mib"] / GB
            if k == "ours" and s["provisioned_zero_oom_mib"]["ours"]:
                prov = s["provisioned_zero_oom_mib"]["ours"] / GB
            lines.append(f"| {k} | {prov:.1f} | {r['oom_kills']} | {r['tool_calls']} | {100 * r['slowdown']:.2f} |")
        peak = s["provisioned_zero_oom_mib"]["static-peak"]
        ours = s["provisioned_zero_oom_mib"]["ours"]
        ratio = f"{peak / ours:.2f}x" if ours else "n/a (ours missed the slowdown target even unbounded)"
        lines += [
            "",
            f"Zero-OOM provisioning: static-peak {peak / GB:.1f} GiB vs ours {ours / GB if ours else float('nan'):.1f} GiB "
            f"(slowdown <= {100 * s['slowdown_target']:.0f}%): **{ratio} less**.",
            "",
            f"At a budget of {s['budget_mib'] / GB:.1f} GiB:",
            "",
            "| policy | OOM kills | throttled (% of tool time) | waiting for admission (rollout-s) |",
            "|---|---:|---:|---:|",
        ]
        for k, r in s["at_budget"].items():
            lines.append(f"| {k} | {r['oom_kills']} | {100 * r['slowdown']:.2f} | {r['queued_s']:.0f} |")
        ln = s["largest_n"]
        lines += [
            "",
            f"Largest N on a {ln['machine_gib']:.0f} GiB machine: static-peak {ln['static-peak']}, "
            f"ours {ln['ours']}, static-mean {ln['static-mean (OOMs)']} (with OOM kills).",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sandbox.simulate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=64, help="concurrent rollouts")
    ap.add_argument("--bank", type=int, default=256, help="synthetic traces to generate")
    ap.add_argument("--traces", default=None, help="directory of recorded trace JSONL files (sandbox.measure)")
    ap.add_argument("--no-synthetic", action="store_true")
    ap.add_argument("--memory", choices=MEMORY_COLUMNS, default="sandbox",
                    help="recorded traces' demand: tool processes (sandbox), agent + tools, or the recorded rss column")
    ap.add_argument("--baseline-mib", default=None,
                    help="the shim's baseline reservation for recorded traces, MiB, or 'measured' (p99 of their "
                         "inference-phase memory); default: ShimSettings' 256 MiB. Synthetic traces always use 256.")
    ap.add_argument("--reactive-floor-mib", type=float, default=256.0,
                    help="the reactive controller's smallest limit for recorded traces, MiB (synthetic: 256)")
    ap.add_argument("--dt-ms", type=float, default=10.0, help="replay step, ms (<= the smallest reactive delay)")
    ap.add_argument("--delays-ms", default="10,50,100", help="reactive controller delays, ms")
    ap.add_argument("--budget-gib", type=float, default=None, help="budget for the OOM comparison (default: half of static-peak)")
    ap.add_argument("--machine-gib", type=float, default=128.0)
    ap.add_argument("--slowdown-target", type=float, default=0.05, help="max tool time throttled/queued for 'fits'")
    ap.add_argument("--duration-scale", type=float, default=1.0, help="scale synthetic rollout durations (speed)")
    ap.add_argument("--start-spread-s", type=float, default=60.0, help="rollout start offsets are uniform in [0, this)")
    ap.add_argument("--max-n", type=int, default=2048, help="upper end of the largest-N search")
    ap.add_argument("--write-latency-ms", type=float, default=0.0,
                    help="the shim's limit writes reach the kernel this much later (Docker: ~40 ms), ms")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="docs/resource_shim_replay", help="output prefix (.json, .png, .md)")
    args = ap.parse_args(argv)
    dt = args.dt_ms / 1000
    delays = [int(x) for x in args.delays_ms.split(",") if x]
    if delays and min(delays) < args.dt_ms:
        ap.error("--dt-ms must not exceed the smallest reactive delay")
    summaries = []
    rng = np.random.default_rng(args.seed)
    if not args.no_synthetic:
        bank = [synthetic_trace(rng, dt, f"syn{i}", args.duration_scale) for i in range(args.bank)]
        summaries.append(evaluate(bank, label="synthetic (seed 001)", n=args.n, dt=dt, budget_gib=args.budget_gib,
                                  delays_ms=delays, slowdown_target=args.slowdown_target, machine_gib=args.machine_gib,
                                  seed=args.seed, start_spread_s=args.start_spread_s, max_n=args.max_n))
        print(markdown(summaries[-1:]), flush=True)
    if args.traces:
        bank = load_recorded(args.traces, dt, memory=args.memory)
        params = ShimSettings()
        if args.baseline_mib == "measured":
            params.baseline_bytes = int(measured_baseline_mib(bank) * MiB)
        elif args.baseline_mib is not None:
            params.baseline_bytes = int(float(args.baseline_mib) * MiB)
        summaries.append(evaluate(bank, label=f"recorded ({Path(args.traces).name}, {args.memory})", n=args.n, dt=dt,
                                  budget_gib=args.budget_gib, delays_ms=delays, slowdown_target=args.slowdown_target,
                                  machine_gib=args.machine_gib, seed=args.seed, start_spread_s=args.start_spread_s,
                                  max_n=args.max_n, params=params, reactive_floor=args.reactive_floor_mib,
                                  write_latency_s=args.write_latency_ms / 1000))
        print(markdown(summaries[-1:]), flush=True)
    if not summaries:
        ap.error("nothing to replay: give --traces or drop --no-synthetic")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summaries, indent=1, default=float))
    out.with_suffix(".md").write_text(markdown(summaries))
    plot(summaries, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
