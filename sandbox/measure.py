"""Per-rollout and per-tool-call resource measurement, and trace files for ``sandbox.simulate``.

Two sources:

- with a cgroup (``sandbox.cgroup``): ``memory.current``/``peak``, ``memory.events``
  (high/max/oom_kill), PSI totals and CPU time of the rollout's group;
- without one: the rollout's process tree, found by its marker
  (``SWE_ROLLOUT_ID`` in the environment, ``sandbox.local``), sampled with psutil
  (RSS sum, CPU seconds) at ``hz`` (>= 10 Hz).

What "the sandbox's memory" is (``scope``). The tree has two parts: the agent
harness process (mini-swe-agent's Python process, the marked process whose parent
is not marked; ~150 MiB, flat) and the tool processes it starts (each bash command
and everything under it: pytest, builds, scripts). The resource shim's cgroup is
meant to hold the sandbox, i.e. the tool processes; in a Docker deployment the
agent harness runs on the host, outside the container. So:

- ``scope="sandbox"`` (default): ``rss`` = the tool processes only;
- ``scope="tree"``: ``rss`` = agent + tools (the local deployment, where the
  shim's ``wrap_argv`` starts the agent itself inside the rollout's cgroup).

Both parts are written to every trace row either way (``sandbox_rss``,
``agent_rss``), so ``sandbox.simulate --memory`` can replay either.

Every sample is labelled with the phase. The phase comes from the proxy's
``on_phase`` hook when one is wired (``sampler.on_phase``); otherwise it is
inferred: mini-swe-agent runs each command as a child of the agent process, so
"the agent process has live children" = a tool runs. Commands shorter than the
sampling period (``git status``, ``sed -n``) can fall between two samples.

RSS sums count pages shared between processes once per process (a cgroup's
``memory.current`` counts them once, plus page cache): an upper bound of the
anonymous memory, not the cgroup's number.

Trace files are JSONL, one sample per line: ``{"t": seconds since start,
"rss": bytes (per scope), "sandbox_rss": bytes, "agent_rss": bytes, "cpu_s":
cumulative CPU seconds of the scope, "nproc": live tool processes, "phase":
"tool"|"inference"}``; ``sandbox.simulate --traces DIR`` replays them.

CLI (records traces of every marked rollout while a command runs)::

    python -m sandbox.measure --out traces/ --hz 20 --scope sandbox -- python -m recipe.rollout data=... policy=reference
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
SCOPES = ("sandbox", "tree")


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

    ``peak_rss``/``mean_rss``/``cpu_s`` and the intervals are of ``scope``
    (module docstring); ``agent_*`` are the agent harness process's.
    ``events``/``psi_*`` are filled only with a cgroup (None otherwise).
    """

    rollout_id: str
    scope: str = "sandbox"
    peak_rss: int = 0
    mean_rss: float = 0.0
    cpu_s: float = 0.0
    samples: int = 0
    # The agent harness process alone, whatever the scope (0 with a cgroup source).
    agent_peak_rss: int = 0
    agent_mean_rss: float = 0.0
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


@dataclass
class TreeSample:
    """One psutil sample of a rollout's tree (bytes, seconds).

    Attributes:
        sandbox_rss: RSS sum of the tool processes (descendants of the agent process).
        agent_rss: RSS of the agent harness process(es) (marked processes whose parent is not marked).
        sandbox_cpu_s: CPU seconds of the live tool processes plus the finished ones the agent reaped.
        agent_cpu_s: the agent process's own CPU seconds.
        nproc: live tool processes.
        tool_running: the agent process has a live child (= a tool runs).
    """

    sandbox_rss: int = 0
    agent_rss: int = 0
    sandbox_cpu_s: float = 0.0
    agent_cpu_s: float = 0.0
    nproc: int = 0
    tool_running: bool = False


def _unexeced_fork(p: psutil.Process, parent: psutil.Process) -> bool:
    """A child between fork and exec: same command line as its parent (Python's subprocess forks the
    agent, then execs bash). Its RSS is the parent's pages, shared copy-on-write, not new memory."""
    try:
        return p.cmdline() == parent.cmdline()
    except (psutil.Error, OSError):
        return False


def sample_tree(procs: list[psutil.Process]) -> TreeSample:
    """Split ``procs`` (a rollout's marked processes and their descendants) into agent and sandbox.

    The agent processes are those whose parent is not in ``procs``; all others are tool
    processes. A child caught between fork and exec (same command line as its parent)
    counts 0 bytes: its pages are its parent's. Processes that exit mid-sample are skipped.
    """
    out = TreeSample()
    by_pid = {p.pid: p for p in procs}
    for p in procs:
        try:
            with p.oneshot():
                rss = p.memory_info().rss
                t = p.cpu_times()
                parent = by_pid.get(p.ppid())
                if parent is not None:
                    if _unexeced_fork(p, parent):
                        rss = 0  # the agent's own pages, shared copy-on-write until exec
                    out.sandbox_rss += rss
                    out.sandbox_cpu_s += t.user + t.system
                    out.nproc += 1
                    out.tool_running = True
                else:
                    out.agent_rss += rss
                    out.agent_cpu_s += t.user + t.system
                    # Finished commands' CPU time, once the agent has waited for them.
                    out.sandbox_cpu_s += t.children_user + t.children_system
        except (psutil.Error, OSError):
            continue
    return out


class ResourceSampler:
    """Samples one rollout at ``hz`` in a background thread (``start``/``stop``), labelled by phase.

    Args:
        rollout_id: the marker value of the rollout's processes.
        hz: samples per second (>= 10).
        trace_path: write a JSONL trace here when given.
        controller/group: read the cgroup instead of walking /proc when given.
        scope: ``"sandbox"`` (tool processes only, the default) or ``"tree"`` (agent + tools);
            see the module docstring. Ignored with a cgroup (the group is what it holds).

    Raises:
        ValueError: ``hz`` below 10, or an unknown ``scope``.
    """

    def __init__(self, rollout_id: str, *, hz: float = 20.0, trace_path: str | os.PathLike[str] | None = None,
                 controller: CgroupController | None = None, group: Path | None = None, scope: str = "sandbox"):
        if hz < MIN_HZ:
            raise ValueError(f"sampling rate must be >= {MIN_HZ} Hz, got {hz}")
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        self.rollout_id = rollout_id
        self.scope = scope
        self.period = 1.0 / hz
        self.trace_path = Path(trace_path) if trace_path else None
        self.controller, self.group = controller, group
        self.result = RolloutResources(rollout_id, scope=scope if controller is None else "cgroup")
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
        """One sample: (bytes, cumulative CPU seconds, phase), of the sampler's scope."""
        rss, cpu, phase, _ = self.sample_row()
        return rss, cpu, phase

    def sample_row(self) -> tuple[int, float, str, TreeSample]:
        """One sample: (bytes and CPU seconds of the scope, phase, the agent/sandbox split)."""
        if self.controller is not None and self.group is not None:
            st = self.controller.stats(self.group)
            rss, cpu = st.memory_current or 0, (st.cpu_usage_us or 0) / 1e6
            split = TreeSample(sandbox_rss=rss, sandbox_cpu_s=cpu)
        else:
            split = sample_tree(self._processes())
            if self.scope == "sandbox":
                rss, cpu = split.sandbox_rss, split.sandbox_cpu_s
            else:
                rss, cpu = split.sandbox_rss + split.agent_rss, split.sandbox_cpu_s + split.agent_cpu_s
        phase = self._phase or ("tool" if split.tool_running else "inference")
        return rss, cpu, phase, split

    def _run(self) -> None:
        t0 = time.monotonic()
        fh = open(self.trace_path, "w") if self.trace_path else None
        try:
            rss_sum = agent_sum = 0.0
            cur: PhaseStats | None = None
            cpu_at_start = 0.0
            while not self._stop.is_set():
                t = time.monotonic() - t0
                rss, cpu, phase, split = self.sample_row()
                r = self.result
                r.samples += 1
                rss_sum += rss
                agent_sum += split.agent_rss
                r.peak_rss = max(r.peak_rss, rss)
                r.mean_rss = rss_sum / r.samples
                r.agent_peak_rss = max(r.agent_peak_rss, split.agent_rss)
                r.agent_mean_rss = agent_sum / r.samples
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
                    fh.write(json.dumps({"t": round(t, 4), "rss": rss, "sandbox_rss": split.sandbox_rss,
                                         "agent_rss": split.agent_rss, "cpu_s": round(cpu, 3), "nproc": split.nproc,
                                         "phase": phase}) + "\n")
                self._stop.wait(max(0.0, self.period - (time.monotonic() - t0 - t)))
        finally:
            if fh:
                fh.close()


class TreeRecorder:
    """Finds every marked rollout started under ``root_pid`` and samples each into ``out_dir/<rollout>.jsonl``.

    A background thread scans /proc every ``scan_s`` seconds for processes carrying
    ``SWE_ROLLOUT_ID`` whose ancestors include ``root_pid`` (other runs on the machine
    carry markers too) and starts a ``ResourceSampler`` per new rollout id; a sampler
    stops when its rollout has no live process left. ``stop()`` also writes
    ``out_dir/summary.json`` (``RolloutResources`` per rollout id).

    Args:
        out_dir: trace directory (created).
        root_pid: the process whose descendants are recorded (``os.getpid()`` in-process).
        hz, scope: as in ``ResourceSampler``.
        scan_s: period of the /proc scan for new rollouts, seconds.
    """

    def __init__(self, out_dir: Path, *, root_pid: int, hz: float = 20.0, scope: str = "sandbox", scan_s: float = 0.5):
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        self.out_dir, self.root_pid, self.hz, self.scope, self.scan_s = Path(out_dir), root_pid, hz, scope, scan_s
        self.samplers: dict[str, ResourceSampler] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="tree-recorder", daemon=True)
        self._thread.start()

    def scan(self) -> None:
        """One scan: start samplers for new rollouts, stop those whose processes are all gone."""
        for p in psutil.process_iter(["pid"]):
            try:
                rid = p.environ().get(ROLLOUT_MARKER_ENV)
                if not rid or rid in self.samplers or self.root_pid not in {a.pid for a in p.parents()}:
                    continue
            except (psutil.Error, OSError):
                continue
            s = ResourceSampler(rid, hz=self.hz, trace_path=self.out_dir / f"{rid}.jsonl", scope=self.scope)
            s.start()
            self.samplers[rid] = s
        for rid, s in list(self.samplers.items()):
            if s._thread and s._thread.is_alive() and not marked_tree(rid):
                s.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.scan()
            self._stop.wait(self.scan_s)

    def stop(self) -> dict[str, RolloutResources]:
        """Stop every sampler; write and return the summaries by rollout id."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        results = {rid: s.stop() for rid, s in self.samplers.items()}
        (self.out_dir / "summary.json").write_text(json.dumps({rid: asdict(r) for rid, r in results.items()}, indent=1))
        return results


def record_command(argv: list[str], out_dir: Path, *, hz: float = 20.0, scan_s: float = 0.5,
                   scope: str = "sandbox") -> dict[str, RolloutResources]:
    """Run ``argv``; sample every rollout marked in its process tree into ``out_dir/<rollout>.jsonl``.

    Also writes ``out_dir/summary.json`` (``RolloutResources`` per rollout id). ``scope`` as in
    ``ResourceSampler``. Returns the summaries by rollout id.
    """
    proc = subprocess.Popen(argv)
    recorder = TreeRecorder(out_dir, root_pid=proc.pid, hz=hz, scope=scope, scan_s=scan_s)
    recorder.start()
    try:
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait()
        results = recorder.stop()
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sandbox.measure", description="record per-rollout memory traces")
    ap.add_argument("--out", required=True, help="directory for <rollout>.jsonl traces and summary.json")
    ap.add_argument("--hz", type=float, default=20.0, help="samples per second per rollout (>= 10)")
    ap.add_argument("--scope", choices=SCOPES, default="sandbox",
                    help="'rss' of the traces: tool processes only (sandbox) or agent + tools (tree)")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- the command that runs rollouts")
    args = ap.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("give the command after --")
    results = record_command(cmd, Path(args.out), hz=args.hz, scope=args.scope)
    for rid, r in results.items():
        tools = r.tool_calls
        print(f"{rid[:12]} {r.scope} peak {r.peak_rss / 2**20:.0f} MiB mean {r.mean_rss / 2**20:.0f} MiB "
              f"(agent peak {r.agent_peak_rss / 2**20:.0f} MiB) cpu {r.cpu_s:.1f} s "
              f"tool calls {len(tools)} max tool peak {max((t.peak_rss for t in tools), default=0) / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
