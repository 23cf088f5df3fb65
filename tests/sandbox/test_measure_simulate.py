"""Resource sampling of a marked process tree, and the policy replay."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

from sandbox.local import ROLLOUT_MARKER_ENV
from sandbox.measure import ResourceSampler
from sandbox.shim import ShimSettings
from sandbox.simulate import (

    Trace,
    load_recorded,
    main as simulate_main,
    measured_baseline_mib,
    replay_ours,
    replay_reactive,
    replay_static,
    synthetic_trace,
)

# An "agent" that idles, then runs a "tool" child holding ~150 MB for a while.
AGENT = (
    "import subprocess, sys, time; time.sleep(0.6); "
    "subprocess.run([sys.executable, '-c', 'import time; b = bytearray(150 << 20); time.sleep(0.8)']); "
    "time.sleep(0.6)"
)


@pytest.mark.parametrize("scope", ["sandbox", "tree"])
def test_sampler_labels_tool_phase_and_splits_agent_from_sandbox(tmp_path, scope):
    rid = uuid.uuid4().hex
    trace = tmp_path / f"{rid}.jsonl"
    agent = subprocess.Popen([sys.executable, "-c", AGENT], env={**os.environ, ROLLOUT_MARKER_ENV: rid})
    sampler = ResourceSampler(rid, hz=20, trace_path=trace, scope=scope)
    sampler.start()
    agent.wait(timeout=30)
    time.sleep(0.2)
    res = sampler.stop()
    rows = [json.loads(line) for line in trace.read_text().splitlines()]
    assert len(rows) >= 20  # >= 10 Hz over ~2 s
    tool = [r for r in rows if r["phase"] == "tool"]
    idle = [r for r in rows if r["phase"] == "inference" and r["agent_rss"] > 0]
    assert tool and idle
    # The agent process is never counted as sandbox memory; between tools the sandbox is empty.
    assert all(r["sandbox_rss"] == 0 and r["nproc"] == 0 for r in idle)
    assert max(r["sandbox_rss"] for r in tool) >= 150 << 20
    if scope == "sandbox":
        assert all(r["rss"] == r["sandbox_rss"] for r in rows)
        assert max(r["rss"] for r in idle) == 0
    else:
        assert all(r["rss"] == r["sandbox_rss"] + r["agent_rss"] for r in rows)
        assert min(r["rss"] for r in idle) > 5 << 20  # the agent's interpreter
    assert max(r["rss"] for r in tool) > max(r["rss"] for r in idle) + (100 << 20)
    assert len(res.tool_calls) == 1 and res.tool_calls[0].peak_rss >= 150 << 20
    assert res.scope == scope and res.agent_peak_rss > 5 << 20
    assert res.peak_rss >= res.tool_calls[0].peak_rss and res.cpu_s > 0
    with pytest.raises(ValueError, match=">= 10.0 Hz"):
        ResourceSampler(rid, hz=5)
    with pytest.raises(ValueError, match="scope"):
        ResourceSampler(rid, scope="container")


def test_sampler_follows_the_proxy_phase_when_wired():
    sampler = ResourceSampler("nobody-" + uuid.uuid4().hex, hz=50)
    sampler.on_phase("tool")
    assert sampler.sample()[2] == "tool"
    sampler.on_phase("inference")
    assert sampler.sample()[2] == "inference"


def _spike_trace(dt=0.01) -> Trace:
    """2 s baseline 200 MiB, a 1 s tool bursting to 2 GiB at 3 GiB/s, 2 s baseline."""
    n = int(5 / dt)
    mem = np.full(n, 200.0, dtype=np.float32)
    tool = np.zeros(n, dtype=bool)
    a, b = int(2 / dt), int(3 / dt)
    tool[a:b] = True
    ramp = np.minimum(np.arange(b - a) * dt * 3072, 1848)
    mem[a:b] = 200 + ramp
    return Trace(mem, tool, "spike")


def test_policies_on_a_known_spike():
    dt = 0.01
    traces = [_spike_trace(dt) for _ in range(4)]
    offsets = np.zeros(4)
    peak = replay_static(traces, offsets, dt, which="peak", budget=None)
    assert peak.oom_kills == 0 and peak.provisioned_mib == pytest.approx(4 * 2048, rel=0.01)
    mean = replay_static(traces, offsets, dt, which="mean", budget=None)
    assert mean.oom_kills == 4
    # A 100 ms-late controller misses a 3 GiB/s ramp; a 10 ms one with 20% headroom keeps up.
    assert replay_reactive(traces, offsets, dt, delay_s=0.1, budget=None).oom_kills == 4
    assert replay_reactive(traces, offsets, dt, delay_s=0.01, budget=None).oom_kills == 0
    ours = replay_ours(traces, offsets, dt, budget=None)
    assert ours.oom_kills == 0 and ours.tool_calls == 4
    # With a pool for one burst only, ours queues/throttles instead of killing.
    tight = replay_ours(traces, offsets, dt, budget=4 * 256 + 2048, params=ShimSettings())
    assert tight.oom_kills == 0 and tight.throttled_s > ours.throttled_s
    # Limits that reach the kernel 100 ms late (an engine round trip) stall each growth step
    # longer, and never kill: the sandbox sleeps at the old limit.
    late = replay_ours(traces, offsets, dt, budget=None, write_latency_s=0.1)
    assert late.oom_kills == 0 and late.throttled_s > ours.throttled_s + 4 * 0.1


def test_synthetic_traces_follow_seed_001():
    rng = np.random.default_rng(0)
    bank = [synthetic_trace(rng, 0.05, duration_scale=0.25) for _ in range(60)]
    base = np.median([np.median(t.mem[~t.tool]) for t in bank])
    assert 150 < base < 260  # ~185 MB framework baseline
    share = np.median([t.tool.mean() for t in bank])
    assert 0.2 < share < 0.55  # ~35% of time in tools
    assert max(t.peak / t.mean for t in bank) > 5  # bursty: peak/mean up to 15.4x in the seed
    # Bursts happen in tools: samples > baseline + 300 MB are (almost) all tool samples.
    burst = np.concatenate([t.mem > np.median(t.mem) + 300 for t in bank])
    in_tool = np.concatenate([t.tool for t in bank])
    assert in_tool[burst].mean() > 0.95


def test_cli_replays_recorded_traces_and_writes_report(tmp_path):
    traces = tmp_path / "traces"
    traces.mkdir()
    for i in range(3):
        rows = [{"t": k * 0.05, "rss": (150 + (400 if 20 <= k < 30 else 0)) << 20,
                 "sandbox_rss": (400 if 20 <= k < 30 else 0) << 20, "agent_rss": 150 << 20,
                 "phase": "tool" if 20 <= k < 30 else "inference"}
                for k in range(60)]
        text = "\n".join(json.dumps(r) for r in rows)
        if i == 2:  # gzipped trace files are read too
            (traces / f"r{i}.jsonl.gz").write_bytes(gzip.compress(text.encode()))
        else:
            (traces / f"r{i}.jsonl").write_text(text)
    assert sorted(t.name for t in load_recorded(traces, 0.01)) == ["r0", "r1", "r2"]
    # --memory picks the sandbox (tool processes) or sandbox + agent.
    assert max(t.peak for t in load_recorded(traces, 0.01, memory="sandbox")) == pytest.approx(400)
    assert min(t.mem.min() for t in load_recorded(traces, 0.01, memory="sandbox+agent")) == pytest.approx(150)
    assert measured_baseline_mib(load_recorded(traces, 0.01, memory="sandbox+agent")) == 150
    assert measured_baseline_mib(load_recorded(traces, 0.01, memory="sandbox")) == 1  # at least 1 MiB
    out = tmp_path / "report"
    assert simulate_main(["--no-synthetic", "--traces", str(traces), "--n", "4", "--machine-gib", "2",
                          "--start-spread-s", "1", "--max-n", "32", "--baseline-mib", "measured",
                          "--reactive-floor-mib", "64", "--out", str(out)]) == 0
    summary = json.loads(out.with_suffix(".json").read_text())[0]
    assert summary["results"]["static-peak"]["oom_kills"] == 0
    assert summary["results"]["ours"]["oom_kills"] == 0
    assert summary["ours_params"]["baseline"] == 1 and summary["reactive_floor_mib"] == 64
    assert summary["trace_stats"]["burst_mib_max"] == pytest.approx(400)
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert "static-peak" in out.with_suffix(".md").read_text()
    with pytest.raises(ValueError, match="no trace files"):
        load_recorded(tmp_path / "nothing", 0.01)
    with pytest.raises(ValueError, match="memory must be"):
        load_recorded(traces, 0.01, memory="vsz")
