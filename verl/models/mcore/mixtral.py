"""Mixtral (``MixtralForCausalLM``) <-> Megatron-core MoE weights, and the two Hugging Face namings of its experts.

Megatron-core (the local layer spec with ``num_experts``, ``SequentialMLP`` experts, checked against megatron-core
0.16's ``moe_layer.py``, ``router.py`` and ``experts.py``) names each MoE layer's tensors::

    decoder.layers.{i}.pre_mlp_layernorm.weight                           replicated (with either layer spec: MoE
                                                                          layers have no linear_fc1 to fuse it into)
    decoder.layers.{i}.mlp.router.weight                  (E, H)          replicated over TP and EP
    decoder.layers.{i}.mlp.experts.local_experts.{k}.linear_fc1.weight    (2I/TP, H), [gate; up] per TP rank
    decoder.layers.{i}.mlp.experts.local_experts.{k}.linear_fc2.weight    (H, I/TP), row-parallel

``{k}`` is the expert's index on its expert-parallel rank: EP rank ``r`` holds global experts ``r * E/EP ... (r+1) *
E/EP - 1`` (megatron's ``local_expert_indices``); the converter's *global* names carry the global expert index, its
*local* names (``mcore_param_names(..., local=True, ep_rank=r)``) the index inside rank ``r``. The experts are split
over TP like the dense MLP (``expert_tensor_parallel_size`` = ``tensor_model_parallel_size``).

Hugging Face has two namings of the same tensors:

* **checkpoint** (``model.safetensors`` written by ``save_pretrained``, and what vLLM's and SGLang's Mixtral loaders
  take): ``model.layers.{i}.block_sparse_moe.gate.weight`` (E, H) and one tensor per expert,
  ``model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight`` (gate, (I, H)), ``w3`` (up, (I, H)), ``w2`` (down,
  (H, I));
* **in memory** in transformers >= 5 (``model.state_dict()``; transformers converts on load and save):
  ``model.layers.{i}.mlp.gate.weight`` and the experts fused, ``model.layers.{i}.mlp.experts.gate_up_proj``
  (E, 2I, H) = ``[w1; w3]`` per expert and ``model.layers.{i}.mlp.experts.down_proj`` (E, H, I). transformers 4 kept
  the checkpoint names in memory.

The converter speaks the checkpoint naming (its output feeds the engines and the merger's ``save``); on input it
also accepts the in-memory one. :func:`mixtral_to_checkpoint_names` / :func:`mixtral_to_in_memory_names` map whole
state dicts; :func:`mixtral_module_target` maps one checkpoint name to the slice of an in-memory parameter, which is
how the HF rollout model (:class:`verl.workers.sharding_manager.megatron_hf.HFModuleWeightLoader`) takes a streamed
expert tensor. These three live in :mod:`verl.models.moe_names` (torch only, shared with the FSDP engine syncs) and
are re-exported here.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from verl.models.mcore.weight_converter import _COPY, _GATE_UP, _HF_LAYER, DenseDecoderWeightConverter, _cfg, _Rule
from verl.models.moe_names import (MIXTRAL_IN_MEMORY_EXPERTS_RE, mixtral_module_target, mixtral_to_checkpoint_names,
                                   mixtral_to_in_memory_names)

__all__ = [
    "MixtralWeightConverter",
    "mixtral_to_checkpoint_names",
    "mixtral_to_in_memory_names",
    "mixtral_module_target",
]


def _num_experts(hf_config: Any) -> int:
    value = _cfg(hf_config, "num_local_experts", "num_experts", default=None)
    if value is None:
        raise ValueError("a Mixtral config needs num_local_experts")
    return int(value)


class MixtralWeightConverter(DenseDecoderWeightConverter):
    """:class:`DenseDecoderWeightConverter` with Mixtral's sparse MoE layers (see the module docstring for the names):
    router <-> ``block_sparse_moe.gate``, expert ``linear_fc1`` <-> ``[w1; w3]``, ``linear_fc2`` <-> ``w2``, for any
    TP x PP (x VPP) x EP layout."""

    def _num_experts(self) -> int:
        return _num_experts(self.hf_config)

    def layer_rules(self, layer: int) -> list[_Rule]:
        m, h = f"decoder.layers.{layer}.", _HF_LAYER.format(layer)
        moe = h + "block_sparse_moe."
        dense_mlp = (m + "mlp.", m + "pre_mlp_layernorm.")
        rules = [r for r in super().layer_rules(layer) if not r.mcore.startswith(dense_mlp)]
        rules.append(_Rule(m + "pre_mlp_layernorm.weight", (h + "post_attention_layernorm.weight",), _COPY, None))
        rules.append(_Rule(m + "mlp.router.weight", (moe + "gate.weight",), _COPY, None))
        for e in range(self.num_experts):
            src, dst = f"{moe}experts.{e}.", f"{m}mlp.experts.local_experts.{e}."
            rules.append(_Rule(dst + "linear_fc1.weight", (src + "w1.weight", src + "w3.weight"), _GATE_UP, 0))
            rules.append(_Rule(dst + "linear_fc2.weight", (src + "w2.weight",), _COPY, 1))
        return rules

    def _hf_tensor(self, hf_state_dict: Mapping[str, torch.Tensor], hf_name: str) -> Optional[torch.Tensor]:
        if hf_name in hf_state_dict:
            return hf_state_dict[hf_name]
        target = self.hf_module_target(hf_name)
        if target is None or target[0] not in hf_state_dict:
            return None
        name, index = target
        return hf_state_dict[name][index]

    def _hf_names_used(self) -> set[str]:
        used = super()._hf_names_used()
        for layer in range(self.dims.num_layers):
            prefix = f"model.layers.{layer}.mlp."
            used.update({prefix + "gate.weight", prefix + "experts.gate_up_proj", prefix + "experts.down_proj"})
        return used

    def hf_state_dict_for_module(self, hf_state_dict: dict[str, torch.Tensor],
                                 module_names: set[str]) -> dict[str, torch.Tensor]:
        """The in-memory naming (:func:`mixtral_to_in_memory_names`) when the module has fused experts
        (transformers >= 5), else the checkpoint naming unchanged (transformers 4)."""
        if any(MIXTRAL_IN_MEMORY_EXPERTS_RE.match(name) for name in module_names):
            return mixtral_to_in_memory_names(hf_state_dict)
        return hf_state_dict

    def hf_module_target(self, hf_name: str) -> Optional[tuple[str, tuple]]:
        """:func:`mixtral_module_target` for this model's expert size."""
        return mixtral_module_target(hf_name, self.dims.ffn_hidden_size)
