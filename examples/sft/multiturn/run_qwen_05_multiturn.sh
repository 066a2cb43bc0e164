#!/usr/bin/env bash
# Multi-turn SFT (loss on every assistant turn) of Qwen2.5-0.5B-Instruct with FSDP2 (torchrun).
#
# Data: parquet files with a `messages` column of chat turns, e.g. from
# python examples/data_preprocess/gsm8k.py --sft ... or examples/data_preprocess/arithmetic.py --sft.
#
# Settings come from environment variables (defaults in brackets); extra key=value arguments are passed on:
#   MODEL_PATH [~/models/Qwen2.5-0.5B-Instruct]   DATA_DIR [~/data/multiturn] (train.parquet, test.parquet)
#   TRAIN_FILES / VAL_FILES [$DATA_DIR/{train,test}.parquet]   MESSAGES_KEY [messages]   NPROC [GPUs, else 1]
#   SAVE_DIR [checkpoints/multiturn-sft/qwen2.5-0.5b]   TRAIN_BATCH_SIZE [64]   MICRO_BATCH_SIZE [4]
#   MAX_LENGTH [2048]   EPOCHS [2]   LR [1e-5]   LOGGER [console]
set -euo pipefail

MODEL_PATH=${MODEL_PATH:-$HOME/models/Qwen2.5-0.5B-Instruct}
DATA_DIR=${DATA_DIR:-$HOME/data/multiturn}
TRAIN_FILES=${TRAIN_FILES:-$DATA_DIR/train.parquet}
VAL_FILES=${VAL_FILES:-$DATA_DIR/test.parquet}
MESSAGES_KEY=${MESSAGES_KEY:-messages}
if [ -z "${NPROC:-}" ]; then
    NPROC=$(nvidia-smi -L 2>/dev/null | wc -l || true)
    [ "${NPROC:-0}" -ge 1 ] || NPROC=1
fi
SAVE_DIR=${SAVE_DIR:-checkpoints/multiturn-sft/qwen2.5-0.5b}
TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-64}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-4}
MAX_LENGTH=${MAX_LENGTH:-2048}
EPOCHS=${EPOCHS:-2}
LR=${LR:-1e-5}
LOGGER=${LOGGER:-console}
PYTHON=${PYTHON:-python3}

"$PYTHON" -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node="$NPROC" \
    -m verl.trainer.fsdp_sft_trainer \
    data.train_files="$TRAIN_FILES" \
    data.val_files="$VAL_FILES" \
    data.multiturn.enable=True \
    data.multiturn.messages_key="$MESSAGES_KEY" \
    data.train_batch_size="$TRAIN_BATCH_SIZE" \
    data.micro_batch_size_per_gpu="$MICRO_BATCH_SIZE" \
    data.max_length="$MAX_LENGTH" \
    data.truncation=right \
    model.partial_pretrain="$MODEL_PATH" \
    model.enable_gradient_checkpointing=True \
    optim.lr="$LR" \
    use_remove_padding=True \
    trainer.default_local_dir="$SAVE_DIR" \
    trainer.project_name=multiturn-sft \
    trainer.experiment_name=multiturn-sft-qwen-2.5-0.5b-instruct \
    trainer.total_epochs="$EPOCHS" \
    "trainer.logger=[$LOGGER]" \
    "$@"
