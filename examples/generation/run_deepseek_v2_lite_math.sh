#!/usr/bin/env bash
# Offline generation then evaluation: sample N_SAMPLES responses for every prompt of a parquet file with
# verl.trainer.main_generation (any rollout backend: ROLLOUT_NAME=hf|vllm|sglang), then score them with
# verl.trainer.main_eval, which prints the mean score and pass@1..pass@N_SAMPLES per data source.
#
# Data: python examples/data_preprocess/gsm8k.py --local_dir ~/data/gsm8k
# Every setting below can be changed through the environment, e.g.
#   MODEL_PATH=~/models/DeepSeek-V2-Lite-Chat N_GPUS_PER_NODE=2 bash examples/generation/run_deepseek_v2_lite_math.sh
# Extra Hydra overrides are passed to the generation step: ... run_deepseek_v2_lite_math.sh rollout.temperature=0.6
set -xeuo pipefail

MODEL_PATH=${MODEL_PATH:-deepseek-ai/DeepSeek-V2-Lite-Chat}
DATA_PATH=${DATA_PATH:-$HOME/data/gsm8k/test.parquet}
OUTPUT_PATH=${OUTPUT_PATH:-$HOME/data/gsm8k/deepseek_v2_lite_gen_test.parquet}
METRICS_PATH=${METRICS_PATH:-${OUTPUT_PATH%.parquet}_metrics.json}

NNODES=${NNODES:-1}
N_GPUS_PER_NODE=${N_GPUS_PER_NODE:-8}
ROLLOUT_NAME=${ROLLOUT_NAME:-vllm}  # hf | vllm | sglang
ROLLOUT_TP=${ROLLOUT_TP:-2}
GPU_MEMORY_UTILIZATION=${GPU_MEMORY_UTILIZATION:-0.8}

N_SAMPLES=${N_SAMPLES:-4}
BATCH_SIZE=${BATCH_SIZE:-128}  # prompts per generation call
PROMPT_LENGTH=${PROMPT_LENGTH:-2048}
RESPONSE_LENGTH=${RESPONSE_LENGTH:-1024}
TEMPERATURE=${TEMPERATURE:-1.0}
TOP_K=${TOP_K:-50}  # -1: off
TOP_P=${TOP_P:-0.7}
TRUST_REMOTE_CODE=${TRUST_REMOTE_CODE:-True}  # DeepSeek-V2 ships modelling code with its weights

python3 -m verl.trainer.main_generation \
    trainer.nnodes="$NNODES" \
    trainer.n_gpus_per_node="$N_GPUS_PER_NODE" \
    data.path="$DATA_PATH" \
    data.prompt_key=prompt \
    data.n_samples="$N_SAMPLES" \
    data.batch_size="$BATCH_SIZE" \
    data.output_path="$OUTPUT_PATH" \
    model.path="$MODEL_PATH" \
    model.trust_remote_code="$TRUST_REMOTE_CODE" \
    rollout.name="$ROLLOUT_NAME" \
    rollout.temperature="$TEMPERATURE" \
    rollout.top_k="$TOP_K" \
    rollout.top_p="$TOP_P" \
    rollout.prompt_length="$PROMPT_LENGTH" \
    rollout.response_length="$RESPONSE_LENGTH" \
    rollout.tensor_model_parallel_size="$ROLLOUT_TP" \
    rollout.gpu_memory_utilization="$GPU_MEMORY_UTILIZATION" \
    "$@"

python3 -m verl.trainer.main_eval \
    data.path="$OUTPUT_PATH" \
    data.response_key=responses \
    data.data_source_key=data_source \
    data.reward_model_key=reward_model \
    evaluation.output_path="$METRICS_PATH"
