"""Rollout/evaluation runs of ``SWEAgentLoop`` without a trainer (CPU works).

    python -m recipe.rollout data=data/simple/test.parquet policy=reference concurrency=4
    python -m recipe.rollout data=data/simple/test.parquet policy=model model_path=outputs/tiny_model

Arguments are OmegaConf dot-list overrides of ``RolloutRunConfig`` (defaults in
``configs/rollout.yaml``); ``swe_agent.*`` keys override the agent-loop section
(``configs/swe_agent.yaml``). An unknown key fails with its name.

Writes to ``out_dir`` the same layout as training's ``swe_agent.trajectory_dir``:
``rollouts/step_*.jsonl`` (one ``TrajectoryRecord`` per rollout),
``<instance_id>/<rollout_id>.traj.json`` (mini-swe-agent's own trajectory), plus
``predictions.jsonl`` (SWE-bench format) and ``summary.json``; prints the summary
per data source.
"""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

if TYPE_CHECKING:
    from recipe.worker_resources import WorkerResources

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class RolloutRunConfig:
    """A rollout run. Lengths are tokens; ``n`` is rollouts per task (a GRPO group)."""

    # One parquet path, or several separated by commas.
    data: str = "data/simple/test.parquet"
    out_dir: str = "outputs/rollout"
    # model = the HF model at model_path; reference / empty = scripted harness checks.
    policy: str = "model"
    # HF model directory for policy=model (e.g. the tiny model from `python -m prepare.tiny_model`).
    model_path: str | None = None
    # policy=script: a file of bash commands, one per line, replayed as the policy's actions.
    script: str | None = None
    # Name written into predictions.jsonl (defaults to the policy or model path).
    model_name: str | None = None
    concurrency: int = 4
    limit: int | None = None
    n: int = 1
    seed: int = 0
    device: str = "cpu"
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    prompt_length: int = 8192
    response_length: int = 4096
    swe_agent: dict[str, Any] = field(default_factory=dict)


def load_config(argv: list[str]) -> RolloutRunConfig:
    """Schema defaults <- ``configs/rollout.yaml`` <- CLI dot-list overrides.

    Raises:
        omegaconf.errors.ConfigKeyError: unknown key (named in the message).
    """
    schema = OmegaConf.structured(RolloutRunConfig)
    defaults = OmegaConf.load(CONFIG_DIR / "rollout.yaml")
    return OmegaConf.to_object(OmegaConf.merge(schema, defaults, OmegaConf.from_dotlist(argv)))  # type: ignore[return-value]


def read_rows(path: str, limit: int | None) -> list[dict[str, Any]]:
    """Rows of verl-format parquets (comma-separated paths) as dicts (``prompt``, ``extra_info``, ...)."""
    import pyarrow.parquet as pq

    rows = [row for part in path.split(",") if part for row in pq.read_table(part.strip()).to_pylist()]
    return rows[:limit] if limit is not None else rows


def make_loop_factory(cfg: RolloutRunConfig):
    """Build what every rollout shares (tokenizer, model backend).

    Returns:
        (a factory of ``SWEAgentLoop`` objects, the sandbox parent directory or None).
    """
    from transformers import AutoConfig, AutoTokenizer

    from recipe.config import Policy
    from recipe.swe_agent_loop import SWEAgentLoop

    swe_agent = OmegaConf.merge(OmegaConf.load(CONFIG_DIR / "swe_agent.yaml"), cfg.swe_agent)
    swe_agent.policy = cfg.policy
    if cfg.script:
        swe_agent.script = str(Path(cfg.script).resolve())
    if not swe_agent.get("trajectory_dir"):
        # Same layout as training: out_dir/rollouts/*.jsonl records, out_dir/<instance>/<rollout>.traj.json agent files.
        swe_agent.trajectory_dir = cfg.out_dir
    # Absolute before any agent starts: the agent runs in its work tree, where a relative path would land
    # (and end up in the patch).
    swe_agent.trajectory_dir = str(Path(swe_agent.trajectory_dir).resolve())
    backend = None
    if cfg.model_path is None:
        from prepare.tiny_model import build_tiny_model

        cfg.model_path = str(build_tiny_model(Path(cfg.out_dir) / "tiny_model", seed=cfg.seed))
    from model_proxy.token_check import make_token_builder

    tokenizer = AutoTokenizer.from_pretrained(cfg.model_path)
    hf_model_type = getattr(AutoConfig.from_pretrained(cfg.model_path), "model_type", None)
    # Fails here, naming the setting, when the builder would not reproduce the chat template.
    make_token_builder(tokenizer, family=str(swe_agent.proxy.get("token_builder", "auto")), hf_model_type=hf_model_type)
    if Policy(cfg.policy) == Policy.MODEL:
        from model_proxy.backends.hf_local import HFLocalBackend

        backend = HFLocalBackend(cfg.model_path, device=cfg.device, seed=cfg.seed)

    def make_loop(resources: WorkerResources | None = None) -> SWEAgentLoop:
        return SWEAgentLoop.standalone(
            tokenizer=tokenizer,
            hf_model_type=hf_model_type,
            prompt_length=cfg.prompt_length,
            response_length=cfg.response_length,
            swe_agent=OmegaConf.to_container(swe_agent),
            backend=backend,
            resources=resources,
        )

    return make_loop, swe_agent.get("sandbox", {}).get("parent_dir")


async def run_rollouts(cfg: RolloutRunConfig) -> dict[str, Any]:
    """Run every row ``cfg.n`` times at ``cfg.concurrency``; write outputs; return the summary dict."""
    from tqdm import tqdm

    from recipe.trajectory import RunSummary, TrajectoryRecord
    from recipe.worker_resources import WorkerResources

    from sandbox.local import reap_stale_sandboxes

    rows = read_rows(cfg.data, cfg.limit)
    make_loop, sandbox_parent = make_loop_factory(cfg)
    # This run is the worker: one proxy server, shim and grader set for all its rollouts.
    resources = WorkerResources(make_loop().swe_config)
    # Sandboxes of an earlier run that was killed (its owner pid is dead) go first.
    await asyncio.to_thread(reap_stale_sandboxes, sandbox_parent)
    sampling_params = {
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "top_k": cfg.top_k,
        "repetition_penalty": 1.0,
        "logprobs": True,
    }
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_name = cfg.model_name or (cfg.model_path if cfg.policy == "model" else f"scripted-{cfg.policy}")
    semaphore = asyncio.Semaphore(cfg.concurrency)

    async def one(row: dict[str, Any], session: int) -> TrajectoryRecord:
        async with semaphore:
            output = await make_loop(resources).run(
                dict(sampling_params),
                raw_prompt=row.get("prompt") or [],
                extra_info=row.get("extra_info") or {},
                data_source=row.get("data_source", ""),
                reward_model=row.get("reward_model"),
                session_id=session,
            )
        return TrajectoryRecord.from_output(output, data_source=row.get("data_source", ""), policy=cfg.policy)

    jobs = [asyncio.create_task(one(row, k)) for row in rows for k in range(cfg.n)]
    records: list[TrajectoryRecord] = []
    try:
        # The loop itself appends each rollout's record under out_dir/rollouts/.
        for job in tqdm(asyncio.as_completed(jobs), total=len(jobs), desc=f"rollouts ({cfg.policy})"):
            records.append(await job)
    finally:
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)
        await resources.aclose()
        await asyncio.to_thread(reap_stale_sandboxes, sandbox_parent)

    predictions = "".join(json.dumps(r.prediction(model_name)) + "\n" for r in records)
    await asyncio.to_thread((out_dir / "predictions.jsonl").write_text, predictions)
    by_source: dict[str, list[TrajectoryRecord]] = {}
    for record in records:
        by_source.setdefault(record.data_source, []).append(record)
    summary = {"policy": cfg.policy, "model": model_name, "all": RunSummary.of(records).model_dump()}
    summary["by_data_source"] = {src: RunSummary.of(rs).model_dump() for src, rs in sorted(by_source.items())}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    for src, rs in sorted(by_source.items()):
        print("\n".join(RunSummary.of(rs).lines(f"{cfg.policy}:{src}")))
    return summary


def main(argv: list[str] | None = None) -> int:
    cfg = load_config(sys.argv[1:] if argv is None else argv)
    asyncio.run(run_rollouts(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
