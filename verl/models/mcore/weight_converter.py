"""Hugging Face <-> Megatron-core weight conversion for dense decoder LMs (Qwen2, Llama, ...): pure tensor code.

Megatron-core keeps one state dict per (tensor-parallel rank, pipeline stage, virtual-pipeline chunk); the names are
those of ``megatron.core.models.gpt.GPTModel`` (checked against megatron-core 0.16's ``gpt_model.py``,
``gpt_layer_specs.py``, ``attention.py`` and ``mlp.py``)::

    embedding.word_embeddings.weight                     first stage only, vocab-parallel (rows split over TP)
    decoder.layers.{i}.self_attention.linear_qkv.weight  column-parallel, fused QKV (see below)
    decoder.layers.{i}.self_attention.linear_qkv.bias    Qwen2 (add_qkv_bias)
    decoder.layers.{i}.self_attention.linear_qkv.layer_norm_weight   input RMSNorm, replicated
    decoder.layers.{i}.self_attention.linear_proj.weight row-parallel (columns split over TP)
    decoder.layers.{i}.mlp.linear_fc1.weight             column-parallel, [gate_shard; up_shard] on each TP rank
    decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight  post-attention RMSNorm, replicated
    decoder.layers.{i}.mlp.linear_fc2.weight             row-parallel
    decoder.final_layernorm.weight                       last stage only
    output_layer.weight                                  last stage only, vocab-parallel

``{i}`` is the layer's index *inside its chunk* (as ``model.state_dict()`` of that chunk writes it); the global layer
is ``offset + i`` with Megatron's even split ``offset = (vp_stage * pp_size + pp_rank) * num_layers / (pp_size *
vpp_size)``. The norm names above are those of the Transformer-Engine layer spec, where the norms are fused into the
following linear layer; with ``McoreLayout(fused_layernorm=False)`` (the local spec, no Transformer Engine) they are
``decoder.layers.{i}.input_layernorm.weight`` and ``decoder.layers.{i}.pre_mlp_layernorm.weight``.

Layouts:

* **Fused QKV**: Megatron's ``linear_qkv`` output is grouped by key/value head ("query group"): for each of the
  ``num_kv_heads`` groups, the group's ``num_heads / num_kv_heads`` query heads, then its key head, then its value
  head (``[q_g..., k_g, v_g]`` per group, each ``head_dim`` rows). TP rank ``r`` holds the ``r``-th of ``tp_size``
  contiguous row blocks of that tensor: whole groups when ``num_kv_heads >= tp_size``; when ``num_kv_heads <
  tp_size`` a block is part of a group, which megatron-core >= 0.16 supports (it all-gathers the QKV activations).
* **Gate/up**: ``linear_fc1`` of TP rank ``r`` is ``[gate_proj rows of r; up_proj rows of r]`` (Megatron's GLU takes
  the first half of the activation as the gated one), so the TP-gathered tensor is ``[g0; u0; g1; u1; ...]``.
* **Vocabulary**: the embedding and output layer are padded with zero rows to ``McoreLayout.padded_vocab_size`` (a
  multiple of ``make_vocab_size_divisible_by * tp_size``, Megatron-LM's rule; the default divisor 1 pads only when
  the vocabulary does not split evenly over TP) and split by rows; the padding is dropped on the way back. A model
  built with a padded vocabulary returns logits for the padding rows too: callers slice ``logits[..., :vocab_size]``.
* **Tied embeddings** (``tie_word_embeddings``): HF has only ``model.embed_tokens.weight``. With one pipeline stage
  Megatron has no ``output_layer.weight`` (it reuses the embedding); with several, the last stage keeps its own copy
  (Megatron keeps the two in sync), so the converter writes the embedding there and ignores it on the way back.

Entry points (also exported by :mod:`verl.models.mcore`):

* :func:`hf_to_mcore` / :func:`hf_to_mcore_rank`: an HF state dict to every rank's shards / one rank's shards.
* :func:`mcore_to_hf`: all ranks' shards back to an HF state dict.
* :func:`per_tensor_generator`: stream ``(hf_name, full tensor)`` from the shards, one Megatron parameter at a time;
  :func:`iter_hf_weights_in_buckets` groups that stream in lists of bounded size, as the rollout engines load them.
* :class:`DenseDecoderWeightConverter`: the per-parameter primitives (``mcore_param_names``, ``tp_split_dim``,
  ``mcore_to_hf_param``, ``hf_to_mcore_param``) that a distributed sharding manager uses with its own collectives.

Shards of all ranks are a ``dict`` keyed by ``(tp_rank, pp_rank)``; each value is a list with one state dict per
virtual-pipeline chunk (one element without virtual pipelining), in chunk order -- the layout of verl's list of
model chunks on a rank.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import torch

__all__ = [
    "McoreLayout",
    "DecoderDims",
    "DenseDecoderWeightConverter",
    "McoreShards",
    "hf_to_mcore",
    "hf_to_mcore_rank",
    "mcore_to_hf",
    "per_tensor_generator",
    "iter_hf_weights_in_buckets",
    "bucket_named_tensors",
]

#: Shards of all ranks: ``{(tp_rank, pp_rank): [state dict of virtual chunk 0, chunk 1, ...]}``; with expert
#: parallelism (``McoreLayout.ep_size > 1``) the keys are ``(tp_rank, pp_rank, ep_rank)``.
McoreShards = dict[tuple[int, ...], list[dict[str, torch.Tensor]]]

_EXTRA_STATE = "_extra_state"  # Transformer Engine's per-module FP8 metadata: no weight, never converted
_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"\.local_experts\.(\d+)\.")
_HF_LAYER = "model.layers.{}."


def _ceil_to(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


@dataclass(frozen=True)
class McoreLayout:
    """How a model is split over Megatron's tensor (``tp_size``), pipeline (``pp_size``) and virtual-pipeline
    (``vpp_size``, None = no interleaving) dimensions, the expert-parallel size of MoE layers (``ep_size``: EP rank
    ``r`` holds global experts ``r * E / ep_size ... (r + 1) * E / ep_size - 1``, megatron's numbering), plus the
    naming/padding choices of the model build.

    ``make_vocab_size_divisible_by``: the vocabulary is padded to a multiple of this times ``tp_size`` (Megatron-LM's
    rule; 1 = pad only as much as TP needs). ``fused_layernorm``: True for the Transformer-Engine layer spec (norm
    weights inside ``linear_qkv`` / ``linear_fc1``), False for the local spec (``input_layernorm`` /
    ``pre_mlp_layernorm`` modules).
    """

    tp_size: int = 1
    pp_size: int = 1
    vpp_size: Optional[int] = None
    make_vocab_size_divisible_by: int = 1
    fused_layernorm: bool = True
    ep_size: int = 1

    def __post_init__(self) -> None:
        for key in ("tp_size", "pp_size", "make_vocab_size_divisible_by", "ep_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"McoreLayout.{key} must be a positive int, got {value!r}")
        if self.vpp_size is not None:
            if not isinstance(self.vpp_size, int) or self.vpp_size < 1:
                raise ValueError(f"McoreLayout.vpp_size must be None or a positive int, got {self.vpp_size!r}")
            if self.vpp_size > 1 and self.pp_size == 1:
                raise ValueError("virtual_pipeline_model_parallel_size > 1 needs pipeline_model_parallel_size > 1; "
                                 "set virtual_pipeline_model_parallel_size=null")

    @property
    def num_chunks(self) -> int:
        """Model chunks per pipeline rank (the virtual-pipeline size, 1 without interleaving)."""
        return self.vpp_size or 1

    def ranks(self) -> list[tuple[int, ...]]:
        """All keys of :data:`McoreShards`: ``(tp_rank, pp_rank)`` pairs, or ``(tp_rank, pp_rank, ep_rank)`` with
        ``ep_size > 1``."""
        return [
            self.shard_key(t, p, e)
            for p in range(self.pp_size)
            for e in range(self.ep_size)
            for t in range(self.tp_size)
        ]

    def shard_key(self, tp_rank: int, pp_rank: int, ep_rank: int = 0) -> tuple[int, ...]:
        """The :data:`McoreShards` key of one rank."""
        return (tp_rank, pp_rank) if self.ep_size == 1 else (tp_rank, pp_rank, ep_rank)

    def padded_vocab_size(self, vocab_size: int) -> int:
        """Rows of the Megatron embedding / output layer for an HF vocabulary of ``vocab_size``."""
        return _ceil_to(int(vocab_size), self.make_vocab_size_divisible_by * self.tp_size)

    def layers_per_chunk(self, num_layers: int) -> int:
        parts = self.pp_size * self.num_chunks
        if num_layers % parts:
            raise ValueError(
                f"num_hidden_layers={num_layers} does not split evenly over pipeline_model_parallel_size="
                f"{self.pp_size} x virtual_pipeline_model_parallel_size={self.num_chunks}; choose sizes whose product "
                f"divides {num_layers}")
        return num_layers // parts

    def layer_offset(self, num_layers: int, pp_rank: int, vp_stage: int = 0) -> int:
        """Global index of the first layer of chunk ``vp_stage`` on pipeline rank ``pp_rank`` (Megatron's
        ``get_transformer_layer_offset`` for an even split)."""
        self._check_stage(pp_rank, vp_stage)
        return (vp_stage * self.pp_size + pp_rank) * self.layers_per_chunk(num_layers)

    def layer_range(self, num_layers: int, pp_rank: int, vp_stage: int = 0) -> range:
        """Global layer indices held by chunk ``vp_stage`` of pipeline rank ``pp_rank``."""
        start = self.layer_offset(num_layers, pp_rank, vp_stage)
        return range(start, start + self.layers_per_chunk(num_layers))

    def layer_owner(self, num_layers: int, layer: int) -> tuple[int, int, int]:
        """``(pp_rank, vp_stage, local index)`` of global layer ``layer``."""
        if not 0 <= layer < num_layers:
            raise ValueError(f"layer {layer} out of range for a {num_layers}-layer model")
        per = self.layers_per_chunk(num_layers)
        chunk, local = divmod(layer, per)
        vp_stage, pp_rank = divmod(chunk, self.pp_size)
        return pp_rank, vp_stage, local

    def is_first_stage(self, pp_rank: int, vp_stage: int = 0) -> bool:
        """The chunk that holds the embedding (Megatron's ``pre_process``)."""
        return pp_rank == 0 and vp_stage == 0

    def is_last_stage(self, pp_rank: int, vp_stage: int = 0) -> bool:
        """The chunk that holds the final norm and the output layer (Megatron's ``post_process``)."""
        return pp_rank == self.pp_size - 1 and vp_stage == self.num_chunks - 1

    def _check_stage(self, pp_rank: int, vp_stage: int) -> None:
        if not 0 <= pp_rank < self.pp_size:
            raise ValueError(f"pp_rank={pp_rank} out of range for pipeline_model_parallel_size={self.pp_size}")
        if not 0 <= vp_stage < self.num_chunks:
            raise ValueError(f"vp_stage={vp_stage} out of range for virtual_pipeline_model_parallel_size="
                             f"{self.num_chunks}")


def _cfg(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)
        if value is not None:
            return value
    return default


@dataclass(frozen=True)
class DecoderDims:
    """The shapes a dense decoder's conversion depends on, read from an HF config (object or dict)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # biases of q/k/v (Qwen2: always)
    linear_bias: bool = False  # biases of o_proj and the MLP (Megatron's add_bias_linear)

    @classmethod
    def from_hf_config(cls,
                       hf_config: Any,
                       qkv_bias: Optional[bool] = None,
                       linear_bias: Optional[bool] = None) -> "DecoderDims":
        """Dims of a Llama/Qwen2-style config. ``qkv_bias`` / ``linear_bias`` default to what the architecture
        implies: Qwen2 has q/k/v biases; Llama has ``attention_bias`` (q/k/v/o) and ``mlp_bias``."""
        hidden = int(_cfg(hf_config, "hidden_size"))
        heads = int(_cfg(hf_config, "num_attention_heads"))
        kv = int(_cfg(hf_config, "num_key_value_heads", default=heads))
        head_dim = int(_cfg(hf_config, "head_dim", default=hidden // heads))
        model_type = str(_cfg(hf_config, "model_type", default=""))
        if qkv_bias is None:
            qkv_bias = model_type == "qwen2" or bool(_cfg(hf_config, "attention_bias", default=False))
        if linear_bias is None:
            linear_bias = bool(_cfg(hf_config, "mlp_bias", default=False))
        if heads % kv:
            raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
        return cls(num_layers=int(_cfg(hf_config, "num_hidden_layers")),
                   hidden_size=hidden,
                   num_heads=heads,
                   num_kv_heads=kv,
                   head_dim=head_dim,
                   ffn_hidden_size=int(_cfg(hf_config, "intermediate_size")),
                   vocab_size=int(_cfg(hf_config, "vocab_size")),
                   tie_word_embeddings=bool(_cfg(hf_config, "tie_word_embeddings", default=False)),
                   qkv_bias=bool(qkv_bias),
                   linear_bias=bool(linear_bias))

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def qkv_rows(self) -> int:
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim


# kinds of conversion between the TP-gathered Megatron tensor and HF tensors
_COPY, _QKV, _GATE_UP, _VOCAB = "copy", "qkv", "gate_up", "vocab"


@dataclass(frozen=True)
class _Rule:
    mcore: str  # name (global layer index filled in for per-layer rules)
    hf: tuple[str, ...]  # HF names, in the order the kind expects
    kind: str
    tp_dim: Optional[int]  # dim split over TP; None = replicated on every TP rank


class DenseDecoderWeightConverter:
    """Conversion of one model (HF config + :class:`McoreLayout`) between HF names and Megatron's sharded layout.

    Works for any HF decoder with Llama's parameter names (``model.embed_tokens``, ``model.layers.N.self_attn.
    {q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``, ``input_layernorm``, ``post_attention_layernorm``, ``model.norm``,
    ``lm_head``): Llama, Qwen2, Mistral-like. Subclass and override :meth:`layer_rules` / :meth:`global_rules` for
    other names, and register the subclass with :func:`verl.models.mcore.register_mcore_model`.
    """

    def __init__(self, hf_config: Any, layout: McoreLayout, dims: Optional[DecoderDims] = None) -> None:
        self.hf_config = hf_config
        self.layout = layout
        self.dims = dims or DecoderDims.from_hf_config(hf_config)
        self.padded_vocab_size = layout.padded_vocab_size(self.dims.vocab_size)
        self.num_experts = self._num_experts()
        self._check_shapes()
        self._rules: dict[str, _Rule] = {}
        for rule in self.global_rules():
            self._rules[rule.mcore] = rule
        for layer in range(self.dims.num_layers):
            for rule in self.layer_rules(layer):
                self._rules[rule.mcore] = rule

    # ----------------------------------------------------------------------------------------------- rules -----
    def _num_experts(self) -> int:
        """Experts per MoE layer (0: a dense model; MoE converters override)."""
        return 0

    @property
    def num_local_experts(self) -> int:
        """Experts held by one expert-parallel rank."""
        return self.num_experts // self.layout.ep_size if self.num_experts else 0

    def expert_owner(self, name: str) -> Optional[tuple[int, int]]:
        """``(ep_rank, local expert index)`` of a Megatron expert parameter named with its *global* expert index;
        None for parameters that are not per-expert (replicated over the expert-parallel group)."""
        match = _EXPERT_RE.search(name)
        if not match or not self.num_experts:
            return None
        return divmod(int(match.group(1)), self.num_local_experts)

    def is_expert_param(self, name: str) -> bool:
        """Whether Megatron parameter ``name`` (local or global indices) is one expert's (split over EP)."""
        return bool(self.num_experts) and _EXPERT_RE.search(name) is not None

    def _check_shapes(self) -> None:
        d, tp = self.dims, self.layout.tp_size
        key = "tensor_model_parallel_size"
        if d.num_heads % tp:
            raise ValueError(f"{key}={tp} does not divide num_attention_heads={d.num_heads}; choose a divisor of it")
        if d.num_kv_heads >= tp and d.num_kv_heads % tp:
            raise ValueError(f"{key}={tp} does not divide num_key_value_heads={d.num_kv_heads}; choose a divisor of it")
        if d.num_kv_heads < tp and tp % d.num_kv_heads:
            raise ValueError(f"{key}={tp} is larger than num_key_value_heads={d.num_kv_heads} but not a multiple of "
                             "it; Megatron needs one of the two to divide the other")
        if d.ffn_hidden_size % tp:
            raise ValueError(f"{key}={tp} does not divide intermediate_size={d.ffn_hidden_size}")
        self.layout.layers_per_chunk(d.num_layers)  # raises if the layers do not split over PP x VPP
        if self.layout.ep_size > 1 and not self.num_experts:
            raise ValueError(f"expert_model_parallel_size={self.layout.ep_size} needs a mixture-of-experts model; "
                             f"this {type(self).__name__} has no experts: set expert_model_parallel_size=1")
        if self.num_experts and self.num_experts % self.layout.ep_size:
            raise ValueError(f"expert_model_parallel_size={self.layout.ep_size} does not divide the "
                             f"{self.num_experts} experts; choose a divisor of it")

    def global_rules(self) -> list[_Rule]:
        """Rules of the parameters outside the decoder layers."""
        rules = [
            _Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), _VOCAB, 0),
            _Rule("decoder.final_layernorm.weight", ("model.norm.weight",), _COPY, None),
        ]
        lm_head = "model.embed_tokens.weight" if self.dims.tie_word_embeddings else "lm_head.weight"
        rules.append(_Rule("output_layer.weight", (lm_head,), _VOCAB, 0))
        return rules

    def layer_rules(self, layer: int) -> list[_Rule]:
        """Rules of global decoder layer ``layer`` (Megatron names with the global index)."""
        m, h = f"decoder.layers.{layer}.", _HF_LAYER.format(layer)
        attn, mlp = h + "self_attn.", h + "mlp."
        fused = self.layout.fused_layernorm
        rules = [
            _Rule(m + ("self_attention.linear_qkv.layer_norm_weight" if fused else "input_layernorm.weight"),
                  (h + "input_layernorm.weight",), _COPY, None),
            _Rule(m + "self_attention.linear_qkv.weight",
                  (attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"), _QKV, 0),
            _Rule(m + "self_attention.linear_proj.weight", (attn + "o_proj.weight",), _COPY, 1),
            _Rule(m + ("mlp.linear_fc1.layer_norm_weight" if fused else "pre_mlp_layernorm.weight"),
                  (h + "post_attention_layernorm.weight",), _COPY, None),
            _Rule(m + "mlp.linear_fc1.weight", (mlp + "gate_proj.weight", mlp + "up_proj.weight"), _GATE_UP, 0),
            _Rule(m + "mlp.linear_fc2.weight", (mlp + "down_proj.weight",), _COPY, 1),
        ]
        if self.dims.qkv_bias:
            rules.append(
                _Rule(m + "self_attention.linear_qkv.bias",
                      (attn + "q_proj.bias", attn + "k_proj.bias", attn + "v_proj.bias"), _QKV, 0))
        if self.dims.linear_bias:  # row-parallel biases are added after the reduction: replicated
            rules += [
                _Rule(m + "self_attention.linear_proj.bias", (attn + "o_proj.bias",), _COPY, None),
                _Rule(m + "mlp.linear_fc1.bias", (mlp + "gate_proj.bias", mlp + "up_proj.bias"), _GATE_UP, 0),
                _Rule(m + "mlp.linear_fc2.bias", (mlp + "down_proj.bias",), _COPY, None),
            ]
        return rules

    def _rule(self, global_name: str) -> _Rule:
        try:
            return self._rules[global_name]
        except KeyError:
            raise KeyError(f"{global_name!r} is not a parameter of this model's Megatron layout "
                           f"({type(self).__name__}, {self.dims.num_layers} layers)") from None

    # ------------------------------------------------------------------------------------------------ names -----
    def has_output_weight(self, pp_rank: int, vp_stage: int = 0) -> bool:
        """Whether the last chunk owns an ``output_layer.weight`` (not when tied and built with the embedding)."""
        return not (self.dims.tie_word_embeddings and self.layout.is_first_stage(pp_rank, vp_stage))

    def mcore_param_names(self, pp_rank: int, vp_stage: int = 0, local: bool = True, ep_rank: int = 0) -> list[str]:
        """Megatron parameter names of one model chunk, in a fixed order that every rank agrees on (embedding,
        layers in order, final norm, output layer). ``local``: layer indices inside the chunk and expert indices
        inside expert-parallel rank ``ep_rank`` (as its ``state_dict()`` has them), else global indices. Only the
        experts of ``ep_rank`` are listed."""
        lay, d = self.layout, self.dims
        if not 0 <= ep_rank < lay.ep_size:
            raise ValueError(f"ep_rank={ep_rank} out of range for expert_model_parallel_size={lay.ep_size}")
        names: list[str] = []
        if lay.is_first_stage(pp_rank, vp_stage):
            names.append("embedding.word_embeddings.weight")
        offset = lay.layer_offset(d.num_layers, pp_rank, vp_stage)
        for layer in lay.layer_range(d.num_layers, pp_rank, vp_stage):
            prefix = f"decoder.layers.{layer}."
            for rule in self.layer_rules(layer):
                name = rule.mcore
                owner = self.expert_owner(name)
                if owner is not None and owner[0] != ep_rank:
                    continue
                if local:
                    name = f"decoder.layers.{layer - offset}.{name[len(prefix):]}"
                    if owner is not None:
                        name = _EXPERT_RE.sub(f".local_experts.{owner[1]}.", name, count=1)
                names.append(name)
        if lay.is_last_stage(pp_rank, vp_stage):
            names.append("decoder.final_layernorm.weight")
            if self.has_output_weight(pp_rank, vp_stage):
                names.append("output_layer.weight")
        return names

    def to_global_name(self, local_name: str, pp_rank: int, vp_stage: int = 0, ep_rank: int = 0) -> str:
        """Layer index inside chunk ``vp_stage`` of pipeline rank ``pp_rank`` -> global layer index (and the expert
        index inside expert-parallel rank ``ep_rank`` -> global expert index)."""
        match = _LAYER_RE.match(local_name)
        if not match:
            return local_name
        offset = self.layout.layer_offset(self.dims.num_layers, pp_rank, vp_stage)
        name = f"decoder.layers.{int(match.group(1)) + offset}.{match.group(2)}"
        expert = _EXPERT_RE.search(name)
        if expert and self.num_experts:
            name = _EXPERT_RE.sub(f".local_experts.{ep_rank * self.num_local_experts + int(expert.group(1))}.",
                                  name,
                                  count=1)
        return name

    def to_local_name(self, global_name: str) -> tuple[int, int, str]:
        """``(pp_rank, vp_stage, local name)`` of a Megatron name with a global layer index. The embedding lives on
        the first chunk, the final norm and output layer on the last. An expert's local name has its index inside
        its expert-parallel rank (:meth:`expert_owner` gives that rank)."""
        match = _LAYER_RE.match(global_name)
        if match:
            pp_rank, vp_stage, local = self.layout.layer_owner(self.dims.num_layers, int(match.group(1)))
            name = f"decoder.layers.{local}.{match.group(2)}"
            owner = self.expert_owner(global_name)
            if owner is not None:
                name = _EXPERT_RE.sub(f".local_experts.{owner[1]}.", name, count=1)
            return pp_rank, vp_stage, name
        if global_name.startswith("embedding."):
            return 0, 0, global_name
        return self.layout.pp_size - 1, self.layout.num_chunks - 1, global_name

    def tp_split_dim(self, name: str) -> Optional[int]:
        """The dim of Megatron parameter ``name`` (local or global layer index) split over TP, None if every TP
        rank holds all of it. Gathering the TP shards of a parameter is ``torch.cat(shards, dim)``."""
        match = _LAYER_RE.match(name)
        if match:
            name = _EXPERT_RE.sub(".local_experts.0.", f"decoder.layers.0.{match.group(2)}", count=1)
        return self._rule(name).tp_dim

    # ------------------------------------------------------------------------------------------- HF -> mcore -----
    def hf_to_mcore_param(self, global_name: str, hf_state_dict: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """TP shards (one per TP rank, in rank order) of Megatron parameter ``global_name`` built from the HF
        tensors. Replicated parameters give the same tensor for every rank."""
        rule = self._rule(global_name)
        tensors = []
        for hf_name in rule.hf:
            tensor = self._hf_tensor(hf_state_dict, hf_name)
            if tensor is None:
                raise KeyError(f"HF state dict has no {hf_name!r}, needed for Megatron {global_name!r}")
            tensors.append(tensor)
        tp = self.layout.tp_size
        if rule.kind == _QKV:
            return list(torch.chunk(self._fuse_qkv(*tensors), tp, dim=0))
        if rule.kind == _GATE_UP:
            gates, ups = torch.chunk(tensors[0], tp, dim=0), torch.chunk(tensors[1], tp, dim=0)
            return [torch.cat([g, u], dim=0) for g, u in zip(gates, ups)]
        if rule.kind == _VOCAB:
            return list(torch.chunk(self._pad_vocab(tensors[0]), tp, dim=0))
        if rule.tp_dim is None:
            return [tensors[0]] * tp
        return list(torch.chunk(tensors[0], tp, dim=rule.tp_dim))

    def _fuse_qkv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        d = self.dims
        tail = q.shape[1:]  # (hidden,) for weights, () for biases
        expect = {"q": (d.num_heads * d.head_dim,), "k": (d.num_kv_heads * d.head_dim,)}
        for label, t in (("q", q), ("k", k), ("v", v)):
            rows = expect["q" if label == "q" else "k"][0]
            if t.shape[0] != rows or t.shape[1:] != tail:
                raise ValueError(f"{label}_proj has shape {tuple(t.shape)}, expected ({rows}, *{tuple(tail)}) for "
                                 f"{d.num_heads} heads / {d.num_kv_heads} kv heads of dim {d.head_dim}")
        groups = (q.reshape(d.num_kv_heads, d.heads_per_group * d.head_dim,
                            *tail), k.reshape(d.num_kv_heads, d.head_dim,
                                              *tail), v.reshape(d.num_kv_heads, d.head_dim, *tail))
        return torch.cat(groups, dim=1).reshape(d.qkv_rows, *tail)

    def _pad_vocab(self, weight: torch.Tensor) -> torch.Tensor:
        rows = weight.shape[0]
        if rows != self.dims.vocab_size:
            raise ValueError(f"embedding/lm_head has {rows} rows but the config's vocab_size is "
                             f"{self.dims.vocab_size}")
        if self.padded_vocab_size == rows:
            return weight
        pad = weight.new_zeros((self.padded_vocab_size - rows, *weight.shape[1:]))
        return torch.cat([weight, pad], dim=0)

    def _hf_tensor(self, hf_state_dict: Mapping[str, torch.Tensor], hf_name: str) -> Optional[torch.Tensor]:
        """HF tensor ``hf_name`` (a checkpoint name) of ``hf_state_dict``, None if it has none. MoE converters
        override it to also read the fused expert tensors of a transformers-5 model's in-memory state dict."""
        return hf_state_dict[hf_name] if hf_name in hf_state_dict else None

    def hf_module_target(self, hf_name: str) -> Optional[tuple[str, tuple]]:
        """Where HF tensor ``hf_name`` (checkpoint naming, as this converter yields it) goes in an in-memory HF model
        whose parameter names differ: ``(parameter name, index)``; None when the names agree (dense models)."""
        return None

    def hf_state_dict_for_module(self, hf_state_dict: dict[str, torch.Tensor],
                                 module_names: set[str]) -> dict[str, torch.Tensor]:
        """``hf_state_dict`` (this converter's HF naming) renamed for an HF model whose parameter names are
        ``module_names``, for ``load_state_dict``; unchanged when the namings agree (dense models)."""
        return hf_state_dict

    def _hf_names_used(self) -> set[str]:
        """Names of an HF state dict that this converter reads (for ``strict``)."""
        return {hf for rule in self._rules.values() for hf in rule.hf}

    def hf_to_mcore_rank(self,
                         hf_state_dict: Mapping[str, torch.Tensor],
                         tp_rank: int,
                         pp_rank: int,
                         ep_rank: int = 0) -> list[dict[str, torch.Tensor]]:
        """The state dicts (one per virtual chunk) of TP rank ``tp_rank`` on pipeline rank ``pp_rank`` (and
        expert-parallel rank ``ep_rank``): what that rank loads into its model chunks. Tensors are slices (views) of
        the HF ones where possible; call ``.clone()`` / ``.contiguous()`` if they must own their memory."""
        if not 0 <= tp_rank < self.layout.tp_size:
            raise ValueError(f"tp_rank={tp_rank} out of range for tensor_model_parallel_size={self.layout.tp_size}")
        chunks = []
        for vp_stage in range(self.layout.num_chunks):
            local = self.mcore_param_names(pp_rank, vp_stage, local=True, ep_rank=ep_rank)
            global_ = self.mcore_param_names(pp_rank, vp_stage, local=False, ep_rank=ep_rank)
            chunks.append({
                ln: self.hf_to_mcore_param(gn, hf_state_dict)[tp_rank].contiguous() for ln, gn in zip(local, global_)
            })
        return chunks

    def hf_to_mcore(self, hf_state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> McoreShards:
        """Shards of every rank. ``strict``: an HF tensor that no Megatron parameter uses is an error (rotary
        ``inv_freq`` buffers and a tied ``lm_head.weight`` are always allowed)."""
        lay = self.layout
        shards: McoreShards = {rank: [] for rank in lay.ranks()}
        for pp_rank in range(lay.pp_size):
            for vp_stage in range(lay.num_chunks):
                for ep_rank in range(lay.ep_size):
                    per_tp: list[dict[str, torch.Tensor]] = [{} for _ in range(lay.tp_size)]
                    local = self.mcore_param_names(pp_rank, vp_stage, local=True, ep_rank=ep_rank)
                    global_ = self.mcore_param_names(pp_rank, vp_stage, local=False, ep_rank=ep_rank)
                    for ln, gn in zip(local, global_):
                        for tp_rank, tensor in enumerate(self.hf_to_mcore_param(gn, hf_state_dict)):
                            per_tp[tp_rank][ln] = tensor.contiguous()
                    for tp_rank, sd in enumerate(per_tp):
                        shards[lay.shard_key(tp_rank, pp_rank, ep_rank)].append(sd)
        if strict:
            used = self._hf_names_used()
            unused = [
                k for k in hf_state_dict if k not in used and not k.endswith("rotary_emb.inv_freq") and
                not (k == "lm_head.weight" and self.dims.tie_word_embeddings)
            ]
            if unused:
                raise ValueError(f"HF state dict has tensors that the Megatron layout does not hold: {unused[:8]}"
                                 f"{' ...' if len(unused) > 8 else ''}; pass strict=False to drop them, or register "
                                 "a converter for this architecture")
        return shards

    # ------------------------------------------------------------------------------------------- mcore -> HF -----
    def mcore_to_hf_param(self, global_name: str, tp_shards: Sequence[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
        """HF ``(name, tensor)`` pairs of Megatron parameter ``global_name`` from its TP shards (rank order; for a
        replicated parameter one shard is enough). Empty for the tied copy of the output layer."""
        rule = self._rule(global_name)
        if global_name == "output_layer.weight" and self.dims.tie_word_embeddings:
            return []
        tp = self.layout.tp_size
        if rule.tp_dim is None:
            return [(rule.hf[0], tp_shards[0])]
        if len(tp_shards) != tp:
            raise ValueError(f"{global_name}: got {len(tp_shards)} TP shards, expected tensor_model_parallel_size={tp}")
        if rule.kind == _GATE_UP:
            halves = [torch.chunk(s, 2, dim=0) for s in tp_shards]
            return [(rule.hf[0], torch.cat([h[0] for h in halves], dim=0)),
                    (rule.hf[1], torch.cat([h[1] for h in halves], dim=0))]
        full = torch.cat(list(tp_shards), dim=rule.tp_dim) if tp > 1 else tp_shards[0]
        if rule.kind == _QKV:
            return list(zip(rule.hf, self._split_qkv(full)))
        if rule.kind == _VOCAB:
            return [(rule.hf[0], full[:self.dims.vocab_size])]
        return [(rule.hf[0], full)]

    def _split_qkv(self, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        d = self.dims
        if fused.shape[0] != d.qkv_rows:
            raise ValueError(f"fused QKV has {fused.shape[0]} rows, expected {d.qkv_rows}")
        tail = fused.shape[1:]
        grouped = fused.reshape(d.num_kv_heads, (d.heads_per_group + 2) * d.head_dim, *tail)
        q, k, v = torch.split(grouped, [d.heads_per_group * d.head_dim, d.head_dim, d.head_dim], dim=1)
        return (q.reshape(d.num_heads * d.head_dim,
                          *tail), k.reshape(d.num_kv_heads * d.head_dim,
                                            *tail), v.reshape(d.num_kv_heads * d.head_dim, *tail))

    def iter_hf_tensors(
            self, get_tp_shards: Callable[[int, int, str, int],
                                          Sequence[torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Stream the HF tensors, one Megatron parameter at a time, in :meth:`mcore_param_names` order over
        ``pp_rank``, then ``vp_stage``, then ``ep_rank`` (expert parameters only for ``ep_rank > 0``).
        ``get_tp_shards(pp_rank, vp_stage, local_name, ep_rank)`` returns that parameter's TP shards (rank order): a
        dict look-up here, collectives in a distributed sharding manager (every rank walks the same sequence)."""
        lay = self.layout
        for pp_rank in range(lay.pp_size):
            for vp_stage in range(lay.num_chunks):
                for ep_rank in range(lay.ep_size):
                    local = self.mcore_param_names(pp_rank, vp_stage, local=True, ep_rank=ep_rank)
                    global_ = self.mcore_param_names(pp_rank, vp_stage, local=False, ep_rank=ep_rank)
                    for ln, gn in zip(local, global_):
                        if ep_rank and not self.is_expert_param(gn):
                            continue  # replicated over the expert-parallel group: taken from EP rank 0
                        if gn == "output_layer.weight" and self.dims.tie_word_embeddings:
                            continue  # the tied copy: HF has only the embedding
                        yield from self.mcore_to_hf_param(gn, get_tp_shards(pp_rank, vp_stage, ln, ep_rank))

    def per_tensor_generator(self,
                             shards: McoreShards,
                             dtype: Optional[torch.dtype] = None) -> Iterator[tuple[str, torch.Tensor]]:
        """``(hf_name, full tensor)`` for every HF weight, gathered from the shards of all ranks."""
        self._check_shards(shards)

        def lookup(pp_rank: int, vp_stage: int, name: str, ep_rank: int) -> list[torch.Tensor]:
            out = []
            for tp_rank in range(self.layout.tp_size):
                sd = shards[self.layout.shard_key(tp_rank, pp_rank, ep_rank)][vp_stage]
                if name not in sd:
                    raise KeyError(f"shard (tp_rank={tp_rank}, pp_rank={pp_rank}, ep_rank={ep_rank}, vp_stage="
                                   f"{vp_stage}) has no {name!r}")
                out.append(sd[name])
            return out

        for name, tensor in self.iter_hf_tensors(lookup):
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            yield name, tensor

    def _check_shards(self, shards: McoreShards) -> None:
        lay = self.layout
        what = "(tp_rank, pp_rank)" if lay.ep_size == 1 else "(tp_rank, pp_rank, ep_rank)"
        missing = [r for r in lay.ranks() if r not in shards]
        if missing:
            raise KeyError(f"shards are missing ranks {what} {missing[:8]} of tp_size={lay.tp_size}, "
                           f"pp_size={lay.pp_size}, ep_size={lay.ep_size}")
        for key, chunks in shards.items():
            if key not in set(lay.ranks()):
                raise KeyError(f"shard key {key} is not a rank {what} of tp_size={lay.tp_size}, "
                               f"pp_size={lay.pp_size}, ep_size={lay.ep_size}")
            pp_rank, ep_rank = key[1], (key[2] if len(key) > 2 else 0)
            if len(chunks) != lay.num_chunks:
                raise ValueError(f"rank {key} has {len(chunks)} model chunks, expected "
                                 f"virtual_pipeline_model_parallel_size={lay.num_chunks}")
            for vp_stage, sd in enumerate(chunks):
                expected = set(self.mcore_param_names(pp_rank, vp_stage, local=True, ep_rank=ep_rank))
                extra = [k for k in sd if k not in expected and not k.endswith(_EXTRA_STATE)]
                if extra:
                    raise ValueError(f"rank {key} chunk {vp_stage} has parameters this converter does not know: "
                                     f"{extra[:8]}")

    def mcore_to_hf(self, shards: McoreShards) -> dict[str, torch.Tensor]:
        """The HF state dict (tied models: no ``lm_head.weight``) from the shards of all ranks."""
        return dict(self.per_tensor_generator(shards))


# ---------------------------------------------------------------------------------------------- functions -----
def _converter(hf_config: Any, layout: Optional[McoreLayout], **layout_kwargs: Any) -> DenseDecoderWeightConverter:
    from verl.models.mcore.registry import get_weight_converter

    if layout is None:
        layout = McoreLayout(**layout_kwargs)
    elif layout_kwargs:
        raise TypeError(f"pass either layout= or the layout fields {sorted(layout_kwargs)}, not both")
    return get_weight_converter(hf_config, layout)


def hf_to_mcore(hf_state_dict: Mapping[str, torch.Tensor],
                hf_config: Any,
                layout: Optional[McoreLayout] = None,
                *,
                strict: bool = True,
                **layout_kwargs: Any) -> McoreShards:
    """Split an HF state dict into Megatron shards of every rank: ``{(tp_rank, pp_rank): [chunk state dicts]}``.

    ``layout`` or its fields (``tp_size``, ``pp_size``, ``vpp_size``, ``make_vocab_size_divisible_by``,
    ``fused_layernorm``) as keywords; the architecture is looked up in :mod:`verl.models.mcore.registry`.
    """
    return _converter(hf_config, layout, **layout_kwargs).hf_to_mcore(hf_state_dict, strict=strict)


def hf_to_mcore_rank(hf_state_dict: Mapping[str, torch.Tensor],
                     hf_config: Any,
                     tp_rank: int,
                     pp_rank: int,
                     layout: Optional[McoreLayout] = None,
                     ep_rank: int = 0,
                     **layout_kwargs: Any) -> list[dict[str, torch.Tensor]]:
    """One rank's Megatron state dicts (one per virtual chunk), e.g. to load a pretrained HF model on that rank."""
    return _converter(hf_config, layout, **layout_kwargs).hf_to_mcore_rank(hf_state_dict, tp_rank, pp_rank, ep_rank)


def mcore_to_hf(shards: McoreShards,
                hf_config: Any,
                layout: Optional[McoreLayout] = None,
                **layout_kwargs: Any) -> dict[str, torch.Tensor]:
    """Merge the Megatron shards of every rank back into an HF state dict."""
    return _converter(hf_config, layout, **layout_kwargs).mcore_to_hf(shards)


def per_tensor_generator(shards: McoreShards,
                         hf_config: Any,
                         layout: Optional[McoreLayout] = None,
                         *,
                         dtype: Optional[torch.dtype] = None,
                         **layout_kwargs: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, full tensor)`` from the shards of every rank, one Megatron parameter at a time (a fused QKV
    yields three tensors, gate/up two), so at most one gathered parameter is alive beyond what the consumer keeps.
    ``dtype`` casts floating tensors (e.g. bf16 for a rollout engine)."""
    return _converter(hf_config, layout, **layout_kwargs).per_tensor_generator(shards, dtype=dtype)


def bucket_named_tensors(named_tensors: Iterable[tuple[str, torch.Tensor]],
                         bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group a ``(name, tensor)`` stream in lists of at most ``bucket_bytes`` (a tensor larger than that is a list
    of its own), in stream order."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def iter_hf_weights_in_buckets(shards: McoreShards,
                               hf_config: Any,
                               layout: Optional[McoreLayout] = None,
                               *,
                               bucket_bytes: int = 512 << 20,
                               dtype: Optional[torch.dtype] = None,
                               **layout_kwargs: Any) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """:func:`per_tensor_generator` grouped in lists of at most ``bucket_bytes`` (the unit a rollout engine's
    ``load_weights`` / ``update_weights`` receives; ``rollout.update_weights_bucket_megabytes`` in the config)."""
    stream = per_tensor_generator(shards, hf_config, layout, dtype=dtype, **layout_kwargs)
    return bucket_named_tensors(stream, bucket_bytes)
