"""Megatron-core support: HF config -> Megatron config, HF <-> Megatron sharded weights, model building.

Everything but :func:`build_gpt_model` / :func:`make_transformer_config` is pure tensor code that runs without
megatron-core (tested on CPU). See :mod:`verl.models.mcore.weight_converter` for the names and layouts.
"""
from verl.models.mcore.config_converter import (ParallelSizes, hf_to_gpt_model_kwargs, hf_to_mcore_config_dense,
                                                hf_to_mcore_config_mixtral, rope_kwargs)
from verl.models.mcore.mixtral import (MixtralWeightConverter, mixtral_module_target, mixtral_to_checkpoint_names,
                                       mixtral_to_in_memory_names)
from verl.models.mcore.model_initializer import (MEGATRON_INSTALL_HINT, build_gpt_model, get_gpt_layer_spec,
                                                 import_megatron_core, is_megatron_core_available,
                                                 layout_from_transformer_config, make_transformer_config)
from verl.models.mcore.registry import (McoreModelEntry, get_architecture, get_gpt_model_kwargs, get_mcore_model_entry,
                                        get_weight_converter, hf_to_mcore_config, register_mcore_model,
                                        supported_architectures)
from verl.models.mcore.weight_converter import (DecoderDims, DenseDecoderWeightConverter, McoreLayout, McoreShards,
                                                bucket_named_tensors, hf_to_mcore, hf_to_mcore_rank,
                                                iter_hf_weights_in_buckets, mcore_to_hf, per_tensor_generator)

__all__ = [
    "MEGATRON_INSTALL_HINT",
    "DecoderDims",
    "DenseDecoderWeightConverter",
    "McoreLayout",
    "McoreModelEntry",
    "McoreShards",
    "MixtralWeightConverter",
    "ParallelSizes",
    "bucket_named_tensors",
    "build_gpt_model",
    "get_architecture",
    "get_gpt_layer_spec",
    "get_gpt_model_kwargs",
    "get_mcore_model_entry",
    "get_weight_converter",
    "hf_to_gpt_model_kwargs",
    "hf_to_mcore",
    "hf_to_mcore_config",
    "hf_to_mcore_config_dense",
    "hf_to_mcore_config_mixtral",
    "hf_to_mcore_rank",
    "import_megatron_core",
    "is_megatron_core_available",
    "iter_hf_weights_in_buckets",
    "layout_from_transformer_config",
    "make_transformer_config",
    "mcore_to_hf",
    "mixtral_module_target",
    "mixtral_to_checkpoint_names",
    "mixtral_to_in_memory_names",
    "per_tensor_generator",
    "register_mcore_model",
    "rope_kwargs",
    "supported_architectures",
]
