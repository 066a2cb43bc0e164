"""Convert verl checkpoints into Hugging Face model directories: ``python -m verl.model_merger merge --backend
{fsdp,megatron} --local_dir CKPT/global_step_N/actor --target_dir OUT`` (see :mod:`.base_model_merger`)."""
from verl.model_merger.base_model_merger import BaseModelMerger, ModelMergerConfig, generate_config_from_args
from verl.model_merger.fsdp_model_merger import FSDPModelMerger, merge_fsdp_checkpoint
from verl.model_merger.megatron_model_merger import MegatronModelMerger, merge_megatron_checkpoint

__all__ = [
    "BaseModelMerger",
    "FSDPModelMerger",
    "MegatronModelMerger",
    "ModelMergerConfig",
    "generate_config_from_args",
    "get_merger",
    "main",
    "merge_fsdp_checkpoint",
    "merge_megatron_checkpoint",
]


def get_merger(config: ModelMergerConfig) -> BaseModelMerger:
    """The merger for ``config.backend``."""
    if config.backend == "fsdp":
        return FSDPModelMerger(config)
    if config.backend == "megatron":
        return MegatronModelMerger(config)
    raise ValueError(f"unknown backend {config.backend!r}; use fsdp or megatron")


def main(argv: list[str] | None = None) -> int:
    """CLI: returns 0 on success; bad input ends the process with a one-line error and exit status 2."""
    import sys

    from verl.model_merger.base_model_merger import parse_args

    args = parse_args(argv)
    try:
        config = generate_config_from_args(args)
        merger = get_merger(config)
        if config.operation == "merge":
            out = merger.merge_and_save()
            print(f"[verl.model_merger] saved Hugging Face model to {out}")
        else:
            merger.test()
            print(f"[verl.model_merger] merged weights of {config.local_dir} match {config.test_hf_dir}")
    except (FileNotFoundError, ValueError, NotImplementedError, AssertionError) as exc:
        print(f"verl.model_merger: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return 0
