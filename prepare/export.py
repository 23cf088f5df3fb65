"""Write tasks as ``tasks.jsonl`` and verl ``RLHFDataset`` parquet files.

Parquet row schema (one row per task; verl reads ``prompt`` as chat messages,
``agent_name`` picks the agent loop, ``reward_model.ground_truth`` and
``extra_info`` reach the reward function):

    data_source   str
    prompt        list<struct<role: str, content: str>>   one user message: the issue
    ability       str   "software_engineering"
    agent_name    str   "swe_agent"
    reward_model  struct<style: str, ground_truth: str>    style "rule", the reference patch
    extra_info    struct<every SWETask field: str, index: int64, split: str>
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from core.task import SWETask

ABILITY = "software_engineering"
AGENT_NAME = "swe_agent"


@dataclass(frozen=True)
class OutputPaths:
    """Where ``write_outputs`` put the dataset, and how many rows each split has."""

    tasks_jsonl: Path
    train_parquet: Path
    test_parquet: Path
    n_train: int
    n_test: int


def parquet_schema() -> pa.Schema:
    """The explicit parquet schema (see module docstring); fixed even for an empty split."""
    extra_fields = [pa.field(name, pa.string()) for name in SWETask.model_fields]
    extra_fields += [pa.field("index", pa.int64()), pa.field("split", pa.string())]
    message = pa.struct([pa.field("role", pa.string()), pa.field("content", pa.string())])
    return pa.schema(
        [
            pa.field("data_source", pa.string()),
            pa.field("prompt", pa.list_(message)),
            pa.field("ability", pa.string()),
            pa.field("agent_name", pa.string()),
            pa.field("reward_model", pa.struct([pa.field(k, pa.string()) for k in ("style", "ground_truth")])),
            pa.field("extra_info", pa.struct(extra_fields)),
        ]
    )


def task_row(task: SWETask, index: int, split: str) -> dict[str, Any]:
    """One verl dataset row for ``task`` (``index``: position in tasks.jsonl)."""
    return {
        "data_source": task.data_source,
        "prompt": [{"role": "user", "content": task.problem_statement}],
        "ability": ABILITY,
        "agent_name": AGENT_NAME,
        "reward_model": {"style": "rule", "ground_truth": task.patch},
        "extra_info": {**task.to_extra_info(), "index": index, "split": split},
    }


def split_ids(instance_ids: Sequence[str], *, seed: int, test_fraction: float) -> frozenset[str]:
    """The ids that go to the test split: a seed-shuffled ``round(n * test_fraction)`` of them.

    With a fraction strictly between 0 and 1 and at least two tasks, each split
    gets at least one task. The result depends only on the set of ids and the seed.

    Raises:
        ValueError: ``test_fraction`` is outside [0, 1].
    """
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError("test_fraction must be within [0, 1]")
    ids = sorted(instance_ids)
    n_test = round(len(ids) * test_fraction)
    if 0.0 < test_fraction < 1.0 and len(ids) >= 2:
        n_test = min(max(n_test, 1), len(ids) - 1)
    random.Random(f"split:{seed}").shuffle(ids)
    return frozenset(ids[:n_test])


def _write_parquet(rows: list[dict[str, Any]], path: Path) -> None:
    table = pa.Table.from_pylist(rows, schema=parquet_schema())
    pq.write_table(table, path)


def write_outputs(
    tasks: Sequence[SWETask], out_dir: str | Path, *, seed: int, test_fraction: float
) -> OutputPaths:
    """Write ``tasks.jsonl``, ``train.parquet`` and ``test.parquet`` into ``out_dir``.

    ``tasks.jsonl`` keeps the order of ``tasks``; each parquet keeps that order
    within its split, and ``extra_info.index`` is the line number in tasks.jsonl
    (from 0). Existing files are overwritten.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    test_ids = split_ids([t.instance_id for t in tasks], seed=seed, test_fraction=test_fraction)
    paths = OutputPaths(
        tasks_jsonl=out / "tasks.jsonl",
        train_parquet=out / "train.parquet",
        test_parquet=out / "test.parquet",
        n_train=len(tasks) - len(test_ids),
        n_test=len(test_ids),
    )
    with open(paths.tasks_jsonl, "w", encoding="utf-8") as fh:
        for task in tasks:
            fh.write(task.model_dump_json() + "\n")
    rows = {"train": [], "test": []}
    for index, task in enumerate(tasks):
        split = "test" if task.instance_id in test_ids else "train"
        rows[split].append(task_row(task, index, split))
    _write_parquet(rows["train"], paths.train_parquet)
    _write_parquet(rows["test"], paths.test_parquet)
    return paths
