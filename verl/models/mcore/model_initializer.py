"""Building a Megatron-core ``GPTModel`` chunk from a Hugging Face config; megatron-core is imported only here, lazily.

Megatron-core is an optional dependency (``pip install -e .[megatron]``) that needs CUDA for training; everything
else in :mod:`verl.models.mcore` is pure tensor code. Megatron's ``parallel_state`` must be initialised
(``megatron.core.parallel_state.initialize_model_parallel``) before a chunk is built with TP or PP > 1.
"""
from __future__ import annotations

import importlib.util
import inspect
from dataclasses import fields
from types import ModuleType
from typing import Any, Mapping, Optional

from verl.models.mcore.registry import get_gpt_model_kwargs, hf_to_mcore_config
from verl.models.mcore.weight_converter import DecoderDims, McoreLayout

__all__ = [
    "MEGATRON_INSTALL_HINT",
    "is_megatron_core_available",
    "import_megatron_core",
    "make_transformer_config",
    "layout_from_transformer_config",
    "get_gpt_layer_spec",
    "build_gpt_model",
    "mark_tensor_parallel_weights",
]

MEGATRON_INSTALL_HINT = "pip install -e .[megatron]"


def is_megatron_core_available() -> bool:
    """True when ``megatron.core`` can be imported (it is not imported here)."""
    try:
        return importlib.util.find_spec("megatron.core") is not None
    except (ImportError, ValueError):
        return False


def import_megatron_core() -> ModuleType:
    """``megatron.core``, or an ImportError that says how to install it."""
    try:
        import megatron.core as mcore
    except ImportError as exc:
        raise ImportError(f"the Megatron backend needs megatron-core, which is not installed. Fix: `"
                          f"{MEGATRON_INSTALL_HINT}` (megatron-core trains on CUDA GPUs; Transformer Engine is "
                          "optional)") from exc
    return mcore


def _megatron_version() -> tuple[int, ...]:
    try:
        from megatron.core.package_info import __version__
    except ImportError:
        return (0,)
    parts = []
    for piece in str(__version__).split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def make_transformer_config(config_kwargs: Mapping[str, Any]) -> Any:
    """A ``megatron.core.transformer.TransformerConfig`` from the kwargs of :func:`hf_to_mcore_config`; an unknown
    field (e.g. a typo in ``override_transformer_config``) is a clear error instead of a ``TypeError``."""
    import_megatron_core()
    from megatron.core.transformer import TransformerConfig

    known = {f.name for f in fields(TransformerConfig)}
    unknown = sorted(k for k in config_kwargs if k not in known)
    if unknown:
        raise ValueError(f"unknown megatron-core TransformerConfig field(s) {unknown} (from "
                         "actor_rollout_ref.actor.megatron.override_transformer_config or the config converter); "
                         "check the names against megatron/core/transformer/transformer_config.py")
    return TransformerConfig(**dict(config_kwargs))


def layout_from_transformer_config(tf_config: Any,
                                   use_transformer_engine: bool,
                                   make_vocab_size_divisible_by: int = 1) -> McoreLayout:
    """The :class:`McoreLayout` (for the weight converters) of a built ``TransformerConfig``."""
    vpp = getattr(tf_config, "virtual_pipeline_model_parallel_size", None)
    return McoreLayout(tp_size=int(tf_config.tensor_model_parallel_size),
                       pp_size=int(tf_config.pipeline_model_parallel_size),
                       vpp_size=int(vpp) if vpp not in (None, 1) else None,
                       ep_size=int(getattr(tf_config, "expert_model_parallel_size", 1) or 1),
                       make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                       fused_layernorm=use_transformer_engine)


def _te_available() -> bool:
    try:
        return importlib.util.find_spec("transformer_engine") is not None
    except (ImportError, ValueError):
        return False


def get_gpt_layer_spec(tf_config: Any, use_transformer_engine: Optional[bool] = None) -> Any:
    """The decoder layer spec: Transformer Engine's when it is installed (norms fused into ``linear_qkv`` /
    ``linear_fc1``), else megatron-core's local spec (separate ``input_layernorm`` / ``pre_mlp_layernorm``)."""
    import_megatron_core()
    from megatron.core.models.gpt import gpt_layer_specs

    use_te = _te_available() if use_transformer_engine is None else use_transformer_engine
    fn = (gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec
          if use_te else gpt_layer_specs.get_gpt_layer_local_spec)
    wanted: dict[str, Any] = {"qk_layernorm": bool(getattr(tf_config, "qk_layernorm", False))}
    num_experts = getattr(tf_config, "num_moe_experts", None)
    if num_experts:
        wanted.update(num_experts=int(num_experts),
                      moe_grouped_gemm=bool(getattr(tf_config, "moe_grouped_gemm", False)))
    if not use_te:
        wanted["normalization"] = getattr(tf_config, "normalization", "RMSNorm")
    accepted = inspect.signature(fn).parameters
    spec = fn(**{k: v for k, v in wanted.items() if k in accepted})
    if int(getattr(tf_config, "context_parallel_size", 1) or 1) > 1 and not use_te:
        _use_cp_attention(spec)
    return spec


def _use_cp_attention(spec: Any) -> None:
    """Swap the local spec's ``DotProductAttention`` (which asserts CP == 1) for
    :class:`verl.models.mcore.cp_attention.ContextParallelAttention` (all-gathered K/V over the CP group)."""
    from verl.models.mcore.cp_attention import ContextParallelAttention

    layer = getattr(spec, "submodules", None)
    attention = getattr(layer, "self_attention", None)
    inner = getattr(attention, "submodules", None)
    if inner is None or not hasattr(inner, "core_attention"):
        raise NotImplementedError("context_parallel_size > 1: this megatron-core's local layer spec has no "
                                  "self_attention.submodules.core_attention to replace")
    inner.core_attention = ContextParallelAttention


def _patch_moe_without_te() -> None:
    """megatron-core 0.16's router reads ``moe_utils.te_general_gemm``, which is only defined when Transformer Engine
    imports; without it the router's torch matmul path is what should run, so the name is set to None (only if it is
    missing, so a real Transformer Engine is never shadowed)."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def build_gpt_model(hf_config: Any,
                    transformer_config: Any = None,
                    *,
                    pre_process: bool = True,
                    post_process: bool = True,
                    vp_stage: Optional[int] = None,
                    use_transformer_engine: Optional[bool] = None,
                    make_vocab_size_divisible_by: int = 1,
                    **config_kwargs: Any) -> Any:
    """One ``megatron.core.models.gpt.GPTModel`` chunk for ``hf_config``.

    ``transformer_config``: a built ``TransformerConfig``; without it one is made from
    ``hf_to_mcore_config(hf_config, **config_kwargs)`` (``dtype``, ``parallel``, ``override_transformer_config``).
    ``pre_process`` / ``post_process``: whether this chunk holds the embedding / the output layer
    (:meth:`McoreLayout.is_first_stage` / :meth:`~McoreLayout.is_last_stage`). The weights are random: load them
    with the state dicts of :func:`verl.models.mcore.hf_to_mcore_rank` for the same layout
    (:func:`layout_from_transformer_config`).
    """
    import_megatron_core()
    from megatron.core.models.gpt import GPTModel

    tf_config = transformer_config or make_transformer_config(hf_to_mcore_config(hf_config, **config_kwargs))
    cp = int(getattr(tf_config, "context_parallel_size", 1) or 1)
    if cp > 1 and getattr(tf_config, "num_moe_experts", None):
        raise NotImplementedError(f"context_parallel_size={cp} with a mixture-of-experts model is not supported "
                                  "(untested); set context_parallel_size=1")
    if getattr(tf_config, "num_moe_experts", None):
        _patch_moe_without_te()
    use_te = _te_available() if use_transformer_engine is None else use_transformer_engine
    layout = layout_from_transformer_config(tf_config, use_te, make_vocab_size_divisible_by)
    dims = DecoderDims.from_hf_config(hf_config)
    if dims.num_kv_heads < layout.tp_size and _megatron_version() < (0, 16):
        raise ValueError(f"tensor_model_parallel_size={layout.tp_size} > num_key_value_heads={dims.num_kv_heads} "
                         "needs megatron-core >= 0.16; upgrade it or lower tensor_model_parallel_size")
    kwargs = get_gpt_model_kwargs(hf_config, layout)
    kwargs.update(pre_process=pre_process, post_process=post_process)
    if vp_stage is not None:
        kwargs["vp_stage"] = vp_stage
    accepted = inspect.signature(GPTModel.__init__).parameters
    dropped = [k for k in kwargs if k not in accepted]
    if dropped and any(k in ("rope_scaling", "vp_stage", "seq_len_interpolation_factor") for k in dropped):
        raise ValueError(f"this megatron-core's GPTModel does not accept {dropped}; upgrade megatron-core")
    model = GPTModel(config=tf_config,
                     transformer_layer_spec=get_gpt_layer_spec(tf_config, use_te),
                     **{
                         k: v for k, v in kwargs.items() if k in accepted
                     })
    mark_tensor_parallel_weights(model)
    return model


def mark_tensor_parallel_weights(model: Any) -> int:
    """Mark the weights of megatron's TP layers as split over TP (``tensor_model_parallel``, ``partition_dim``,
    ``partition_stride``), as megatron's weight init does; returns how many were unmarked.

    Megatron-core (0.16) sets these attributes on the weights of ``ColumnParallelLinear``, ``RowParallelLinear`` and
    ``VocabParallelEmbedding`` only inside its weight init, which ``perform_initialization=False`` (verl's default:
    the weights come from the checkpoint) skips. Unmarked, they count as TP duplicates: the optimizer's gradient
    norm (hence ``clip_grad``) and zero count take them from TP rank 0 only, so the norm misses the other TP ranks'
    shards (TP=2 on the tiny Qwen2: 4.34089 for 5.92918). Weights already marked (Transformer Engine layers, or a
    model built with init) are left as they are.
    """
    import torch
    from megatron.core.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                                      set_tensor_model_parallel_attributes)

    attributes = ("tensor_model_parallel", "partition_dim", "partition_stride")
    marked = 0
    for name, module in model.named_modules():
        if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
            dim = 0
        elif isinstance(module, RowParallelLinear):
            dim = 1
        else:
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.nn.Parameter) or any(hasattr(weight, a) for a in attributes):
            continue
        config = getattr(module, "config", None)
        # megatron's MLP builds a gated fc1 with stride 2 (each TP rank holds [gate, up] slices), as init would mark
        gated = bool(getattr(config, "gated_linear_unit", False)) and not getattr(config, "use_kitchen", False)
        stride = 2 if dim == 0 and gated and name.split(".")[-1] == "linear_fc1" else 1
        set_tensor_model_parallel_attributes(weight, True, dim, stride)
        marked += 1
    return marked
