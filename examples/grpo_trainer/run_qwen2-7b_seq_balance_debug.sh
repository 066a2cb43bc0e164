#!/usr/bin/env bash
# A small, quick variant of run_qwen2-7b_seq_balance.sh (GRPO, dynamic batch sizes) for debugging a setup: a few
# steps on small batches, validation every step on a subset, and every rollout and validation generation dumped
# under DEBUG_DIR/{rollout,validation}: one {step}.jsonl per step (prompt and chat messages, response, ground truth,
# score, reward components, advantage, old/ref log-probs, lengths, uid) plus metrics.jsonl (each step's metrics).
# The format is documented in verl/utils/rollout_dump.py. Look at it with
#   VERL_DUMP_DIR=$DEBUG_DIR/rollout jupyter notebook notebooks/view_data.ipynb
#   python scripts/rollout_viewer.py $DEBUG_DIR/rollout --step 1 --sample 0
#
# Data: python examples/data_preprocess/gsm8k.py --local_dir ~/data/gsm8k
# Every setting below can be changed through the environment, e.g.
#   MODEL_PATH=~/models/Qwen2-0.5B-Instruct N_GPUS_PER_NODE=2 bash examples/grpo_trainer/run_qwen2-7b_seq_balance_debug.sh
# and extra Hydra overrides are passed through: ... run_qwen2-7b_seq_balance_debug.sh trainer.total_training_steps=3
set -xeuo pipefail

MODEL_PATH=${MODEL_PATH:-Qwen/Qwen2-7B-Instruct}
DATA_DIR=${DATA_DIR:-$HOME/data/gsm8k}
TRAIN_FILES=${TRAIN_FILES:-$DATA_DIR/train.parquet}
VAL_FILES=${VAL_FILES:-$DATA_DIR/test.parquet}
VAL_MAX_SAMPLES=${VAL_MAX_SAMPLES:-64}  # validate on a subset (-1: all)

NNODES=${NNODES:-1}
N_GPUS_PER_NODE=${N_GPUS_PER_NODE:-8}
ROLLOUT_NAME=${ROLLOUT_NAME:-vllm}  # hf | vllm | sglang
ROLLOUT_TP=${ROLLOUT_TP:-2}
GPU_MEMORY_UTILIZATION=${GPU_MEMORY_UTILIZATION:-0.6}
ROLLOUT_N=${ROLLOUT_N:-4}

TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-16}
PPO_MINI_BATCH_SIZE=${PPO_MINI_BATCH_SIZE:-8}
MAX_PROMPT_LENGTH=${MAX_PROMPT_LENGTH:-512}
MAX_RESPONSE_LENGTH=${MAX_RESPONSE_LENGTH:-256}
ACTOR_MAX_TOKEN_LEN_PER_GPU=${ACTOR_MAX_TOKEN_LEN_PER_GPU:-8192}  # must hold one prompt + response
ACTOR_LR=${ACTOR_LR:-1e-6}
KL_LOSS_COEF=${KL_LOSS_COEF:-0.001}
GRADIENT_CHECKPOINTING=${GRADIENT_CHECKPOINTING:-True}

TOTAL_TRAINING_STEPS=${TOTAL_TRAINING_STEPS:-5}
SAVE_FREQ=${SAVE_FREQ:-5}
TEST_FREQ=${TEST_FREQ:-1}
VAL_BEFORE_TRAIN=${VAL_BEFORE_TRAIN:-True}
PROJECT_NAME=${PROJECT_NAME:-verl_grpo_example_gsm8k}
EXPERIMENT_NAME=${EXPERIMENT_NAME:-qwen2_7b_grpo_seq_balance_debug}
CKPT_DIR=${CKPT_DIR:-checkpoints/$PROJECT_NAME/$EXPERIMENT_NAME}
DEBUG_DIR=${DEBUG_DIR:-$HOME/verl_debug/$EXPERIMENT_NAME}
ROLLOUT_DATA_DIR=${ROLLOUT_DATA_DIR:-$DEBUG_DIR/rollout}
VALIDATION_DATA_DIR=${VALIDATION_DATA_DIR:-$DEBUG_DIR/validation}
LOGGER=${LOGGER:-"['console']"}

python3 -m verl.trainer.main_ppo \
    algorithm.adv_estimator=grpo \
    algorithm.use_kl_in_reward=False \
    data.train_files="$TRAIN_FILES" \
    data.val_files="$VAL_FILES" \
    data.val_max_samples="$VAL_MAX_SAMPLES" \
    data.train_batch_size="$TRAIN_BATCH_SIZE" \
    data.max_prompt_length="$MAX_PROMPT_LENGTH" \
    data.max_response_length="$MAX_RESPONSE_LENGTH" \
    data.filter_overlong_prompts=True \
    data.truncation=error \
    data.return_raw_chat=True \
    actor_rollout_ref.model.path="$MODEL_PATH" \
    actor_rollout_ref.model.use_remove_padding=True \
    actor_rollout_ref.model.enable_gradient_checkpointing="$GRADIENT_CHECKPOINTING" \
    actor_rollout_ref.actor.optim.lr="$ACTOR_LR" \
    actor_rollout_ref.actor.ppo_mini_batch_size="$PPO_MINI_BATCH_SIZE" \
    actor_rollout_ref.actor.use_dynamic_bsz=True \
    actor_rollout_ref.actor.ppo_max_token_len_per_gpu="$ACTOR_MAX_TOKEN_LEN_PER_GPU" \
    actor_rollout_ref.actor.use_kl_loss=True \
    actor_rollout_ref.actor.kl_loss_coef="$KL_LOSS_COEF" \
    actor_rollout_ref.actor.kl_loss_type=low_var_kl \
    actor_rollout_ref.actor.entropy_coeff=0 \
    actor_rollout_ref.rollout.name="$ROLLOUT_NAME" \
    actor_rollout_ref.rollout.n="$ROLLOUT_N" \
    actor_rollout_ref.rollout.tensor_model_parallel_size="$ROLLOUT_TP" \
    actor_rollout_ref.rollout.gpu_memory_utilization="$GPU_MEMORY_UTILIZATION" \
    trainer.critic_warmup=0 \
    trainer.logger="$LOGGER" \
    trainer.log_val_generations=4 \
    trainer.rollout_data_dir="$ROLLOUT_DATA_DIR" \
    trainer.validation_data_dir="$VALIDATION_DATA_DIR" \
    trainer.project_name="$PROJECT_NAME" \
    trainer.experiment_name="$EXPERIMENT_NAME" \
    trainer.default_local_dir="$CKPT_DIR" \
    trainer.nnodes="$NNODES" \
    trainer.n_gpus_per_node="$N_GPUS_PER_NODE" \
    trainer.val_before_train="$VAL_BEFORE_TRAIN" \
    trainer.save_freq="$SAVE_FREQ" \
    trainer.test_freq="$TEST_FREQ" \
    trainer.total_training_steps="$TOTAL_TRAINING_STEPS" \
    "$@"
