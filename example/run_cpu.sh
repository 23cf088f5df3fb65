#!/usr/bin/env bash
# GRPO on CPU through verl's own trainer (python -m recipe.train profile=cpu): SWEAgentLoop rollouts
# (mini-swe-agent subprocesses, the ModelProxy, sandboxes, hidden-test rewards), the `hf` rollout
# server (transformers, continuous batching), an FSDP2 actor over gloo, validation, checkpoints,
# console + tensorboard + metrics.jsonl logs, then the per-step table.
#   bash example/run_cpu.sh                         # SmolLM2-135M-Instruct, 5 steps on simple tasks
#   MODEL=tiny bash example/run_cpu.sh              # the tiny random model: a plumbing check, ~40 s a step
#   MODEL=/path/to/hf_model bash example/run_cpu.sh # any local causal LM with a chat template
#   bash example/run_cpu.sh trainer.total_training_steps=10 actor_rollout_ref.rollout.n=4   # Hydra overrides
# Run it again with the same OUT to resume from the last checkpoint.
# The GPU script (example/run_qwen2.5_3b.sh) uses the same configs/swe_agent_trainer.yaml; the CPU
# profile (configs/profile/cpu.yaml) changes only the platform, rollout backend, model and sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
bash example/install.sh
PY=.venv/bin/python
DATA=${DATA:-data/simple}
MODEL=${MODEL:-smollm2}
OUT=${OUT:-outputs/train_cpu_$(basename "$MODEL")}

[ -f "$DATA/train.parquet" ] || $PY prepare/prepare_data.py --mode simple --out "$DATA"
extra=()
case "$MODEL" in
  tiny)
    MODEL_DIR=outputs/tiny_model
    [ -f "$MODEL_DIR/config.json" ] || $PY -m prepare.tiny_model "$MODEL_DIR" >/dev/null ;;
  smollm2)
    MODEL_DIR=outputs/smollm2
    $PY -m prepare.smollm2 "$MODEL_DIR" >/dev/null
    # model_type llama, ChatML template: verl's generic token builder would drift (model_proxy/token_check.py).
    extra+=(swe_agent.proxy.token_builder=qwen) ;;
  *) MODEL_DIR=$MODEL ;;
esac
case "$MODEL_DIR" in /*) ;; *) MODEL_DIR=$ROOT/$MODEL_DIR ;; esac
case "$OUT" in /*) ;; *) OUT=$ROOT/$OUT ;; esac
case "$DATA" in /*) ;; *) DATA=$ROOT/$DATA ;; esac

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
$PY -m recipe.train profile=cpu \
  data.train_files="$DATA/train.parquet" data.val_files="$DATA/test.parquet" \
  actor_rollout_ref.model.path="$MODEL_DIR" trainer.default_local_dir="$OUT" \
  ${extra[@]+"${extra[@]}"} "$@"

echo
echo "== per-step metrics ($OUT/metrics.jsonl; tensorboard: $OUT/tensorboard; rollouts: $OUT/trajectories) =="
$PY -m recipe.metrics --trainer-log "$OUT/metrics.jsonl"
