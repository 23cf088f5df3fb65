"""Per-rollout and per-tool-call resource measurement, and trace files for ``sandbox.simulate``.

Two sources:

- with a cgroup (``sandbox.cgroup``): ``memory.current``/``peak``, ``memory.events``
  (high/max/oom_kill), PSI totals and CPU time of the rollout's group;
- without one: the rollout's process tree, found by its marker
  (``SWE_ROLLOUT_ID`` in the environment, ``sandbox.local``), sampled with psutil
  (RSS sum, CPU seconds) at ``hz`` (>= 10 Hz).

Every sample is labelled with the phase. The phase comes from the proxy's
``on_phase`` hook when one is wired (``sampler.on_phase``); otherwise it is
inferred: mini-swe-agent runs each command as a child of the agent process, so
"the agent process has live children" = a tool runs.

Trace files are JSONL, one sample per line: ``{"t": seconds since start,
"rss": bytes, "cpu_s": cumulative CPU seconds, "phase": "tool"|"inference"}``;
``sandbox.simulate --traces DIR`` replays them.

CLI (records traces of every marked rollout while a command runs)::

    python -m sandbox.measure --out traces/ -- python -m recipe.rollout data=... policy=reference
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from sandbox.cgroup import CgroupController
from sandbox.local import ROLLOUT_MARKER_ENV

MIN_HZ = 10.0


@dataclass
class PhaseStats:
    """One phase interval (a tool call or an inference turn); bytes and seconds."""

    phase: str
    start_s: float
    end_s: float = 0.0
    peak_rss: int = 0
    mean_rss: float = 0.0
    cpu_s: float = 0.0
    samples: int = 0


@dataclass
class RolloutResources:
    """A rollout's resource summary: totals and one entry per phase interval.

    ``events``/``psi_*`` are filled only with a cgroup (None otherwise).
    """

    rollout_id: str
    peak_rss: int = 0
    mean_rss: float = 0.0
    cpu_s: float = 0.0
    samples: int = 0
    intervals: list[PhaseStats] = field(default_factory=list)
    events: dict[str, int] | None = None
    psi_some_total_us: int | None = None
    psi_full_total_us: int | None = None

    @property
    def tool_calls(self) -> list[PhaseStats]:
        return [i for i in self.intervals if i.phase == "tool"]


def marked_tree(rollout_id: str) -> list[psutil.Process]:
    """Live processes carrying ``SWE_ROLLOUT_ID=rollout_id`` (blocking /proc walk)."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get(ROLLOUT_MARKER_ENV) == rollout_id:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def _sample_procs(procs: list[psutil.Process]) -> tuple[int, float, bool]:
    """(RSS sum, CPU seconds sum, whether any process has a child = a tool runs)."""
    rss, cpu, child = 0, 0.0, False
    pids = {p.pid for p in procs}
    for p in procs:
        try:
            with p.oneshot():
                rss += p.memory_info().rss
                t = p.cpu_times()
                cpu += t.user + t.system
                if p.ppid() in pids:
                    child = True
        except (psutil.Error, OSError):
            continue
    return rss, cpu, child


class ResourceSampler:
    """Samples one rollout at ``hz`` in a background thread (``start``/``stop``), labelled by phase.

    Args:
        rollout_id: the marker value of the rollout's processes.
        hz: samples per second (>= 10).
        trace_path: write a JSONL trace here when given.
        controller/group: read the cgroup instead of walking /proc when given.

    Raises:
        ValueError: ``hz`` below 10.
    """

    def __init__(self, rollout_id: str, *, hz: float = 20.0, trace_path: str | os.PathLike[str] | None = None,
                 controller: CgroupController | None = None, group: Path | None = None):
        if hz < MIN_HZ:
            raise ValueError(f"sampling rate must be >= {MIN_HZ} Hz, got {hz}")
        self.rollout_id = rollout_id
        self.period = 1.0 / hz
        self.trace_path = Path(trace_path) if trace_path else None
        self.controller, self.group = controller, group
        self.result = RolloutResources(rollout_id)
        self._phase: str | None = None  # None = infer from the process tree
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._procs: dict[int, psutil.Process] = {}
        self._last_scan = 0.0

    def on_phase(self, phase: str) -> None:
        """The proxy's phase hook (``"inference"``/``"tool"``); quick, thread-safe."""
        self._phase = phase

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"sampler-{self.rollout_id[:8]}", daemon=True)
        self._thread.start()

    def stop(self) -> RolloutResources:
        """Stop sampling; returns the summary (with cgroup events/PSI when a group is set)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.controller is not None and self.group is not None:
            st = self.controller.stats(self.group)
            self.result.events = st.events
            self.result.psi_some_total_us, self.result.psi_full_total_us = st.psi_some_total_us, st.psi_full_total_us
        return self.result

    async def astop(self) -> RolloutResources:
        return await asyncio.to_thread(self.stop)

    def _processes(self) -> list[psutil.Process]:
        now = time.monotonic()
        # Re-scanning /proc is the expensive part: do it every 0.5 s, track known pids between.
        if now - self._last_scan > 0.5:
            self._procs = {p.pid: p for p in marked_tree(self.rollout_id)}
            self._last_scan = now
        alive = [p for p in self._procs.values() if p.is_running()]
        for p in list(alive):
            try:
                for c in p.children(recursive=True):
                    if c.pid not in self._procs:
                        self._procs[c.pid] = c
                        alive.append(c)
            except psutil.Error:
                continue
        return alive

    def sample(self) -> tuple[int, float, str]:
        """One sample: (bytes, cumulative CPU seconds, phase)."""
        if self.controller is not None and self.group is not None:
            st = self.controller.stats(self.group)
            rss, cpu = st.memory_current or 0, (st.cpu_usage_us or 0) / 1e6
            child = False
        else:
            rss, cpu, child = _sample_procs(self._processes())
        phase = self._phase or ("tool" if child else "inference")
        return rss, cpu, phase

    def _run(self) -> None:
        t0 = time.monotonic()
        fh = open(self.trace_path, "w") if self.trace_path else None
        try:
            rss_sum = 0.0
            cur: PhaseStats | None = None
            cpu_at_start = 0.0
            while not self._stop.is_set():
                t = time.monotonic() - t0
                rss, cpu, phase = self.sample()
                r = self.result
                r.samples += 1
                rss_sum += rss
                r.peak_rss = max(r.peak_rss, rss)
                r.mean_rss = rss_sum / r.samples
                r.cpu_s = max(r.cpu_s, cpu)
                if cur is None or cur.phase != phase:
                    if cur is not None:
                        cur.end_s = t
                        cur.cpu_s = max(0.0, cpu - cpu_at_start)
                    cur = PhaseStats(phase=phase, start_s=t)
                    cpu_at_start = cpu
                    r.intervals.append(cur)
                cur.samples += 1
                cur.mean_rss += (rss - cur.mean_rss) / cur.samples
                cur.peak_rss = max(cur.peak_rss, rss)
                cur.end_s = t
                cur.cpu_s = max(0.0, cpu - cpu_at_start)
                if fh:
                    fh.write(json.dumps({"t": round(t, 4), "rss": rss, "cpu_s": round(cpu, 3), "phase": phase}) + "\n")
                self._stop.wait(max(0.0, self.period - (time.monotonic() - t0 - t)))
        finally:
            if fh:
                fh.close()


def record_command(argv: list[str], out_dir: Path, *, hz: float = 20.0, scan_s: float = 0.5) -> dict[str, RolloutResources]:
    """Run ``argv``; sample every rollout marked in its process tree into ``out_dir/<rollout>.jsonl``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(argv)
    samplers: dict[str, ResourceSampler] = {}
    try:
        while proc.poll() is None:
            for p in psutil.process_iter(["pid"]):
                try:
                    rid = p.environ().get(ROLLOUT_MARKER_ENV)
                    # Only rollouts of this command (other runs on the machine carry markers too).
                    if rid and rid not in samplers and proc.pid not in {a.pid for a in p.parents()}:
                        continue
                except (psutil.Error, OSError):
                    continue
                if rid and rid not in samplers:
                    s = ResourceSampler(rid, hz=hz, trace_path=out_dir / f"{rid}.jsonl")
                    s.start()
                    samplers[rid] = s
            for rid, s in list(samplers.items()):
                if s._thread and s._thread.is_alive() and not marked_tree(rid):
                    s.stop()
            time.sleep(scan_s)
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait()
        results = {rid: s.stop() for rid, s in samplers.items()}
    (out_dir / "summary.json").write_text(json.dumps({rid: asdict(r) for rid, r in results.items()}, indent=1))
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sandbox.measure", description="record per-rollout memory traces")
    ap.add_argument("--out", required=True, help="directory for <rollout>.jsonl traces and summary.json")
    ap.add_argument("--hz", type=float, default=20.0)
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- the command that runs rollouts")
    args = ap.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("give the command after --")
    results = record_command(cmd, Path(args.out), hz=args.hz)
    for rid, r in results.items():
        tools = r.tool_calls
        print(f"{rid[:12]} peak {r.peak_rss / 2**20:.0f} MiB mean {r.mean_rss / 2**20:.0f} MiB cpu {r.cpu_s:.1f} s "
              f"tool calls {len(tools)} max tool peak {max((t.peak_rss for t in tools), default=0) / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
