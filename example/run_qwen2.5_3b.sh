#!/usr/bin/env bash
# GRPO training of Qwen2.5-3B-Instruct as a mini-swe-agent policy with verl + vLLM async rollout.
#   python prepare/prepare_data.py --mode simple      # once: tasks -> data/simple/*.parquet
#   bash example/run_qwen2.5_3b.sh                    # train (GPUs)
#   bash example/run_qwen2.5_3b.sh trainer.total_epochs=2 trainer.n_gpus_per_node=4   # any Hydra override
# Environment: MODEL_PATH, DATA_DIR, N_GPUS override the defaults below.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

MODEL_PATH=${MODEL_PATH:-Qwen/Qwen2.5-3B-Instruct}
DATA_DIR=${DATA_DIR:-$ROOT/data/simple}
N_GPUS=${N_GPUS:-8}
PY=${PY:-python3}
[ -x "$ROOT/.venv/bin/python" ] && PY="$ROOT/.venv/bin/python"

# Multi-turn agent trajectories: the first prompt is mini-swe-agent's system + task
# message (~1.5k tokens for Qwen); the response holds every later turn, tool outputs included.
PROMPT_LEN=${PROMPT_LEN:-4096}
RESPONSE_LEN=${RESPONSE_LEN:-28672}

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m verl.trainer.main_ppo \
    algorithm.adv_estimator=grpo \
    algorithm.use_kl_in_reward=false \
    data.train_files="$DATA_DIR/train.parquet" \
    data.val_files="$DATA_DIR/test.parquet" \
    data.train_batch_size=32 \
    data.max_prompt_length=$PROMPT_LEN \
    data.max_response_length=$RESPONSE_LEN \
    data.filter_overlong_prompts=true \
    data.truncation=error \
    data.return_raw_chat=true \
    actor_rollout_ref.model.path="$MODEL_PATH" \
    actor_rollout_ref.model.use_remove_padding=true \
    actor_rollout_ref.model.enable_gradient_checkpointing=true \
    actor_rollout_ref.actor.optim.lr=1e-6 \
    actor_rollout_ref.actor.ppo_mini_batch_size=16 \
    actor_rollout_ref.actor.use_dynamic_bsz=true \
    actor_rollout_ref.actor.ppo_max_token_len_per_gpu=$((PROMPT_LEN + RESPONSE_LEN)) \
    actor_rollout_ref.actor.use_kl_loss=true \
    actor_rollout_ref.actor.kl_loss_coef=0.001 \
    actor_rollout_ref.actor.kl_loss_type=low_var_kl \
    actor_rollout_ref.actor.entropy_coeff=0 \
    actor_rollout_ref.actor.loss_agg_mode=token-mean \
    actor_rollout_ref.actor.fsdp_config.param_offload=true \
    actor_rollout_ref.actor.fsdp_config.optimizer_offload=true \
    actor_rollout_ref.rollout.name=vllm \
    actor_rollout_ref.rollout.mode=async \
    actor_rollout_ref.rollout.n=8 \
    actor_rollout_ref.rollout.temperature=1.0 \
    actor_rollout_ref.rollout.tensor_model_parallel_size=1 \
    actor_rollout_ref.rollout.gpu_memory_utilization=0.6 \
    actor_rollout_ref.rollout.calculate_log_probs=true \
    actor_rollout_ref.rollout.multi_turn.format=hermes \
    actor_rollout_ref.rollout.agent.num_workers=8 \
    actor_rollout_ref.rollout.agent.default_agent_loop=swe_agent \
    actor_rollout_ref.rollout.agent.agent_loop_config_path="$ROOT/configs/agent_loop.yaml" \
    actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=true \
    actor_rollout_ref.ref.log_prob_use_dynamic_bsz=true \
    actor_rollout_ref.ref.fsdp_config.param_offload=true \
    reward.custom_reward_function.path="$ROOT/reward/compute_score.py" \
    reward.custom_reward_function.name=compute_score \
    trainer.logger='["console","tensorboard"]' \
    trainer.project_name=swe_agent_rl \
    trainer.experiment_name=qwen2.5_3b_grpo_simple \
    trainer.n_gpus_per_node=$N_GPUS \
    trainer.nnodes=1 \
    trainer.val_before_train=true \
    trainer.test_freq=5 \
    trainer.save_freq=20 \
    trainer.total_epochs=15 \
    "$@"
