"""``python -m verl.model_merger merge --backend {fsdp,megatron} --local_dir CKPT/global_step_N/actor --target_dir
OUT``."""
from verl.model_merger import main

if __name__ == "__main__":
    main()
