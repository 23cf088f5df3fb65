"""`python -m reward.evaluate` on real task repositories: SWE-bench formats, bad input, parallel grading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from test_grading import new_file_patch

ROOT = Path(__file__).resolve().parents[2]

HANG = "import time\n\ndef test_hang():\n    time.sleep(300)\n"


def _binary_patch(task) -> str:
    """A real ``git diff --binary`` adding a small binary file."""
    from reward.hacks import make_patch

    return make_patch(task, {"calc/blob.bin": bytes(range(256))})


def test_cli_grades_good_and_bad_input(calc_task, tmp_path):
    tasks = {f"calc-{n}": calc_task.model_copy(update={"instance_id": f"calc-{n}"}) for n in range(1, 8)}
    tasks["calc-hang"] = calc_task.model_copy(update={
        "instance_id": "calc-hang",
        "test_patch": calc_task.test_patch + new_file_patch("tests/test_hang.py", HANG),
        "FAIL_TO_PASS": ["tests/test_hang.py::test_hang"],
    })
    instances = tmp_path / "tasks.jsonl"
    lines = [t.model_dump_json() for t in tasks.values()]
    lines.insert(3, '{"instance_id": "broken-task"}')  # line 4: missing required fields
    instances.write_text("\n".join(lines) + "\n")

    ref = calc_task.patch
    big = ref + new_file_patch("calc/data.py", "x = 1\n" * 2000)
    preds = [
        {"instance_id": "calc-1", "model_name_or_path": "m", "model_patch": ref},
        {"instance_id": "calc-2", "model_name_or_path": "m", "model_patch": ""},
        {"instance_id": "calc-3", "model_name_or_path": "m", "model_patch": ref.replace("for value in", "for item in")},
        {"instance_id": "calc-4", "model_name_or_path": "m", "model_patch": ref + _binary_patch(calc_task)},
        {"instance_id": "calc-5", "model_name_or_path": "m", "model_patch": big},
        {"instance_id": "calc-6", "model_name_or_path": "m", "model_patch": new_file_patch("../escape.py", "x = 1\n")},
        {"instance_id": "calc-7", "model_name_or_path": "m", "model_patch": None},
        {"instance_id": "calc-hang", "model_name_or_path": "m", "model_patch": ref},
        {"instance_id": "nope-1", "model_name_or_path": "m", "model_patch": ref},
        {"instance_id": "calc-1", "model_name_or_path": "m", "model_patch": ""},
    ]
    pred_lines = [json.dumps(p) for p in preds]
    pred_lines.insert(2, '{"instance_id": "calc-9", "model_patch": ')  # line 3: truncated JSON
    predictions = tmp_path / "preds.jsonl"
    predictions.write_text("\n".join(pred_lines) + "\n")
    out = tmp_path / "out" / "report.json"
    work = tmp_path / "work"
    work.mkdir()

    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    proc = subprocess.run(
        [sys.executable, "-m", "reward.evaluate", "--instances", str(instances), "--predictions", str(predictions),
         "--out", str(out), "--max-workers", "2", "--timeout", "4", "--max-patch-bytes", "5000",
         "--work-root", str(work)],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    inst = report["instances"]
    errors = {k: v["error_class"] for k, v in inst.items()}
    assert errors == {
        "calc-1": None, "calc-2": "empty_patch", "calc-3": "patch_apply_failed", "calc-4": "binary_patch",
        "calc-5": "patch_too_large", "calc-6": "path_outside_repo", "calc-7": "empty_patch", "calc-hang": "timeout",
    }
    assert inst["calc-1"]["resolved"] and inst["calc-1"]["reward"] == 1.0
    assert inst["calc-1"]["patch_successfully_applied"] and inst["calc-1"]["patch_exists"]
    assert sorted(inst["calc-1"]["tests_status"]["FAIL_TO_PASS"]["success"]) == sorted(calc_task.FAIL_TO_PASS)
    assert inst["calc-7"]["patch_is_None"] and not inst["calc-2"]["patch_is_None"]
    assert all(v["reward"] == 0.0 and not v["resolved"] for k, v in inst.items() if k != "calc-1")
    # calc-hang: the fix applied, the hidden suite hung and was killed.
    assert inst["calc-hang"]["patch_successfully_applied"] and "killed after 4 s" in inst["calc-hang"]["log_tail"]

    input_errors = [(e["error_class"], e["line"]) for e in report["input_errors"]]
    assert input_errors == [("malformed_instance", 4), ("malformed_prediction", 3), ("unknown_instance", 10),
                            ("duplicate_prediction", 11)]
    assert all(e["reward"] == 0.0 for e in report["input_errors"])

    summary = report["summary"]
    assert summary["total_instances"] == 8 and summary["submitted_instances"] == 8
    assert summary["resolved_ids"] == ["calc-1"] and summary["completed_ids"] == ["calc-1"]
    assert summary["empty_patch_ids"] == ["calc-2", "calc-7"]
    assert summary["error_ids"] == ["calc-3", "calc-4", "calc-5", "calc-6", "calc-hang"]
    assert summary["error_classes"]["duplicate_prediction"] == 1
    assert "Instances resolved: 1" in proc.stdout and "Input errors: 4" in proc.stdout
    assert "evaluating" in proc.stderr  # tqdm progress bar
    assert list(work.iterdir()) == []  # every temporary copy removed


def test_cli_unreadable_input(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "reward.evaluate", "--instances", str(tmp_path / "missing.jsonl"),
         "--predictions", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "r.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2 and "cannot read input" in proc.stderr
