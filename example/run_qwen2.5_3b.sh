#!/usr/bin/env bash
# GRPO training of Qwen2.5-3B-Instruct as a mini-swe-agent policy with verl + vLLM async rollout.
#   python prepare/prepare_data.py --mode simple      # once: tasks -> data/simple/*.parquet
#   bash example/run_qwen2.5_3b.sh                    # train (8 GPUs)
#   bash example/run_qwen2.5_3b.sh trainer.total_epochs=2 trainer.n_gpus_per_node=4   # any Hydra override
#   bash example/run_qwen2.5_3b.sh --dry-run          # print the composed config; no Ray, no GPU
# Settings live in configs/swe_agent_trainer.yaml (verl's ppo_trainer + the swe_agent section);
# MODEL_PATH, DATA_DIR and N_GPUS are shortcuts for the overrides below.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PY:-python3}
[ -x "$ROOT/.venv/bin/python" ] && PY="$ROOT/.venv/bin/python"

args=()
[ -n "${MODEL_PATH:-}" ] && args+=("actor_rollout_ref.model.path=$MODEL_PATH")
[ -n "${DATA_DIR:-}" ] && args+=("data.train_files=$DATA_DIR/train.parquet" "data.val_files=$DATA_DIR/test.parquet")
[ -n "${N_GPUS:-}" ] && args+=("trainer.n_gpus_per_node=$N_GPUS")

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m recipe.train ${args[@]+"${args[@]}"} "$@"
