"""The resource shim, live: N concurrent Docker rollouts with real tool bursts under one memory pool.

Every rollout is the real path (``SWEAgentLoop`` -> ModelProxy -> mini-swe-agent -> ``docker
exec`` in the rollout's container -> hidden-test grading) with a scripted policy: the
``reference_with_tests`` sequence (inspect, reproduce, fix, re-test, full suite, diff, submit)
whose two test runs allocate a known burst first (``--burst-mib``, log-uniform per test run,
held ``--burst-s``), and emulated inference time (``GenerationLatency.served_7b()``, ~7 s a
turn). The limits are the kernel's (cgroup v1 here), moved through the engine (``docker
update``) by the shim. One batch of N rollouts per policy, all started at once, all under the
same pool (``--pool-mib``): the shim's admission queues what does not fit.

- ``demand``: the phase policy with a pool no batch can fill (``--demand-pool-mib``): every
  rollout's memory demand at this concurrency, never queued; its traces are what the others
  are sized and predicted from;
- ``phase`` (ours): baseline reservation, burst grants at tool phases, the container paused
  (not killed) at its limit until a grant arrives;
- ``static-peak``: every container limited (and reserved) at the largest peak of the demand
  run, x 1.1 -- the smallest static limit with no OOM kill;
- ``static-mean``: at the mean working set of the demand run's rollouts;
- ``reactive``: the limit follows usage (1.2 x the last read, polled every 50 ms), OOM killer on.

Every rollout's memory is traced by the shim at 20 Hz. The demand run's traces are then
replayed offline (``sandbox.simulate``: the shim's own decisions, the limit writes' measured
latency) with the phase run's pool and arrivals, and the replay's prediction is set beside the
live phase run; so is a second one from the static-peak run's traces (3 at a time: its tools
ran with less CPU contention). Writes ``--out``.json/.png/.md and the traces under ``--traces``.

    bash example/docker_engine.sh start
    python bench/shim_live.py --n 16 --pool-mib 2048 --out docs/resource_shim_live --traces docs/traces/docker_live
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import math
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MiB = 1 << 20
POLICIES = ("demand", "phase", "static-peak", "static-mean", "reactive")


def burst_command(mib: int, seconds: float) -> str:
    """A test run's allocation: ``mib`` MiB written (every page touched) and held ``seconds``."""
    return f'python3 -c "import time; b = bytearray({mib} << 20); time.sleep({seconds})"'


def burst_plan(n: int, lo_mib: int, hi_mib: int, seed: int) -> list[tuple[int, int]]:
    """Two burst sizes (MiB) per rollout, log-uniform in [lo, hi] (seed 001: bursts vary ~8x)."""
    rng = random.Random(seed)

    def one() -> int:
        return int(round(math.exp(rng.uniform(math.log(lo_mib), math.log(hi_mib)))))

    return [(one(), one()) for _ in range(n)]


def commands_for(task, bursts: tuple[int, int], burst_s: float) -> list[str]:
    """``reference_with_tests`` with its reproduce and full-suite test runs preceded by a burst."""
    from model_proxy.backends.scripted import reference_with_tests_commands

    cmds = list(reference_with_tests_commands(task))
    cmds[1] = burst_command(bursts[0], burst_s) + "; " + cmds[1]
    cmds[4] = burst_command(bursts[1], burst_s) + "; " + cmds[4]
    return cmds


def shim_settings(policy: str, args: argparse.Namespace, trace_dir: Path, measured: dict | None) -> dict:
    base = {"enabled": True, "pool_bytes": args.pool_mib * MiB, "trace_dir": str(trace_dir),
            "baseline_bytes": args.baseline_mib * MiB, "hard_max_bytes": args.hard_max_mib * MiB}
    if policy == "demand":
        return {**base, "policy": "phase", "pool_bytes": args.demand_pool_mib * MiB}
    if policy == "phase":
        return {**base, "policy": "phase"}
    if policy == "reactive":
        return {**base, "policy": "reactive"}
    limit = measured["static_peak_bytes"] if policy == "static-peak" else measured["static_mean_bytes"]
    return {**base, "policy": "static", "baseline_bytes": int(limit)}


async def run_batch(policy: str, rows: list[dict], plan, args, trace_dir: Path, measured: dict | None) -> list[dict]:
    """N rollouts of one policy at once in one worker (one pool); returns their records' dicts."""
    from transformers import AutoTokenizer

    from core.task import SWETask
    from model_proxy.backends.scripted import GenerationLatency, ScriptedPolicyBackend
    from prepare.tiny_model import build_tiny_model
    from recipe.swe_agent_loop import SWEAgentLoop
    from recipe.worker_resources import WorkerResources

    model_dir = build_tiny_model(Path(args.work) / "tiny_model", seed=0)  # only its ChatML tokenizer is used
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    latency = GenerationLatency.served_7b()
    swe_agent = {
        "policy": "model", "trajectory_dir": str(Path(args.work) / policy),
        "agent": {"step_limit": 12, "command_timeout_s": 120},
        "sandbox": {"backend": "docker", "shim": shim_settings(policy, args, trace_dir, measured),
                    "docker": {"memory_bytes": args.hard_max_mib * MiB}},
    }

    async def one(i: int, row: dict) -> dict:
        task = SWETask.from_extra_info(row["extra_info"])
        # The same emulated turn times in every batch: the policies meet the same arrivals of tool phases.
        backend = ScriptedPolicyBackend(tokenizer, commands_for(task, plan[i], args.burst_s), latency=latency,
                                        latency_key=f"shim_live/{args.seed}/{i}")
        loop = SWEAgentLoop.standalone(tokenizer=tokenizer, hf_model_type="qwen2", prompt_length=8192,
                                       response_length=16384, swe_agent=swe_agent, backend=backend)
        out = await loop.run({"temperature": 1.0, "logprobs": True}, raw_prompt=row.get("prompt") or [],
                             extra_info=row["extra_info"], data_source=row.get("data_source", ""))
        extra = (out[-1] if isinstance(out, list) else out).extra_fields
        return {k: extra[k] for k in ("rollout_id", "instance_id", "exit_status", "resolved", "limits_hit",
                                       "shim", "total_s", "tool_s", "generation_s", "error")} | {"bursts_mib": plan[i]}

    try:
        return await asyncio.gather(*(one(i, r) for i, r in enumerate(rows)))
    finally:
        await WorkerResources.close_for_running_loop()


def read_trace(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def live_figures(records: list[dict], trace_dir: Path, pool_mib: int) -> dict:
    """One batch's figures from its records and traces (MiB, seconds)."""
    spans = [(r["shim"]["admitted_at"], r["shim"]["released_at"]) for r in records if r["shim"]]
    t0, t1 = min(a for a, _ in spans), max(b for _, b in spans)
    makespan = t1 - t0
    # Concurrency over time from the lease intervals, at 0.1 s.
    grid = [t0 + 0.1 * k for k in range(int(makespan / 0.1) + 1)]
    running = [sum(a <= t < b for a, b in spans) for t in grid]
    use = [0.0] * len(grid)
    limits = [0.0] * len(grid)
    for r in records:
        path = trace_dir / f"{r['rollout_id']}.jsonl"
        if not path.exists():
            continue
        rows = read_trace(path)
        j = 0
        for k, t in enumerate(grid):
            while j + 1 < len(rows) and rows[j + 1]["at"] <= t:
                j += 1
            if rows[0]["at"] <= t <= rows[-1]["at"]:
                use[k] += rows[j]["sandbox_rss"] / MiB
                limits[k] += rows[j]["limit"] / MiB
    tool_s = sum(r["tool_s"] for r in records)
    queued = sum(r["shim"].get("queued_s", 0.0) for r in records)
    paused = sum(r["shim"].get("paused_s", 0.0) for r in records)
    lat = sorted(x for r in records for x in [r["shim"].get("limit_latency_p50_s")] if x is not None)
    return {
        "rollouts": len(records),
        "resolved": sum(bool(r["resolved"]) for r in records),
        "oom_kills": sum(r["limits_hit"].count("oom_kill") for r in records),
        "admitted_at_once": sum(r["shim"]["admission_wait_s"] < 0.5 for r in records),
        "queued_for_admission": sum(r["shim"]["admission_wait_s"] >= 0.5 for r in records),
        "admission_wait_s": round(sum(r["shim"]["admission_wait_s"] for r in records), 1),
        "tool_s": round(tool_s, 1),
        "tool_queued_s": round(queued, 2),
        "tool_queued_share": round(queued / max(tool_s, 1e-9), 4),
        "tool_paused_s": round(paused, 2),
        "makespan_s": round(makespan, 1),
        "max_concurrent": max(running),
        "mean_concurrent": round(sum(running) / len(running), 2),
        "peak_usage_mib": round(max(use), 1),
        "mean_usage_mib": round(sum(use) / len(use), 1),
        "peak_limits_mib": round(max(limits), 1),
        "rollouts_per_gib_per_hour": round(len(records) / (makespan / 3600) / (pool_mib / 1024), 1),
        "limit_changes": sum(r["shim"].get("limit_changes", 0) for r in records),
        "limit_latency_p50_s": lat[len(lat) // 2] if lat else None,
        "limit_latency_max_s": max((r["shim"].get("limit_latency_max_s") or 0) for r in records),
        "series": {"t": [round(t - t0, 1) for t in grid], "running": running,
                   "usage_mib": [round(u, 1) for u in use], "limits_mib": [round(v, 1) for v in limits]},
    }


def static_admission(durations: list[float], limit_mib: float, pool_mib: float) -> dict:
    """FIFO admission of rollouts that each hold ``limit_mib`` for their duration, all arriving at 0."""
    slots = max(1, int(pool_mib // limit_mib))
    ends: list[float] = []
    finish = []
    for d in durations:
        ends.sort()
        start = ends.pop(0) if len(ends) >= slots else 0.0
        ends.append(start + d)
        finish.append(start + d)
    makespan = max(finish)
    return {"max_concurrent": min(slots, len(durations)), "mean_concurrent": round(sum(durations) / makespan, 2),
            "makespan_s": round(makespan, 1)}


def replay_prediction(demand_dir: Path, demand_records: list[dict], arrivals: list[dict], args,
                      static_peak_mib: float, write_latency_s: float) -> dict:
    """What ``sandbox.simulate`` predicts for the live batches, from demand traces.

    The demand traces are the static-peak run's (each rollout alone under a limit it never
    reached: its memory and its tool phases unthrottled); the arrivals are the phase run's
    (``arrivals``: its records, in the same order); ``write_latency_s`` is the phase run's
    median limit-write latency. The phase run's own traces are not used: they hold its stalls.
    """
    import numpy as np

    from sandbox.shim import ShimSettings
    from sandbox.simulate import load_recorded, replay_ours

    dt = 0.01
    by_name = {t.name: t for t in load_recorded(demand_dir, dt, memory="sandbox")}
    pairs = [(by_name[d["rollout_id"]], a) for d, a in zip(demand_records, arrivals) if d["rollout_id"] in by_name]
    ordered = [t for t, _ in pairs]
    t0 = min(a["shim"]["admitted_at"] - a["shim"]["admission_wait_s"] for _, a in pairs)
    offsets = np.array([a["shim"]["admitted_at"] - a["shim"]["admission_wait_s"] - t0 for _, a in pairs])
    params = ShimSettings(enabled=True, baseline_bytes=args.baseline_mib * MiB, hard_max_bytes=args.hard_max_mib * MiB)
    ours = replay_ours(ordered, offsets, dt, budget=float(args.pool_mib), params=params,
                       write_latency_s=write_latency_s)
    unbounded = replay_ours(ordered, offsets, dt, budget=None, params=params, write_latency_s=write_latency_s)
    durations = [len(t.mem) * dt for t in ordered]
    peaks = [t.peak for t in ordered]
    return {
        "demand_traces": "static-peak", "write_latency_s": write_latency_s,
        "phase": {"oom_kills": ours.oom_kills, "admission_wait_s": round(ours.queued_s, 1),
                  "tool_s": round(ours.tool_s + ours.throttled_s, 1),
                  "paused_s": round(ours.throttled_s, 1), "paused_share": round(ours.slowdown, 4),
                  "makespan_s": round(ours.makespan_s, 1),
                  "mean_concurrent": round((sum(durations) + ours.throttled_s) / max(ours.makespan_s, 1e-9), 2),
                  "peak_limits_mib": round(ours.provisioned_mib, 1),
                  "peak_limits_unbounded_mib": round(unbounded.provisioned_mib, 1)},
        "static-peak": static_admission(durations, static_peak_mib, args.pool_mib),
        "static-peak-oracle": {"mean_peak_mib": round(float(np.mean(peaks)), 1),
                               "concurrent_in_pool": int(args.pool_mib // float(np.mean(peaks)))},
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for policy, live in result["live"].items():
        s = live["series"]
        axes[0].plot(s["t"], s["running"], label=policy)
        axes[1].plot(s["t"], s["limits_mib"], label=policy)
        axes[2].plot(s["t"], s["usage_mib"], label=policy)
    axes[0].set_title("rollouts admitted (running)")
    axes[1].set_title("sum of container limits (MiB)")
    axes[2].set_title("sum of container working sets (MiB)")
    axes[1].axhline(result["pool_mib"], color="k", ls="--", lw=0.8, label="pool")
    for ax in axes:
        ax.set_xlabel("seconds since the batch started")
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['n']} Docker rollouts per policy, pool {result['pool_mib']} MiB (live, cgroup v1)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(result: dict) -> str:
    cols = [("rollouts", "rollouts"), ("resolved", "resolved"), ("OOM kills", "oom_kills"),
            ("admitted at once", "admitted_at_once"), ("queued for admission", "queued_for_admission"),
            ("max concurrent", "max_concurrent"), ("mean concurrent", "mean_concurrent"),
            ("makespan s", "makespan_s"), ("tool s", "tool_s"), ("tool s queued for a grant", "tool_queued_s"),
            ("tool s paused at the limit", "tool_paused_s"),
            ("peak usage MiB", "peak_usage_mib"), ("mean usage MiB", "mean_usage_mib"),
            ("peak of limits MiB", "peak_limits_mib"), ("rollouts/GiB/h", "rollouts_per_gib_per_hour"),
            ("limit writes", "limit_changes"), ("write latency p50 s", "limit_latency_p50_s")]
    out = ["| policy | " + " | ".join(c for c, _ in cols) + " |", "|---|" + "---:|" * len(cols)]
    for policy, live in result["live"].items():
        out.append(f"| {policy} | " + " | ".join(str(live[k]) for _, k in cols) + " |")
    rp, rs = result["replay"], result["replay_from_static_peak"]
    lp, ls = result["live"]["phase"], result["live"]["static-peak"]
    out += ["", "| figure | live | replay (demand traces) | replay / live | replay (static-peak traces) | replay / live |",
            "|---|---:|---:|---:|---:|---:|"]
    rows = [
        ("phase: mean concurrent rollouts", lp["mean_concurrent"], lambda r: r["phase"]["mean_concurrent"]),
        ("phase / static-peak, mean concurrent rollouts", round(lp["mean_concurrent"] / ls["mean_concurrent"], 2),
         lambda r: round(r["phase"]["mean_concurrent"] / r["static-peak"]["mean_concurrent"], 2)),
        ("phase: makespan s", lp["makespan_s"], lambda r: r["phase"]["makespan_s"]),
        ("phase: peak of limits MiB", lp["peak_limits_mib"], lambda r: r["phase"]["peak_limits_mib"]),
        ("phase: OOM kills", lp["oom_kills"], lambda r: r["phase"]["oom_kills"]),
        ("phase: tool s", lp["tool_s"], lambda r: r["phase"]["tool_s"]),
        ("phase: tool s paused at the limit", lp["tool_paused_s"], lambda r: r["phase"]["paused_s"]),
        ("static-peak: mean concurrent rollouts", ls["mean_concurrent"], lambda r: r["static-peak"]["mean_concurrent"]),
        ("static-peak: makespan s", ls["makespan_s"], lambda r: r["static-peak"]["makespan_s"]),
    ]
    for name, live_v, pick in rows:
        cells = []
        for r in (rp, rs):
            v = pick(r)
            cells += [str(v), f"{v / live_v:.2f}" if live_v else "-"]
        out.append(f"| {name} | {live_v} | " + " | ".join(cells) + " |")
    oracle = rp["static-peak-oracle"]
    out += ["", f"Static limits from the demand run: {result['static_limits_mib']} (MiB). An oracle giving every "
            f"rollout its own peak (mean {oracle['mean_peak_mib']} MiB) would fit {oracle['concurrent_in_pool']} "
            f"at once in the pool."]
    return "\n".join(out) + "\n"


def pack_traces(trace_dir: Path, records: list[dict], dst: Path) -> None:
    """A run's traces, gzipped, with an index of their rollouts (added to the replay's trace set)."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    index = []
    for r in records:
        src = trace_dir / f"{r['rollout_id']}.jsonl"
        if not src.exists():
            continue
        rows = read_trace(src)
        (dst / f"{r['rollout_id']}.jsonl.gz").write_bytes(gzip.compress(src.read_bytes(), mtime=0))
        index.append({"rollout_id": r["rollout_id"], "instance_id": r["instance_id"],
                      "exit_status": r["exit_status"], "resolved": r["resolved"], "bursts_mib": r["bursts_mib"],
                      "samples": len(rows), "peak_mib": round(max(x["sandbox_rss"] for x in rows) / MiB, 1),
                      "mean_mib": round(statistics.mean(x["sandbox_rss"] for x in rows) / MiB, 2),
                      "total_s": round(r["total_s"], 2), "tool_s": round(r["tool_s"], 2)})
    (dst / "index.jsonl").write_text("".join(json.dumps(x) + "\n" for x in index))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="data/simple/train.parquet")
    ap.add_argument("--n", type=int, default=16, help="rollouts per policy, all started at once")
    ap.add_argument("--pool-mib", type=int, default=2048, help="the worker's memory pool, MiB")
    ap.add_argument("--demand-pool-mib", type=int, default=16384, help="the demand run's pool, MiB (never short)")
    ap.add_argument("--baseline-mib", type=int, default=32, help="phase/reactive baseline reservation, MiB")
    ap.add_argument("--hard-max-mib", type=int, default=1024, help="a container's hard cap, MiB")
    ap.add_argument("--burst-mib", default="96,480", help="lo,hi of the log-uniform burst sizes, MiB")
    ap.add_argument("--burst-s", type=float, default=1.5, help="how long a burst is held, seconds")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="outputs/shim_live", help="records and traces of the run")
    ap.add_argument("--traces", default=None, help="copy every run's traces here, one folder per policy (gzipped, with index.jsonl)")
    ap.add_argument("--out", default="outputs/shim_live/result", help="output prefix (.json .png .md)")
    args = ap.parse_args(argv)

    from recipe.rollout import read_rows
    from sandbox.docker_sandbox import docker_engine_available

    ok, why = docker_engine_available()
    if not ok:
        print(f"shim_live: {why} (bash example/docker_engine.sh start)", file=sys.stderr)
        return 2
    rows_all = read_rows(args.data, None)
    rows = [rows_all[i % len(rows_all)] for i in range(args.n)]
    lo, hi = (int(x) for x in args.burst_mib.split(","))
    plan = burst_plan(args.n, lo, hi, args.seed)
    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    policies = [p for p in args.policies.split(",") if p]
    if policies[0] != "demand":
        raise SystemExit("the demand run goes first: the static limits are set from its measurements")
    result = {"n": args.n, "pool_mib": args.pool_mib, "baseline_mib": args.baseline_mib,
              "hard_max_mib": args.hard_max_mib, "burst_mib": [lo, hi], "burst_s": args.burst_s,
              "plan_mib": plan, "live": {}, "records": {}}
    measured = None
    for policy in policies:
        trace_dir = work / "traces" / policy
        t = time.monotonic()
        print(f"[shim_live] {policy}: {args.n} rollouts, pool {args.pool_mib} MiB ...", flush=True)
        records = asyncio.run(run_batch(policy, rows, plan, args, trace_dir, measured))
        live = live_figures(records, trace_dir, args.demand_pool_mib if policy == "demand" else args.pool_mib)
        result["live"][policy] = live
        result["records"][policy] = records
        print(f"[shim_live] {policy}: {time.monotonic() - t:.0f} s; " + ", ".join(
            f"{k}={v}" for k, v in live.items() if k != "series"), flush=True)
        if policy == "demand":
            peaks = [max(x["sandbox_rss"] for x in read_trace(p)) for p in trace_dir.glob("*.jsonl")]
            means = [statistics.mean(x["sandbox_rss"] for x in read_trace(p)) for p in trace_dir.glob("*.jsonl")]
            measured = {"static_peak_bytes": max(int(1.1 * max(peaks)), 16 * MiB),
                        "static_mean_bytes": max(int(statistics.mean(means)), 16 * MiB)}
            result["static_limits_mib"] = {k: round(v / MiB, 1) for k, v in measured.items()}
            print(f"[shim_live] static limits from the demand run: {result['static_limits_mib']}", flush=True)
    recs = result["records"]
    if {"demand", "phase", "static-peak"} <= set(recs):
        lat = sorted(r["shim"]["limit_latency_p50_s"] for r in recs["phase"] if r["shim"].get("limit_latency_p50_s"))
        latency = lat[len(lat) // 2] if lat else 0.0
        peak_mib = measured["static_peak_bytes"] / MiB
        result["replay"] = replay_prediction(work / "traces" / "demand", recs["demand"], recs["phase"], args,
                                             peak_mib, latency)
        result["replay_from_static_peak"] = replay_prediction(work / "traces" / "static-peak", recs["static-peak"],
                                                              recs["phase"], args, peak_mib, latency)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    table = markdown(result) if "replay" in result else ""
    out.with_suffix(".md").write_text(table)
    print(table)
    if args.traces:
        for policy, records in result["records"].items():
            pack_traces(work / "traces" / policy, records, Path(args.traces) / policy)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
