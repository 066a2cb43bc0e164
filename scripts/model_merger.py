#!/usr/bin/env python
"""Convert a verl checkpoint to a Hugging Face model directory (same as ``python -m verl.model_merger``).

    python scripts/model_merger.py merge --backend fsdp --local_dir CKPT/global_step_N/actor --target_dir OUT
"""
from verl.model_merger import main

if __name__ == "__main__":
    main()
