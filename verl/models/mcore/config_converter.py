"""Hugging Face config -> Megatron-core ``TransformerConfig`` / ``GPTModel`` keyword arguments, as plain dicts.

No megatron-core import: the dicts are built and tested on CPU, and :mod:`verl.models.mcore.model_initializer` turns
them into the real objects where megatron-core is installed. Field names are megatron-core's
(``megatron/core/transformer/transformer_config.py`` and ``model_parallel_config.py``, version 0.16).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F

from verl.models.mcore.weight_converter import DecoderDims, McoreLayout, _cfg

__all__ = [
    "ParallelSizes",
    "hf_to_mcore_config_dense",
    "hf_to_mcore_config_mixtral",
    "hf_to_gpt_model_kwargs",
    "rope_kwargs",
]

_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32
}
_ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu}


def _dtype(dtype: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of bf16, fp16, fp32") from None


class ParallelSizes(dict):
    """Megatron's parallel sizes as ``TransformerConfig`` kwargs; built from the ``*.megatron`` config section keys
    (``tensor_model_parallel_size``, ``pipeline_model_parallel_size``, ``virtual_pipeline_model_parallel_size``,
    ``context_parallel_size``, ``expert_model_parallel_size``, ``expert_tensor_parallel_size``,
    ``sequence_parallel``)."""

    KEYS = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size",
            "context_parallel_size", "expert_model_parallel_size", "expert_tensor_parallel_size", "sequence_parallel")

    @classmethod
    def from_megatron_config(cls, megatron_config: Optional[Mapping[str, Any]] = None) -> "ParallelSizes":
        src = dict(megatron_config or {})
        out = cls()
        tp = int(src.get("tensor_model_parallel_size") or 1)
        pp = int(src.get("pipeline_model_parallel_size") or 1)
        vpp = src.get("virtual_pipeline_model_parallel_size")
        out["tensor_model_parallel_size"] = tp
        out["pipeline_model_parallel_size"] = pp
        out["virtual_pipeline_model_parallel_size"] = int(vpp) if vpp not in (None, 1) else None
        out["context_parallel_size"] = int(src.get("context_parallel_size") or 1)
        out["expert_model_parallel_size"] = int(src.get("expert_model_parallel_size") or 1)
        etp = src.get("expert_tensor_parallel_size")
        if etp is not None:
            out["expert_tensor_parallel_size"] = int(etp)
        # sequence parallelism only means something with TP > 1 (Megatron rejects it otherwise)
        out["sequence_parallel"] = bool(src.get("sequence_parallel", True)) and tp > 1
        return out

    def layout(self, **kwargs: Any) -> McoreLayout:
        """The :class:`McoreLayout` of these sizes (for the weight converters)."""
        return McoreLayout(tp_size=self["tensor_model_parallel_size"],
                           pp_size=self["pipeline_model_parallel_size"],
                           vpp_size=self["virtual_pipeline_model_parallel_size"],
                           ep_size=self["expert_model_parallel_size"],
                           **kwargs)


def rope_kwargs(hf_config: Any) -> dict[str, Any]:
    """``GPTModel`` rotary kwargs (``rotary_base``, ``rope_scaling``, ``rope_scaling_factor``,
    ``seq_len_interpolation_factor``) for the HF config's RoPE (transformers 4 ``rope_theta``/``rope_scaling`` or
    transformers 5 ``rope_parameters``). Scalings that megatron-core's ``GPTModel`` cannot express raise."""
    params = dict(_cfg(hf_config, "rope_parameters", default=None) or {})
    scaling = dict(_cfg(hf_config, "rope_scaling", default=None) or {})
    merged = {**scaling, **params}
    theta = _cfg(hf_config, "rope_theta", default=None) or merged.get("rope_theta") or 10000.0
    rope_type = merged.get("rope_type") or merged.get("type") or "default"
    out: dict[str, Any] = {"position_embedding_type": "rope", "rotary_percent": 1.0, "rotary_base": float(theta)}
    if rope_type == "default":
        return out
    factor = float(merged.get("factor", 1.0))
    if rope_type == "linear":
        out["seq_len_interpolation_factor"] = factor
        return out
    if rope_type == "llama3":
        # megatron-core's Llama-3.1 scaling has fixed low/high frequency factors and original context
        fixed = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        for key, value in fixed.items():
            if key in merged and float(merged[key]) != value:
                raise NotImplementedError(f"rope_scaling {key}={merged[key]} is not supported by megatron-core's "
                                          f"Llama-3 RoPE scaling (fixed at {value})")
        out.update(rope_scaling=True, rope_scaling_factor=factor)
        return out
    raise NotImplementedError(f"RoPE type {rope_type!r} of this HF config has no megatron-core GPTModel equivalent "
                              "here; register a config converter for this architecture")


def hf_to_mcore_config_dense(hf_config: Any,
                             dtype: Any = torch.bfloat16,
                             parallel: Optional[Mapping[str, Any]] = None,
                             override_transformer_config: Optional[Mapping[str, Any]] = None,
                             **extra: Any) -> dict[str, Any]:
    """``TransformerConfig`` kwargs of a dense Llama/Qwen2-style decoder.

    ``parallel``: the ``*.megatron`` config section (or :class:`ParallelSizes`); ``override_transformer_config``
    (``actor_rollout_ref.actor.megatron.override_transformer_config``) is applied last and may set any
    ``TransformerConfig`` field (e.g. ``recompute_granularity``); ``extra`` likewise, before it.
    """
    dims = DecoderDims.from_hf_config(hf_config)
    act_name = str(_cfg(hf_config, "hidden_act", "hidden_activation", default="silu"))
    activation = _ACTIVATIONS.get(act_name)
    if activation is None:
        raise NotImplementedError(f"hidden_act={act_name!r} has no mapping to a Megatron activation_func; "
                                  f"supported: {sorted(_ACTIVATIONS)}")
    if bool(_cfg(hf_config, "attention_bias", default=False)) and not dims.linear_bias:
        # Llama's attention_bias also puts a bias on o_proj; Megatron only has add_qkv_bias (q/k/v) and
        # add_bias_linear (every linear layer), so an o_proj bias needs mlp_bias too.
        raise NotImplementedError("attention_bias=True without mlp_bias=True cannot be expressed in Megatron-core "
                                  "(an o_proj bias needs add_bias_linear, which also adds MLP biases)")
    torch_dtype = _dtype(dtype)
    sizes = parallel if isinstance(parallel, ParallelSizes) else ParallelSizes.from_megatron_config(parallel)
    kwargs: dict[str, Any] = dict(
        num_layers=dims.num_layers,
        hidden_size=dims.hidden_size,
        num_attention_heads=dims.num_heads,
        num_query_groups=dims.num_kv_heads,
        kv_channels=dims.head_dim,
        ffn_hidden_size=dims.ffn_hidden_size,
        layernorm_epsilon=float(_cfg(hf_config, "rms_norm_eps", default=1e-6)),
        normalization="RMSNorm",
        activation_func=activation,
        gated_linear_unit=True,
        add_bias_linear=dims.linear_bias,
        add_qkv_bias=dims.qkv_bias,
        qk_layernorm=False,
        hidden_dropout=0.0,
        attention_dropout=float(_cfg(hf_config, "attention_dropout", default=0.0)),
        init_method_std=float(_cfg(hf_config, "initializer_range", default=0.02)),
        rotary_interleaved=False,
        attention_softmax_in_fp32=True,
        bias_activation_fusion=True,
        masked_softmax_fusion=True,
        variable_seq_lengths=True,  # micro-batches of different lengths (dynamic batch sizes, packing)
        moe_token_dispatcher_type="alltoall",  # megatron-core rejects variable_seq_lengths with "allgather"
        batch_p2p_comm=False,
        params_dtype=torch_dtype,
        pipeline_dtype=torch_dtype,
        bf16=torch_dtype is torch.bfloat16,
        fp16=torch_dtype is torch.float16,
    )
    kwargs.update(sizes)
    kwargs.update(extra)
    overrides = override_transformer_config or {}
    from omegaconf import OmegaConf

    if OmegaConf.is_config(overrides):  # straight from the Hydra config: plain lists/dicts for TransformerConfig
        overrides = OmegaConf.to_container(overrides, resolve=True)
    kwargs.update(dict(overrides))
    return kwargs


def hf_to_gpt_model_kwargs(hf_config: Any, layout: Optional[McoreLayout] = None) -> dict[str, Any]:
    """``GPTModel`` kwargs besides the config and layer spec: vocabulary (padded as :class:`McoreLayout` says),
    maximum length, tied embeddings and RoPE. ``pre_process`` / ``post_process`` / ``vp_stage`` are per chunk."""
    layout = layout or McoreLayout()
    dims = DecoderDims.from_hf_config(hf_config)
    out = dict(vocab_size=layout.padded_vocab_size(dims.vocab_size),
               max_sequence_length=int(_cfg(hf_config, "max_position_embeddings", default=4096)),
               share_embeddings_and_output_weights=dims.tie_word_embeddings,
               parallel_output=True)
    out.update(rope_kwargs(hf_config))
    return out


def hf_to_mcore_config_mixtral(hf_config: Any,
                               dtype: Any = torch.bfloat16,
                               parallel: Optional[Mapping[str, Any]] = None,
                               override_transformer_config: Optional[Mapping[str, Any]] = None,
                               **extra: Any) -> dict[str, Any]:
    """``TransformerConfig`` kwargs of a Mixtral-style sparse MoE decoder (``MixtralForCausalLM``): the dense
    decoder's attention and norms, every MLP a ``num_local_experts``-expert MoE layer of megatron-core's
    ``SequentialMLP`` (no grouped GEMM).

    Routing equals HF Mixtral's (softmax over all experts, top-k, renormalised over the k): megatron's softmax router
    with ``moe_router_pre_softmax=False`` takes the top-k logits and softmaxes over those k, the same probabilities.
    The router runs in fp32 (HF's softmax does); tokens reach the experts of other EP ranks through megatron's
    all-to-all dispatcher. The auxiliary load-balancing loss is on only where HF's model adds
    it to its loss (``output_router_logits=True``): then ``moe_aux_loss_coeff = router_aux_loss_coef``.
    ``sliding_window``, ``router_jitter_noise`` and top-1 routing have no megatron-core equivalent here and raise.
    """
    experts = _cfg(hf_config, "num_local_experts", "num_experts", default=None)
    topk = int(_cfg(hf_config, "num_experts_per_tok", default=2))
    if experts is None or int(experts) < 1:
        raise ValueError("a Mixtral config needs num_local_experts >= 1")
    experts = int(experts)
    if _cfg(hf_config, "sliding_window", default=None) is not None:
        raise NotImplementedError(f"sliding_window={_cfg(hf_config, 'sliding_window')} (Mixtral's sliding-window "
                                  "attention) is not expressed in this Megatron-core backend; set sliding_window=null "
                                  "in config.json if the model's context is within the window")
    jitter = float(_cfg(hf_config, "router_jitter_noise", default=0.0) or 0.0)
    if jitter > 0:
        raise NotImplementedError(f"router_jitter_noise={jitter}: HF Mixtral's multiplicative jitter on the MoE "
                                  "input has no megatron-core equivalent; set router_jitter_noise=0")
    if not 1 < topk <= experts:
        raise NotImplementedError(f"num_experts_per_tok={topk}: HF Mixtral renormalises the top-k probabilities (a "
                                  "weight of 1 for top-1), which megatron-core's router expresses for 1 < k <= "
                                  f"num_local_experts={experts} only")
    sizes = parallel if isinstance(parallel, ParallelSizes) else ParallelSizes.from_megatron_config(parallel)
    etp = sizes.get("expert_tensor_parallel_size")
    if etp is not None and etp != sizes["tensor_model_parallel_size"]:
        raise NotImplementedError(f"expert_tensor_parallel_size={etp}: the experts are split over TP like the dense "
                                  "MLP here; leave it unset (= tensor_model_parallel_size)")
    ep = sizes["expert_model_parallel_size"]
    if experts % ep:
        raise ValueError(f"expert_model_parallel_size={ep} does not divide num_local_experts={experts}; choose a "
                         "divisor of it")
    aux = float(_cfg(hf_config, "router_aux_loss_coef", default=0.0) or 0.0)
    use_aux = bool(_cfg(hf_config, "output_router_logits", default=False)) and aux > 0
    moe = dict(
        num_moe_experts=experts,
        moe_router_topk=topk,
        moe_ffn_hidden_size=int(_cfg(hf_config, "intermediate_size")),
        moe_router_score_function="softmax",
        moe_router_pre_softmax=False,
        moe_router_topk_scaling_factor=None,
        moe_router_dtype="fp32",
        moe_grouped_gemm=False,
        moe_router_load_balancing_type="aux_loss" if use_aux else "none",
        moe_aux_loss_coeff=aux if use_aux else 0.0,
        moe_input_jitter_eps=None,
        moe_permute_fusion=False,
        moe_router_fusion=False,
        # all-to-all (not all-gather) token dispatch: ranks of the expert-parallel group may hold different token
        # counts (dynamic batch sizes) and micro-batch shapes may vary (variable_seq_lengths, which megatron-core
        # refuses with the all-gather dispatcher); on CPU verl.utils.megatron_cpu stands in for its CUDA streams
        moe_token_dispatcher_type="alltoall",
    )
    moe.update(extra)
    return hf_to_mcore_config_dense(hf_config,
                                    dtype=dtype,
                                    parallel=sizes,
                                    override_transformer_config=override_transformer_config,
                                    **moe)
