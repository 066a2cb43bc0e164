#!/usr/bin/env bash
# Single-turn SFT of Qwen2.5-0.5B-Instruct on GSM8K with FSDP2 (torchrun, one process per device).
#
# Data: python examples/data_preprocess/gsm8k.py --local_dataset_path <gsm8k copy> --local_dir ~/data/gsm8k
# (the prompt is extra_info.question, the target extra_info.answer, the worked solution ending in "#### N").
#
# Settings come from environment variables (defaults in brackets); extra key=value arguments are passed on:
#   MODEL_PATH [~/models/Qwen2.5-0.5B-Instruct]   DATA_DIR [~/data/gsm8k] (train.parquet, test.parquet)
#   TRAIN_FILES / VAL_FILES [$DATA_DIR/{train,test}.parquet]   NPROC [number of GPUs, else 1]
#   SAVE_DIR [checkpoints/gsm8k-sft/qwen2.5-0.5b]   TRAIN_BATCH_SIZE [256]   MICRO_BATCH_SIZE [4]
#   MAX_LENGTH [1024]   EPOCHS [4]   LR [1e-4]   LOGGER [console]
#
#   bash examples/sft/gsm8k/run_qwen_05.sh trainer.total_training_steps=100
set -euo pipefail

MODEL_PATH=${MODEL_PATH:-$HOME/models/Qwen2.5-0.5B-Instruct}
DATA_DIR=${DATA_DIR:-$HOME/data/gsm8k}
TRAIN_FILES=${TRAIN_FILES:-$DATA_DIR/train.parquet}
VAL_FILES=${VAL_FILES:-$DATA_DIR/test.parquet}
if [ -z "${NPROC:-}" ]; then
    NPROC=$(nvidia-smi -L 2>/dev/null | wc -l || true)
    [ "${NPROC:-0}" -ge 1 ] || NPROC=1
fi
SAVE_DIR=${SAVE_DIR:-checkpoints/gsm8k-sft/qwen2.5-0.5b}
TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-256}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-4}
MAX_LENGTH=${MAX_LENGTH:-1024}
EPOCHS=${EPOCHS:-4}
LR=${LR:-1e-4}
LOGGER=${LOGGER:-console}
PYTHON=${PYTHON:-python3}

"$PYTHON" -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node="$NPROC" \
    -m verl.trainer.fsdp_sft_trainer \
    data.train_files="$TRAIN_FILES" \
    data.val_files="$VAL_FILES" \
    data.prompt_key=extra_info \
    data.response_key=extra_info \
    "+data.prompt_dict_keys=['question']" \
    "+data.response_dict_keys=['answer']" \
    data.train_batch_size="$TRAIN_BATCH_SIZE" \
    data.micro_batch_size_per_gpu="$MICRO_BATCH_SIZE" \
    data.max_length="$MAX_LENGTH" \
    data.truncation=right \
    model.partial_pretrain="$MODEL_PATH" \
    model.enable_gradient_checkpointing=True \
    optim.lr="$LR" \
    use_remove_padding=True \
    trainer.default_local_dir="$SAVE_DIR" \
    trainer.project_name=gsm8k-sft \
    trainer.experiment_name=gsm8k-sft-qwen-2.5-0.5b-instruct \
    trainer.total_epochs="$EPOCHS" \
    "trainer.logger=[$LOGGER]" \
    "$@"
