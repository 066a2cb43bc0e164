#!/usr/bin/env bash
# PPO (GAE, a critic trained alongside the actor) on GSM8K with Qwen2-7B-Instruct on the Megatron-core backend:
# actor, reference and critic split over tensor (ACTOR_TP / CRITIC_TP) and pipeline (ACTOR_PP / CRITIC_PP) parallel
# ranks, the rest data parallel; megatron's distributed optimizer; parameters/gradients/optimizer state offloaded to
# host memory between phases when OFFLOAD=True. Needs megatron-core (pip install megatron-core==0.16.1).
#
# Data: python examples/data_preprocess/gsm8k.py --local_dir ~/data/gsm8k
# Every setting below can be changed through the environment, e.g.
#   MODEL_PATH=~/models/Qwen2-7B-Instruct ACTOR_TP=4 bash examples/ppo_trainer/run_qwen2-7b_megatron.sh
# and extra Hydra overrides are passed through: ... run_qwen2-7b_megatron.sh trainer.total_training_steps=10
set -xeuo pipefail

MODEL_PATH=${MODEL_PATH:-Qwen/Qwen2-7B-Instruct}
CRITIC_MODEL_PATH=${CRITIC_MODEL_PATH:-$MODEL_PATH}
DATA_DIR=${DATA_DIR:-$HOME/data}
TRAIN_FILES=${TRAIN_FILES:-$DATA_DIR/gsm8k/train.parquet}
VAL_FILES=${VAL_FILES:-$DATA_DIR/gsm8k/test.parquet}

NNODES=${NNODES:-1}
N_GPUS_PER_NODE=${N_GPUS_PER_NODE:-8}
ACTOR_TP=${ACTOR_TP:-2}
ACTOR_PP=${ACTOR_PP:-2}
CRITIC_TP=${CRITIC_TP:-$ACTOR_TP}
CRITIC_PP=${CRITIC_PP:-$ACTOR_PP}
OFFLOAD=${OFFLOAD:-False}
ROLLOUT_NAME=${ROLLOUT_NAME:-hf}  # hf | vllm | sglang

TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-1024}
PPO_MINI_BATCH_SIZE=${PPO_MINI_BATCH_SIZE:-256}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-2}
MAX_PROMPT_LENGTH=${MAX_PROMPT_LENGTH:-512}
MAX_RESPONSE_LENGTH=${MAX_RESPONSE_LENGTH:-512}
ACTOR_LR=${ACTOR_LR:-1e-6}
CRITIC_LR=${CRITIC_LR:-1e-5}

TOTAL_EPOCHS=${TOTAL_EPOCHS:-15}
TOTAL_TRAINING_STEPS=${TOTAL_TRAINING_STEPS:-null}
SAVE_FREQ=${SAVE_FREQ:-20}
TEST_FREQ=${TEST_FREQ:-5}
VAL_BEFORE_TRAIN=${VAL_BEFORE_TRAIN:-False}
PROJECT_NAME=${PROJECT_NAME:-verl_example_gsm8k}
EXPERIMENT_NAME=${EXPERIMENT_NAME:-qwen2-7b_ppo_megatron}
CKPT_DIR=${CKPT_DIR:-checkpoints/$PROJECT_NAME/$EXPERIMENT_NAME}
LOGGER=${LOGGER:-"['console','wandb']"}

python3 -m verl.trainer.main_ppo --config-name ppo_megatron_trainer \
    algorithm.adv_estimator=gae \
    algorithm.use_kl_in_reward=False \
    data.train_files="$TRAIN_FILES" \
    data.val_files="$VAL_FILES" \
    data.train_batch_size="$TRAIN_BATCH_SIZE" \
    data.max_prompt_length="$MAX_PROMPT_LENGTH" \
    data.max_response_length="$MAX_RESPONSE_LENGTH" \
    data.filter_overlong_prompts=True \
    data.truncation=error \
    actor_rollout_ref.model.path="$MODEL_PATH" \
    actor_rollout_ref.actor.optim.lr="$ACTOR_LR" \
    actor_rollout_ref.actor.ppo_mini_batch_size="$PPO_MINI_BATCH_SIZE" \
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu="$MICRO_BATCH_SIZE" \
    actor_rollout_ref.actor.use_kl_loss=False \
    actor_rollout_ref.actor.megatron.tensor_model_parallel_size="$ACTOR_TP" \
    actor_rollout_ref.actor.megatron.pipeline_model_parallel_size="$ACTOR_PP" \
    actor_rollout_ref.actor.megatron.param_offload="$OFFLOAD" \
    actor_rollout_ref.actor.megatron.grad_offload="$OFFLOAD" \
    actor_rollout_ref.actor.megatron.optimizer_offload="$OFFLOAD" \
    actor_rollout_ref.rollout.name="$ROLLOUT_NAME" \
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu="$MICRO_BATCH_SIZE" \
    critic.model.path="$CRITIC_MODEL_PATH" \
    critic.optim.lr="$CRITIC_LR" \
    critic.ppo_micro_batch_size_per_gpu="$MICRO_BATCH_SIZE" \
    critic.megatron.tensor_model_parallel_size="$CRITIC_TP" \
    critic.megatron.pipeline_model_parallel_size="$CRITIC_PP" \
    critic.megatron.param_offload="$OFFLOAD" \
    critic.megatron.grad_offload="$OFFLOAD" \
    critic.megatron.optimizer_offload="$OFFLOAD" \
    trainer.critic_warmup=0 \
    trainer.logger="$LOGGER" \
    trainer.project_name="$PROJECT_NAME" \
    trainer.experiment_name="$EXPERIMENT_NAME" \
    trainer.default_local_dir="$CKPT_DIR" \
    trainer.nnodes="$NNODES" \
    trainer.n_gpus_per_node="$N_GPUS_PER_NODE" \
    trainer.val_before_train="$VAL_BEFORE_TRAIN" \
    trainer.save_freq="$SAVE_FREQ" \
    trainer.test_freq="$TEST_FREQ" \
    trainer.total_epochs="$TOTAL_EPOCHS" \
    trainer.total_training_steps="$TOTAL_TRAINING_STEPS" \
    "$@"
