"""`python -m recipe.rollout`: the command users run, as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "recipe.rollout", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_reference_run_writes_trajectories_predictions_summary_and_profile(simple_tasks_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    profile = tmp_path / "profile"
    data = f"{simple_tasks_dir / 'train.parquet'},{simple_tasks_dir / 'test.parquet'}"
    proc = run_cli(f"data={data}", "policy=reference", f"model_path={tiny_model_dir}", f"out_dir={out}",
                   "limit=3", "n=2", "concurrency=3", f"swe_agent.proxy.profile_log_dir={profile}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resolved=6 (100.0%)" in proc.stdout
    assert "GRPO groups=3 uniform-reward (zero advantage)=3 (all resolved 3" in proc.stdout

    records = [json.loads(line) for path in (out / "rollouts").glob("step_*.jsonl")
               for line in path.read_text().splitlines()]
    assert len(records) == 6
    for record in records:
        assert record["exit_status"] == "submitted" and record["resolved"] and record["reward"] == 1.0
        assert record["response_mask_len"] == record["response_tokens"] == record["logprobs_len"]
        assert record["messages"][0]["role"] == "system"

    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert {tuple(sorted(p)) for p in predictions} == {("instance_id", "model_name_or_path", "model_patch")}
    assert all(p["model_patch"].startswith("diff --git") for p in predictions)

    agent_files = list(out.glob("*/*.traj.json"))
    assert len(agent_files) == 6  # mini-swe-agent's own trajectory, one per rollout

    summary = json.loads((out / "summary.json").read_text())
    assert summary["all"]["n"] == 6 and summary["all"]["resolved_rate"] == 1.0
    assert summary["by_data_source"]["swe_simple"]["exit_status"] == {"submitted": 6}

    metrics = subprocess.run([sys.executable, "-m", "recipe.metrics", str(out), "--out", str(out / "m.jsonl")],
                             cwd=ROOT, capture_output=True, text=True)
    assert metrics.returncode == 0, metrics.stderr
    step = json.loads((out / "m.jsonl").read_text().splitlines()[0])
    assert step["swe/rollouts"] == 6 and step["swe/resolved_rate"] == 1.0 and step["swe/exit/submitted"] == 6
    assert step["swe/grpo_uniform_groups"] == 3

    # The proxy's profile log of this real run (real mini-swe-agent processes) -> stats JSON and PNGs.
    events = [json.loads(line) for path in profile.glob("*.jsonl") for line in path.read_text().splitlines()]
    calls = [e for e in events if e["type"] == "llm_call"]
    tool_phases = [e for e in events if e["type"] == "tool_phase"]
    assert len({c["session"] for c in calls}) == 6
    assert len(calls) == sum(r["num_llm_calls"] for r in records)
    assert sum(c["completion_tokens"] for c in calls) == sum(r["sampled_tokens"] for r in records)
    assert tool_phases and all(t["duration_ms"] >= 0 for t in tool_phases)
    analysis = tmp_path / "analysis"
    analyze = subprocess.run([sys.executable, "-m", "model_proxy.analyze", str(profile), "--out-dir", str(analysis)],
                             cwd=ROOT, capture_output=True, text=True)
    assert analyze.returncode == 0, analyze.stderr
    stats = json.loads((analysis / "proxy_stats.json").read_text())["metrics"]
    assert stats["total_ms"]["n"] == len(calls) and stats["tool_ms"]["n"] == len(tool_phases)
    assert stats["prompt_tokens"]["max"] == max(c["prompt_tokens"] for c in calls)
    for name in ("total_ms", "generate_ms", "prompt_tokens", "completion_tokens", "tool_ms"):
        assert (analysis / f"proxy_{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_option_fails_with_its_name(tmp_path):
    proc = run_cli("concurency=2", f"out_dir={tmp_path}")
    assert proc.returncode != 0
    assert "concurency" in proc.stderr


def test_predictions_touch_only_task_files_with_a_relative_out_dir(simple_tasks_dir, tiny_model_dir, tmp_path):
    """As the quickstart runs it: a relative out_dir (resolved before any agent starts, so
    no file of ours -- trajectories, records -- lands in a work tree and its patch)."""
    from unidiff import PatchSet

    from core.task import load_tasks

    proc = subprocess.run(
        [sys.executable, "-m", "recipe.rollout", f"data={simple_tasks_dir / 'test.parquet'}", "policy=reference",
         f"model_path={tiny_model_dir}", "out_dir=outputs/relative", "limit=2", "concurrency=2",
         "swe_agent.trajectory_dir=outputs/relative/agent"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tasks = {t.instance_id: t for t in load_tasks(simple_tasks_dir / "tasks.jsonl")}
    predictions = [json.loads(line)
                   for line in (tmp_path / "outputs/relative/predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 2
    for prediction in predictions:
        touched = {f.path for f in PatchSet(prediction["model_patch"])}
        allowed = {f.path for f in PatchSet(tasks[prediction["instance_id"]].patch)}
        assert touched and touched <= allowed, (prediction["instance_id"], touched - allowed)
    assert list((tmp_path / "outputs/relative/agent").rglob("*.traj.json"))  # kept, outside the work trees
