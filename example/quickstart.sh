#!/usr/bin/env bash
# The main job on CPU, end to end: install, generate tasks, then run SWEAgentLoop rollouts
# (mini-swe-agent subprocess -> ModelProxy -> backend -> patch -> hidden-test reward) three ways:
#   1. policy=reference: scripted replay of each task's reference patch (harness check; expect 100%)
#   2. policy=empty:     submits nothing (harness check; expect 0%)
#   3. policy=model:     a tiny random Qwen2 built locally (exact tokens/mask/logprobs end to end)
# Extra arguments are passed to every rollout run (e.g. concurrency=2).
set -euo pipefail
cd "$(dirname "$0")/.."
bash example/install.sh
PY=.venv/bin/python
DATA=${DATA:-data/simple}
OUT=${OUT:-outputs/quickstart}

$PY prepare/prepare_data.py --mode simple --out "$DATA"
$PY -m prepare.tiny_model "$OUT/tiny_model"

ALL="$DATA/train.parquet,$DATA/test.parquet"
$PY -m recipe.rollout data="$ALL" policy=reference model_path="$OUT/tiny_model" out_dir="$OUT/reference" "$@"
$PY -m recipe.rollout data="$ALL" policy=empty model_path="$OUT/tiny_model" out_dir="$OUT/empty" "$@"
$PY -m recipe.rollout data="$DATA/test.parquet" policy=model model_path="$OUT/tiny_model" \
    out_dir="$OUT/tiny_model_run" "$@"

echo
echo "== summary =="
for run in reference empty tiny_model_run; do
  $PY - "$OUT/$run/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
a = s["all"]
print(f"{s['policy']:>10}: {a['resolved']}/{a['n']} resolved ({100 * a['resolved_rate']:.1f}%), "
      f"exit statuses {a['exit_status']}, mean turns {a['mean_turns']:.1f}, "
      f"llm {a['mean_generation_s']:.2f}s / tools {a['mean_tool_s']:.2f}s per rollout")
PY
done
echo "trajectories, predictions and summaries: $OUT/"
