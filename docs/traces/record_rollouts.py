"""Run scripted ``reference_with_tests`` rollouts on real tasks, for recording resource traces.

This is the script that produced the recorded trace set of ``docs/resource_shim.md``.
It drives the real rollout path (``SWEAgentLoop`` -> ModelProxy -> mini-swe-agent
subprocess -> bash commands in the sandbox -> hidden-test grading); only the policy
is scripted (``model_proxy.backends.scripted.reference_with_tests_commands``), with
emulated inference time (``GenerationLatency.served_7b()`` unless ``--no-latency``).
Run it under the sampler, which records one trace per rollout::

    python -m sandbox.measure --out data/traces/smith_rwt --hz 20 --scope sandbox -- \\
        python docs/traces/record_rollouts.py --data data/smith/train.parquet,data/smith/test.parquet \\
        --per-repo 4 --concurrency 2

then pack the traces with their rollouts' outcomes (gzipped traces + ``index.jsonl``)::

    python docs/traces/record_rollouts.py --pack data/traces/smith_rwt outputs/record_rollouts_smith docs/traces/smith_rwt

Tasks are taken round-robin over the tasks' ``repo`` (so every package is covered),
``--per-repo`` each, in parquet order. Prints one line per rollout and writes the
agent trajectories and ``TrajectoryRecord``s under ``--out-dir``.

(Until ``recipe`` has a ``policy=reference_with_tests`` value, this is how the policy is
selected: ``policy=model`` with the scripted backend handed to the loop.)
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def pick_rows(data: str, per_repo: int) -> list[dict]:
    """``per_repo`` rows of each repository, interleaved (round-robin over repos)."""
    from recipe.rollout import read_rows

    by_repo: dict[str, list[dict]] = defaultdict(list)
    for row in read_rows(data, None):
        repo = (row.get("extra_info") or {}).get("repo", "")
        if len(by_repo[repo]) < per_repo:
            by_repo[repo].append(row)
    rows = []
    for k in range(per_repo):
        rows += [rs[k] for _, rs in sorted(by_repo.items()) if k < len(rs)]
    return rows


async def run(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from model_proxy.backends.scripted import GenerationLatency, ScriptedPolicyBackend, reference_with_tests_commands
    from recipe.worker_resources import WorkerResources
    from core.task import SWETask
    from prepare.tiny_model import build_tiny_model
    from recipe.swe_agent_loop import SWEAgentLoop

    out_dir = Path(args.out_dir)
    model_dir = build_tiny_model(out_dir / "tiny_model", seed=0)  # only its ChatML tokenizer is used
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    latency = GenerationLatency() if args.no_latency else GenerationLatency.served_7b()
    rows = pick_rows(args.data, args.per_repo)
    sem = asyncio.Semaphore(args.concurrency)
    failures = 0

    async def one(row: dict) -> None:
        nonlocal failures
        task = SWETask.from_extra_info(row["extra_info"])
        backend = ScriptedPolicyBackend(tokenizer, reference_with_tests_commands(task), latency=latency)
        async with sem:
            loop = SWEAgentLoop.standalone(
                tokenizer=tokenizer, hf_model_type="qwen2", prompt_length=8192, response_length=16384,
                swe_agent={"policy": "model", "trajectory_dir": str(out_dir),
                           "agent": {"step_limit": 12, "command_timeout_s": 300}},
                backend=backend,
            )
            t0 = time.monotonic()
            out = await loop.run({"temperature": 1.0, "logprobs": True}, raw_prompt=row.get("prompt") or [],
                                 extra_info=row["extra_info"], data_source=row.get("data_source", ""))
        extra = out.extra_fields if not isinstance(out, list) else out[-1].extra_fields
        failures += not extra["resolved"]
        print(f"{task.instance_id} {extra['exit_status']} resolved={extra['resolved']} calls={extra['num_llm_calls']} "
              f"generation_s={extra['generation_s']:.1f} tool_s={extra['tool_s']:.1f} "
              f"total_s={time.monotonic() - t0:.1f} {extra['error'][:120]}", flush=True)

    try:
        await asyncio.gather(*(one(r) for r in rows))
    finally:
        await WorkerResources.close_for_running_loop()
    print(f"{len(rows)} rollouts, {len(rows) - failures} resolved", flush=True)
    return 0


def pack(traces: Path, records: Path, dst: Path) -> int:
    """Gzip each rollout's trace into ``dst`` and write ``dst/index.jsonl``: one line per rollout with its task,
    outcome and times (from the ``TrajectoryRecord``s under ``records``) and its measured peaks (``summary.json``)."""
    import gzip
    import json

    summary = json.loads((traces / "summary.json").read_text())
    recs = {}
    for f in sorted((records / "rollouts").glob("*.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            recs[r["rollout_id"]] = r
    dst.mkdir(parents=True, exist_ok=True)
    index = []
    for rid, s in sorted(summary.items(), key=lambda kv: recs.get(kv[0], {}).get("instance_id", "")):
        r = recs.get(rid, {})
        rows = [json.loads(line) for line in (traces / f"{rid}.jsonl").read_text().splitlines() if line.strip()]
        fixed = 0
        for row in rows:
            # Recorded before sandbox.measure skipped un-exec'd forks: a lone tool process with the
            # agent's RSS is the agent forking bash (shared pages), not sandbox memory.
            if row["nproc"] == 1 and abs(row["sandbox_rss"] - row["agent_rss"]) <= 0.02 * row["agent_rss"]:
                row["sandbox_rss"], row["fork_shared"] = 0, True
                row["rss"] = row["sandbox_rss"] if s.get("scope") == "sandbox" else row["rss"]
                fixed += 1
        text = "".join(json.dumps(row) + "\n" for row in rows)
        (dst / f"{rid}.jsonl.gz").write_bytes(gzip.compress(text.encode(), mtime=0))
        tools = [i for i in s["intervals"] if i["phase"] == "tool"]
        index.append({
            "rollout_id": rid, "instance_id": r.get("instance_id"), "exit_status": r.get("exit_status"),
            "resolved": r.get("resolved"), "num_llm_calls": r.get("num_llm_calls"),
            "generation_s": round(r.get("generation_s", 0.0), 2), "tool_s": round(r.get("tool_s", 0.0), 2),
            "total_s": round(r.get("total_s", 0.0), 2), "samples": s["samples"], "tool_calls_seen": len(tools),
            "sandbox_peak_mib": round(s["peak_rss"] / 2**20, 1), "sandbox_mean_mib": round(s["mean_rss"] / 2**20, 2),
            "agent_peak_mib": round(s["agent_peak_rss"] / 2**20, 1), "agent_mean_mib": round(s["agent_mean_rss"] / 2**20, 1),
            "sandbox_peak_mib_corrected": round(max(r["sandbox_rss"] for r in rows) / 2**20, 1),
            "fork_samples_zeroed": fixed,
        })
    (dst / "index.jsonl").write_text("".join(json.dumps(row) + "\n" for row in index))
    print(f"packed {len(index)} traces into {dst}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="data/smith/train.parquet,data/smith/test.parquet")
    ap.add_argument("--per-repo", type=int, default=4, help="rollouts per repository (package)")
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--out-dir", default="outputs/record_rollouts")
    ap.add_argument("--no-latency", action="store_true", help="answer at once (no emulated inference time)")
    ap.add_argument("--pack", nargs=3, metavar=("TRACES", "RECORDS", "DST"), help="pack a recorded set (see above)")
    args = ap.parse_args(argv)
    if args.pack:
        return pack(*(Path(p) for p in args.pack))
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
