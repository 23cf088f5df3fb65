"""Evaluate model patches on tasks, SWE-bench style, without Docker.

Usage (from the repository root):

    python -m reward.evaluate --instances tasks.jsonl --predictions preds.jsonl --out report.json
        [--max-workers 4] [--timeout 300] [--variant binary|partial|similarity]
        [--max-patch-bytes N] [--network auto|unshare|env] [--work-root DIR] [--no-progress]

Inputs follow SWE-bench: instances are task records (``core.task.SWETask``,
JSONL or a JSON list; FAIL_TO_PASS/PASS_TO_PASS as lists or JSON strings) with
``repo_path`` pointing at a local git repository, or image tasks (``image_name``, no
``repo_path``; graded in a fresh container of the image, ``reward.container``, on the
engine ``DOCKER_HOST`` names); predictions carry
``instance_id``, ``model_name_or_path`` and ``model_patch`` (JSONL, a JSON list,
or a JSON object keyed by instance id, as ``swebench.harness.run_evaluation``
accepts).

Bad input never stops the run: a malformed line (``malformed_prediction`` /
``malformed_instance``, with its line number), a prediction for an unknown
instance (``unknown_instance``), a second prediction for the same instance
(``duplicate_prediction``; the first one is graded) are recorded in
``input_errors`` with reward 0; a patch that cannot be graded gets its error
class (``reward.grading.ERROR_CLASSES``) and reward 0.

Output: ``--out`` gets ``{"summary": ..., "instances": {id: ...}, "input_errors": [...]}``;
``summary`` has the keys of SWE-bench's run report (``total_instances``,
``submitted_instances``, ``completed_instances``, ``resolved_instances``,
``unresolved_instances``, ``empty_patch_instances``, ``error_instances`` and
the id lists) plus ``error_classes`` counts and ``mean_reward``; each instance
has SWE-bench's per-instance report keys (``patch_is_None``, ``patch_exists``,
``patch_successfully_applied``, ``resolved``, ``tests_status``) plus
``error_class``, ``reward`` and ``removed_files``. The totals go to stdout, a
progress bar to stderr. Exit status 0, or 2 when an input file cannot be read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from tqdm import tqdm

from core.task import SWETask
from reward.config import (
    BACKENDS,
    DEFAULT_GRADE_TIMEOUT_S,
    DEFAULT_MAX_PATCH_BYTES,
    NETWORK_MODES,
    VARIANTS,
    RewardConfig,
)
from reward.grader import Grader
from reward.grading import GradeResult

REPORT_SCHEMA_VERSION = 2


class Prediction(BaseModel):
    """One SWE-bench prediction. ``model_patch`` None means the model produced none."""

    model_config = ConfigDict(extra="ignore")

    instance_id: str
    model_name_or_path: str = ""
    model_patch: str | None = None


@dataclass
class InputError:
    """A record that could not be graded: ``error_class``, where (1-based line or item number), why."""

    error_class: str
    line: int | None
    message: str
    instance_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"error_class": self.error_class, "line": self.line, "instance_id": self.instance_id,
                "message": self.message, "reward": 0.0}


@dataclass
class Inputs:
    """Parsed inputs: tasks by id, predictions to grade (first per id), and the input errors."""

    tasks: dict[str, SWETask] = field(default_factory=dict)
    predictions: list[Prediction] = field(default_factory=list)
    errors: list[InputError] = field(default_factory=list)


def _records(path: Path) -> list[tuple[int, Any]]:
    """``(line or item number, decoded JSON or the raw text on a JSON error)`` for a JSONL/JSON file.

    Raises:
        OSError: the file cannot be read.
    """
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            return [(exc.lineno, ValueError(f"invalid JSON: {exc}"))]
        if isinstance(data, dict):  # {instance_id: prediction}
            data = [{"instance_id": key, **value} if isinstance(value, dict) else value for key, value in data.items()]
        if not isinstance(data, list):
            return [(1, ValueError("expected a JSON list or object"))]
        return list(enumerate(data, start=1))
    out: list[tuple[int, Any]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((lineno, json.loads(line)))
        except json.JSONDecodeError as exc:
            out.append((lineno, ValueError(f"invalid JSON: {exc}")))
    return out


def _validated(path: Path, model: type, error_class: str, errors: list) -> Iterator[tuple[int, Any]]:
    """``(line or item number, model instance)`` per valid record of ``path``; each invalid one is
    appended to ``errors`` as an ``InputError(error_class, ...)`` naming the file and line."""
    for lineno, record in _records(path):
        try:
            if isinstance(record, Exception):
                raise record
            item = model.model_validate(record)
        except (ValueError, ValidationError) as exc:
            errors.append(InputError(error_class, lineno, f"{path}:{lineno}: {exc}"))
            continue
        yield lineno, item


def read_inputs(instances_path: Path, predictions_path: Path) -> Inputs:
    """Parse both files, recording every bad record as an ``InputError`` (see the module docstring).

    Raises:
        OSError: a file cannot be read.
    """
    inputs = Inputs()
    for _, task in _validated(instances_path, SWETask, "malformed_instance", inputs.errors):
        inputs.tasks.setdefault(task.instance_id, task)
    seen: dict[str, int] = {}
    for lineno, prediction in _validated(predictions_path, Prediction, "malformed_prediction", inputs.errors):
        iid = prediction.instance_id
        if iid not in inputs.tasks:
            inputs.errors.append(InputError("unknown_instance", lineno, f"no instance {iid!r} in {instances_path}", iid))
        elif iid in seen:
            inputs.errors.append(
                InputError("duplicate_prediction", lineno, f"second prediction for {iid!r} (first on {seen[iid]})", iid)
            )
        else:
            seen[iid] = lineno
            inputs.predictions.append(prediction)
    return inputs


def instance_report(prediction: Prediction, result: GradeResult) -> dict[str, Any]:
    """SWE-bench's per-instance report for one grade, plus our error class and reward."""
    return {
        "model_name_or_path": prediction.model_name_or_path,
        "patch_is_None": prediction.model_patch is None,
        "patch_exists": bool((prediction.model_patch or "").strip()),
        "patch_successfully_applied": result.patch_applied,
        "resolved": result.resolved,
        "tests_status": result.tests,
        "error_class": result.error,
        "reward": result.reward,
        "removed_files": result.removed_test_files,
        "f2p_pass_fraction": result.f2p_pass_fraction,
        "duration_s": round(result.duration_s, 3),
        "log_tail": result.log_tail if result.error else "",
    }


def summarize(inputs: Inputs, reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """SWE-bench's run-report totals and id lists (``swebench/harness/reporting.py``), plus error counts."""
    submitted = sorted({p.instance_id for p in inputs.predictions})
    empty = sorted(i for i, r in reports.items() if r["error_class"] == "empty_patch")
    errors = sorted(i for i, r in reports.items() if r["error_class"] not in (None, "empty_patch"))
    completed = sorted(i for i, r in reports.items() if r["error_class"] is None)
    resolved = sorted(i for i in completed if reports[i]["resolved"])
    unresolved = sorted(i for i in completed if not reports[i]["resolved"])
    classes = Counter(r["error_class"] for r in reports.values() if r["error_class"])
    classes.update(e.error_class for e in inputs.errors)
    rewards = [r["reward"] for r in reports.values()] + [0.0] * len(inputs.errors)
    return {
        "total_instances": len(inputs.tasks),
        "submitted_instances": len(submitted),
        "completed_instances": len(completed),
        "resolved_instances": len(resolved),
        "unresolved_instances": len(unresolved),
        "empty_patch_instances": len(empty),
        "error_instances": len(errors),
        "input_errors": len(inputs.errors),
        "error_classes": dict(sorted(classes.items())),
        "mean_reward": sum(rewards) / len(rewards) if rewards else 0.0,
        "completed_ids": completed,
        "incomplete_ids": sorted(set(inputs.tasks) - set(submitted)),
        "empty_patch_ids": empty,
        "submitted_ids": submitted,
        "resolved_ids": resolved,
        "unresolved_ids": unresolved,
        "error_ids": errors,
        "schema_version": REPORT_SCHEMA_VERSION,
    }


async def evaluate(
    inputs: Inputs, config: RewardConfig, *, max_workers: int = 4, work_root: str | None = None, progress: bool = True
) -> dict[str, Any]:
    """Grade every prediction in ``inputs``, at most ``max_workers`` at once; returns the full report dict.

    A grader crash on one instance is recorded for it (``error_class`` "grader_crash") and the rest go on.
    """
    grader = Grader(config=config, use_cache=False, work_root=work_root)
    semaphore = asyncio.Semaphore(max(1, max_workers))
    bar = tqdm(total=len(inputs.predictions), desc="evaluating", unit="instance", file=sys.stderr,
               disable=not progress)
    reports: dict[str, dict[str, Any]] = {}

    async def one(prediction: Prediction) -> None:
        task = inputs.tasks[prediction.instance_id]
        async with semaphore:
            try:
                result = await grader.grade(task, prediction.model_patch or "", skip_empty=True)
            except Exception as exc:  # noqa: BLE001 - one broken instance must not stop the run
                result = GradeResult(instance_id=task.instance_id, variant=config.variant)
                result.error, result.log_tail = "grader_crash", f"{type(exc).__name__}: {exc}"  # type: ignore[assignment]
        reports[prediction.instance_id] = instance_report(prediction, result)
        bar.update(1)
        bar.set_postfix(resolved=sum(r["resolved"] for r in reports.values()))

    try:
        await asyncio.gather(*(one(p) for p in inputs.predictions))
    finally:
        bar.close()
    ordered = {p.instance_id: reports[p.instance_id] for p in inputs.predictions}
    return {
        "summary": summarize(inputs, ordered),
        "config": {"variant": config.variant, "timeout_s": config.timeout_s,
                   "max_patch_bytes": config.max_patch_bytes, "network": grader.network.effective},
        "instances": ordered,
        "input_errors": [e.to_dict() for e in inputs.errors],
    }


def format_totals(summary: dict[str, Any]) -> str:
    """The human-readable totals printed on stdout."""
    lines = [
        f"Total instances: {summary['total_instances']}",
        f"Instances submitted: {summary['submitted_instances']}",
        f"Instances completed: {summary['completed_instances']}",
        f"Instances resolved: {summary['resolved_instances']}",
        f"Instances unresolved: {summary['unresolved_instances']}",
        f"Instances with empty patches: {summary['empty_patch_instances']}",
        f"Instances with errors: {summary['error_instances']}",
        f"Input errors: {summary['input_errors']}",
        f"Mean reward: {summary['mean_reward']:.4f}",
    ]
    if summary["error_classes"]:
        lines.append("Error classes: " + ", ".join(f"{k}={v}" for k, v in summary["error_classes"].items()))
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring); exits with status 2 on bad values."""
    parser = argparse.ArgumentParser(prog="python -m reward.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", required=True, help="tasks (SWE-bench instances), JSONL or JSON")
    parser.add_argument("--predictions", required=True, help="predictions (instance_id, model_name_or_path, model_patch)")
    parser.add_argument("--out", required=True, help="where to write the JSON report")
    parser.add_argument("--max-workers", type=int, default=4, help="grades in flight at once (default 4)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per instance's test run (default 300)")
    parser.add_argument("--variant", choices=VARIANTS, default="binary", help="reward variant (default binary)")
    parser.add_argument("--max-patch-bytes", type=int, default=DEFAULT_MAX_PATCH_BYTES,
                        help=f"reject larger patches (default {DEFAULT_MAX_PATCH_BYTES})")
    parser.add_argument("--network", choices=NETWORK_MODES, default="auto", help="test-run network isolation")
    parser.add_argument("--work-root", default=None, help="directory for temporary repository copies")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="where test runs run: auto (containers for image tasks), local, docker")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    if args.max_workers < 1:
        parser.error("--max-workers must be >= 1")
    if args.timeout <= 0 or args.max_patch_bytes <= 0:
        parser.error("--timeout and --max-patch-bytes must be > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    args = parse_args(argv)
    try:
        inputs = read_inputs(Path(args.instances), Path(args.predictions))
    except OSError as exc:
        print(f"error: cannot read input: {exc}", file=sys.stderr)
        return 2
    # The whole-grade limit leaves the test run its full --timeout plus room for the copy and git.
    config = RewardConfig(variant=args.variant, timeout_s=args.timeout, max_patch_bytes=args.max_patch_bytes,
                          backend=args.backend,
                          network=args.network, grade_timeout_s=max(DEFAULT_GRADE_TIMEOUT_S, args.timeout + 300.0),
                          fail_fast=False)  # the report lists every test's outcome
    report = asyncio.run(evaluate(inputs, config, max_workers=args.max_workers, work_root=args.work_root,
                                  progress=not args.no_progress))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(format_totals(report["summary"]))
    print(f"Report written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
