#!/usr/bin/env bash
# The main job on CPU, end to end: install, generate tasks, then run SWEAgentLoop rollouts
# (mini-swe-agent subprocess -> ModelProxy -> backend -> patch -> hidden-test reward) three ways:
#   1. policy=reference: scripted replay of each task's reference patch (harness check; expect 100%)
#   2. policy=empty:     submits nothing (harness check; expect 0%)
#   3. policy=model:     a tiny random Qwen2 built locally (exact tokens/mask/logprobs end to end)
# then the same harness checks (1, 2) on a sample of real tasks: bugs injected into two small
# PyPI packages (prepare_data.py --mode smith; needs PyPI for the sdists and their venvs),
# and last a short GRPO run through verl's own trainer on CPU (example/run_cpu.sh with the tiny
# model, 2 steps) that prints its per-step table.
# Extra arguments are passed to every rollout run (e.g. concurrency=2).
set -euo pipefail
cd "$(dirname "$0")/.."
bash example/install.sh
PY=.venv/bin/python
DATA=${DATA:-data/simple}
SMITH=${SMITH:-data/smith_sample}
OUT=${OUT:-outputs/quickstart}

$PY prepare/prepare_data.py --mode simple --out "$DATA"
$PY -m prepare.tiny_model "$OUT/tiny_model"

ALL="$DATA/train.parquet,$DATA/test.parquet"
$PY -m recipe.rollout data="$ALL" policy=reference model_path="$OUT/tiny_model" out_dir="$OUT/reference" "$@"
$PY -m recipe.rollout data="$ALL" policy=empty model_path="$OUT/tiny_model" out_dir="$OUT/empty" "$@"
$PY -m recipe.rollout data="$DATA/test.parquet" policy=model model_path="$OUT/tiny_model" \
    out_dir="$OUT/tiny_model_run" "$@"

# Real packages: a few verified tasks each from two small libraries (resumes if run before).
$PY prepare/prepare_data.py --mode smith --packages inflection,six --max-tasks-per-package 3 --out "$SMITH"
SMITH_ALL="$SMITH/train.parquet,$SMITH/test.parquet"
$PY -m recipe.rollout data="$SMITH_ALL" policy=reference model_path="$OUT/tiny_model" out_dir="$OUT/smith_reference" "$@"
$PY -m recipe.rollout data="$SMITH_ALL" policy=empty model_path="$OUT/tiny_model" out_dir="$OUT/smith_empty" "$@"

echo
echo "== summary =="
for run in reference empty tiny_model_run smith_reference smith_empty; do
  $PY - "$OUT/$run/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
a = s["all"]
print(f"{sys.argv[1].split('/')[-2]:>16} {s['policy']:>10}: {a['resolved']}/{a['n']} resolved ({100 * a['resolved_rate']:.1f}%), "
      f"exit statuses {a['exit_status']}, mean turns {a['mean_turns']:.1f}, "
      f"llm {a['mean_generation_s']:.2f}s / tools {a['mean_tool_s']:.2f}s per rollout")
PY
done
echo "trajectories, predictions and summaries: $OUT/"

echo
echo "== GRPO on CPU: verl's trainer, tiny model, 2 steps =="
MODEL=tiny DATA="$DATA" OUT="$OUT/train_cpu" bash example/run_cpu.sh \
  trainer.total_training_steps=2 trainer.val_before_train=false
