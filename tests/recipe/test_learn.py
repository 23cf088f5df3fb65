"""The learning pipeline's stages (example/learn_cpu.sh), each producing what the next consumes.

Real parts throughout: the expert policy's edits run in real git checkouts; expert rollouts go
through mini-swe-agent, the proxy, sandboxes and the hidden-test grader (``recipe.rollout``);
the warm start is verl's own SFT trainer on the CPU platform; the reduced configuration of the
whole script (``LEARN_SCALE=ci``: the tiny local model, one GRPO step) runs end to end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from core.task import load_tasks
from model_proxy.backends.scripted import expert_steps
from recipe.learn import expert as expert_cli
from recipe.learn.report import figures, parsed_actions, stage_times
from recipe.learn.sft import final_hf_model
from recipe.trajectory import load_records

ROOT = Path(__file__).resolve().parents[2]


def _checkout(task, dest: Path) -> Path:
    subprocess.run(["git", "clone", "-q", task.repo_path, str(dest)], check=True)
    subprocess.run(["git", "checkout", "-q", task.base_commit], cwd=dest, check=True)
    return dest


def _tree(path: Path) -> dict[str, str]:
    files = subprocess.run(["git", "ls-files"], cwd=path, check=True, capture_output=True, text=True).stdout.split()
    return {f: (path / f).read_text() for f in files}


def test_expert_edits_make_the_reference_fix_in_every_simple_task(simple_tasks_dir, tmp_path):
    tasks = load_tasks(str(simple_tasks_dir / "tasks.jsonl"))
    assert tasks
    for task in tasks:
        steps = expert_steps(task)
        edits = [s.command for s in steps if s.command.startswith("python3 - <<'EOF'")]
        assert edits, task.instance_id
        # Readable: the old text is copied from the file, not an encoded blob.
        assert all("base64" not in s.command for s in steps)
        ours = _checkout(task, tmp_path / f"{task.instance_id}-expert")
        for command in edits:
            subprocess.run(["bash", "-c", command], cwd=ours, check=True, capture_output=True)
        gold = _checkout(task, tmp_path / f"{task.instance_id}-gold")
        subprocess.run(["git", "apply", "-"], cwd=gold, input=task.patch, text=True, check=True)
        assert _tree(ours) == _tree(gold), task.instance_id


def test_an_edit_whose_text_is_not_in_the_file_fails_loudly(simple_tasks_dir, tmp_path):
    task = load_tasks(str(simple_tasks_dir / "tasks.jsonl"))[0]
    edit = next(s.command for s in expert_steps(task) if s.command.startswith("python3 - <<'EOF'"))
    tree = _checkout(task, tmp_path / "t")
    subprocess.run(["git", "apply", "-"], cwd=tree, input=task.patch, text=True, check=True)  # already fixed
    proc = subprocess.run(["bash", "-c", edit], cwd=tree, capture_output=True, text=True)
    assert proc.returncode != 0 and "found 0 times" in proc.stderr


@pytest.fixture(scope="module")
def expert_out(simple_tasks_dir, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("expert")
    rc = expert_cli.main(["--data", str(simple_tasks_dir / "train.parquet"), "--out", str(out),
                          "--model-path", str(tiny_model_dir), "--set", "limit=3"])
    assert rc == 0
    return out


@pytest.mark.slow
def test_expert_rollouts_become_verl_multiturn_sft_rows(expert_out):
    records = load_records(expert_out)
    assert len(records) == 3 and all(r.resolved for r in records)
    rows = pq.read_table(expert_out / "sft.parquet").to_pylist()
    assert len(rows) == 3
    for row, record in zip(sorted(rows, key=lambda r: r["instance_id"]), sorted(records, key=lambda r: r.instance_id)):
        roles = [m["role"] for m in row["messages"]]
        assert roles[0] == "system" and roles[1] == "user" and roles[-1] == "assistant"
        assert set(roles) == {"system", "user", "assistant"}
        # Every assistant turn is one parseable text-mode action.
        turns, parsed = parsed_actions(record)
        assert turns == roles.count("assistant") == parsed
    # Unresolved trajectories never become SFT rows.
    unresolved = records[0].model_copy(update={"resolved": False})
    selection = expert_cli.sft_rows([unresolved, *records[1:]])
    assert selection.kept == 2 and selection.unresolved == [unresolved.instance_id]


@pytest.mark.slow
def test_verl_sft_trainer_warm_starts_a_loadable_model_with_loss_on_assistant_turns(expert_out, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from verl.utils.dataset.multiturn_sft_dataset import MultiTurnSFTDataset

    from recipe.learn.sft import compose

    cfg = compose([f"data.train_files={expert_out / 'sft.parquet'}", f"model.path={tiny_model_dir}"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    item = MultiTurnSFTDataset(parquet_files=str(expert_out / "sft.parquet"), tokenizer=tokenizer, config=cfg.data)[0]
    trained = tokenizer.decode(item["input_ids"][item["loss_mask"].bool()])
    # Loss on the assistant's actions, never on the task text or the tool observations.
    assert "mswea_bash_command" in trained and "git ls-files" in trained
    assert "Please solve this issue" not in trained and "<returncode>" not in trained

    ckpt = tmp_path / "ckpt"
    env = dict(os.environ, VERL_FILE_LOGGER_PATH=str(tmp_path / "sft_metrics.jsonl"))
    proc = subprocess.run(
        [sys.executable, "-m", "recipe.learn.sft", f"data.train_files={expert_out / 'sft.parquet'}",
         f"model.path={tiny_model_dir}", f"trainer.default_local_dir={ckpt}", "trainer.total_epochs=2",
         "data.train_batch_size=1", "optim.lr=1e-3"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    losses = [json.loads(line)["data"]["train/loss"] for line in (tmp_path / "sft_metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and losses[-1] < losses[0]
    hf = final_hf_model(ckpt)
    model = AutoModelForCausalLM.from_pretrained(hf)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = [n for n, p in model.state_dict().items() if not p.equal(base.state_dict()[n])]
    assert changed, "the warm start did not change the weights"
    assert AutoTokenizer.from_pretrained(hf).eos_token == tokenizer.eos_token


def test_a_misspelt_sft_key_fails_with_its_name(tiny_model_dir):
    from omegaconf.errors import ConfigKeyError

    from recipe.learn.sft import compose

    with pytest.raises(ConfigKeyError, match="total_epoch"):
        compose(["trainer.total_epoch=2"])


def test_report_counts_format_errors_per_assistant_turn(expert_out):
    records = load_records(expert_out)
    broken = records[0].model_copy(update={"messages": [
        {"role": "system", "content": "s"}, {"role": "user", "content": "task"},
        {"role": "assistant", "content": "```bash\nls\n```"},  # the untrained model's habit
        {"role": "user", "content": "format error"},
        {"role": "assistant", "content": "THOUGHT: x\n\n```mswea_bash_command\nls\n```"},
    ], "resolved": False, "exit_status": "agent_error", "agent_exit_status": "RepeatedFormatError"})
    fig = figures("base", [broken])
    assert (fig.assistant_turns, fig.format_errors, fig.parsed_action_rate, fig.resolved_rate) == (2, 1, 0.5, 0.0)
    # Why the agent stopped is kept next to the exit status: here, mini-swe-agent gave up on the format.
    assert fig.exit_status == {"agent_error (RepeatedFormatError)": 1}


def test_stage_times_split_the_log_into_runs_and_time_each_stage(tmp_path):
    log = tmp_path / "stages.tsv"
    log.write_text("100\t1/8 data (simple)\n160\t2/8 eval: the base model\n400\t3/8 expert\n"
                   "1000\t1/8 data (simple)\n1001\t2/8 eval: the base model\n")
    first, second = stage_times(log)
    assert first == {"started": 100, "stages": {"data": 60, "base eval": 240, "expert": None}, "total_s": 300,
                     "exit": None}
    assert second["stages"] == {"data": 1, "base eval": None}
    # The EXIT trap's line ends a run: the stage it died in is timed, and a later start is a new run.
    log.write_text("100\t1/8 data\n160\t6/8 GRPO from the warm start\n1660\texit 1\n"
                   "2000\t1/8 data\n2001\t8/8 report\n2031\texit 0\n")
    crashed, resumed = stage_times(log)
    assert crashed == {"started": 100, "stages": {"data": 60, "GRPO": 1500}, "total_s": 1560, "exit": 1}
    assert resumed == {"started": 2000, "stages": {"data": 1, "report": 30}, "total_s": 31, "exit": 0}
    log.write_text("100\t1/8 data\nnot a stage line\n")
    with pytest.raises(ValueError, match=r"stages.tsv:2"):
        stage_times(log)
    assert stage_times(tmp_path / "missing.tsv") == []


@pytest.mark.slow
def test_learn_script_reduced_configuration_runs_every_stage(simple_tasks_dir, tmp_path):
    out = tmp_path / "learn"
    env = dict(os.environ, LEARN_SCALE="ci", OUT=str(out), SIMPLE=str(simple_tasks_dir), RAY_DEDUP_LOGS="0")
    proc = subprocess.run(["bash", "example/learn_cpu.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1800)
    (tmp_path / "learn.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    for stage in ("base", "sft", "grpo"):
        assert json.loads((out / f"eval_{stage}" / "summary.json").read_text())["all"]["n"] == 2
    assert (out / "expert" / "sft.parquet").is_file()
    assert any(final_hf_model(out / "sft").glob("*.safetensors"))
    assert sorted(json.loads(l)["step"] for l in (out / "grpo" / "metrics.jsonl").read_text().splitlines()) == [1]
    report = json.loads((out / "report" / "learning_cpu.json").read_text())
    assert [s["stage"] for s in report["stages"]] == ["base model", "after SFT warm start", "after GRPO"]
    assert (out / "report" / "learning_cpu.png").stat().st_size > 0
    assert [list(run["stages"]) for run in report["script_runs"]] == [
        ["data", "base eval", "expert", "SFT", "SFT eval", "GRPO", "GRPO eval", "report"]]
    # Resumable: a second run finds every stage's output and redoes nothing.
    again = subprocess.run(["bash", "example/learn_cpu.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "rollouts (" not in again.stderr and "Epoch 1/" not in again.stderr
    assert [run["exit"] for run in stage_times(out / "stages.tsv")] == [0, 0]  # both runs are timed to their exit
