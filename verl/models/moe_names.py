"""The two Hugging Face namings of a mixture-of-experts model's weights, and the converter the engine syncs use.

transformers >= 5 holds some MoE models' experts fused in memory, while their checkpoints (``save_pretrained``
converts on save) and the engines' loaders (vLLM, SGLang) keep one tensor per expert. For Mixtral
(``MixtralForCausalLM``):

* **checkpoint**: ``model.layers.{i}.block_sparse_moe.gate.weight`` (E, H) and, per expert,
  ``model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight`` (gate, (I, H)), ``w3`` (up, (I, H)), ``w2`` (down,
  (H, I));
* **in memory** (transformers >= 5, ``model.state_dict()``): ``model.layers.{i}.mlp.gate.weight`` and the fused
  ``model.layers.{i}.mlp.experts.gate_up_proj`` (E, 2I, H) = ``[w1; w3]`` per expert and
  ``model.layers.{i}.mlp.experts.down_proj`` (E, H, I). transformers 4 kept the checkpoint names in memory.

A sync that streams the HF module's own state into an engine must send the checkpoint naming:
:func:`checkpoint_name_converter` returns, for a model (or its config), the function that maps one in-memory
``(name, tensor)`` to the checkpoint-named tensors (views, no copies), the identity for dense models. Other MoE
architectures join with :func:`register_checkpoint_name_converter`.

This module needs only torch: the Megatron converter (:mod:`verl.models.mcore.mixtral`) and the FSDP engine syncs
(:class:`verl.workers.sharding_manager.fsdp_hf.FSDPWeightSource`) both use it, and megatron-core stays optional.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Optional

import torch

__all__ = [
    "CheckpointNameConverter",
    "checkpoint_name_converter",
    "register_checkpoint_name_converter",
    "mixtral_tensor_to_checkpoint_names",
    "mixtral_to_checkpoint_names",
    "mixtral_to_in_memory_names",
    "mixtral_module_target",
    "MIXTRAL_IN_MEMORY_EXPERTS_RE",
]

# one in-memory (name, tensor) -> its checkpoint-named tensors
CheckpointNameConverter = Callable[[str, torch.Tensor], list[tuple[str, torch.Tensor]]]

_CKPT_EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")
_CKPT_GATE_RE = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight$")
MIXTRAL_IN_MEMORY_EXPERTS_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_MEM_GATE_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.gate\.weight$")


# ------------------------------------------------------------------------------------------------ Mixtral ----
def mixtral_module_target(name: str, intermediate_size: int) -> Optional[tuple[str, tuple]]:
    """Where checkpoint-named tensor ``name`` goes in a transformers-5 Mixtral module: ``(parameter name, index)``
    with ``parameter[index]`` of the tensor's shape; None for names that are the same in both namings."""
    match = _CKPT_EXPERT_RE.match(name)
    if match:
        layer, expert, which = int(match.group(1)), int(match.group(2)), match.group(3)
        prefix = f"model.layers.{layer}.mlp.experts."
        if which == "w2":
            return prefix + "down_proj", (expert,)
        rows = slice(0, intermediate_size) if which == "w1" else slice(intermediate_size, 2 * intermediate_size)
        return prefix + "gate_up_proj", (expert, rows)
    match = _CKPT_GATE_RE.match(name)
    if match:
        return f"model.layers.{match.group(1)}.mlp.gate.weight", ()
    return None


def mixtral_tensor_to_checkpoint_names(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """One tensor of a Mixtral state dict in the checkpoint naming: a fused in-memory expert tensor becomes one view
    per expert (``w1``/``w3`` from ``gate_up_proj``, ``w2`` from ``down_proj``), the router is renamed, any other
    name (or an already checkpoint-named tensor, transformers 4) passes through."""
    match = MIXTRAL_IN_MEMORY_EXPERTS_RE.match(name)
    if match:
        prefix = f"model.layers.{match.group(1)}.block_sparse_moe.experts."
        out: list[tuple[str, torch.Tensor]] = []
        for expert in range(tensor.shape[0]):
            if match.group(2) == "down_proj":
                out.append((f"{prefix}{expert}.w2.weight", tensor[expert]))
            else:
                gate, up = torch.chunk(tensor[expert], 2, dim=0)
                out.append((f"{prefix}{expert}.w1.weight", gate))
                out.append((f"{prefix}{expert}.w3.weight", up))
        return out
    match = _MEM_GATE_RE.match(name)
    return [(f"model.layers.{match.group(1)}.block_sparse_moe.gate.weight" if match else name, tensor)]


def mixtral_to_checkpoint_names(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Mixtral state dict in the checkpoint naming (per-expert ``block_sparse_moe.experts.{e}.w1/w2/w3``); the
    in-memory fused tensors of transformers 5 are split (views), other names pass through."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        out.update(mixtral_tensor_to_checkpoint_names(name, tensor))
    return out


def mixtral_to_in_memory_names(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Mixtral state dict in transformers 5's in-memory naming (``mlp.gate``, fused ``mlp.experts.gate_up_proj`` /
    ``down_proj``), what ``model.load_state_dict`` of a transformers-5 ``MixtralForCausalLM`` takes."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for name, tensor in state_dict.items():
        match = _CKPT_EXPERT_RE.match(name)
        if match:
            experts.setdefault((int(match.group(1)), match.group(3)), {})[int(match.group(2))] = tensor
            continue
        match = _CKPT_GATE_RE.match(name)
        out[f"model.layers.{match.group(1)}.mlp.gate.weight" if match else name] = tensor
    for layer in sorted({layer for layer, _ in experts}):
        parts = {w: experts.get((layer, w), {}) for w in ("w1", "w2", "w3")}
        count = len(parts["w1"])
        if any(sorted(p) != list(range(count)) for p in parts.values()):
            raise ValueError(f"layer {layer}: the experts' w1/w2/w3 tensors are incomplete "
                             f"({ {w: sorted(p) for w, p in parts.items()} })")
        prefix = f"model.layers.{layer}.mlp.experts."
        out[prefix + "gate_up_proj"] = torch.stack(
            [torch.cat([parts["w1"][e], parts["w3"][e]], dim=0) for e in range(count)])
        out[prefix + "down_proj"] = torch.stack([parts["w2"][e] for e in range(count)])
    return out


# ----------------------------------------------------------------------------------------------- registry ----
_CONVERTERS: dict[str, CheckpointNameConverter] = {"mixtral": mixtral_tensor_to_checkpoint_names}


def register_checkpoint_name_converter(model_type: str, converter: CheckpointNameConverter) -> None:
    """Make :func:`checkpoint_name_converter` return ``converter`` for configs of ``model_type`` (the HF config's
    ``model_type``, e.g. ``mixtral``)."""
    _CONVERTERS[str(model_type)] = converter


def _identity(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    return [(name, tensor)]


def _model_type(model_or_config: Any) -> Optional[str]:
    """``model_type`` of an HF config (object or dict) or of a model's config (possibly wrapped: FSDP1,
    ``torch.compile``)."""
    if model_or_config is None:
        return None
    if isinstance(model_or_config, Mapping):
        return model_or_config.get("model_type")
    if isinstance(getattr(model_or_config, "model_type", None), str):
        return model_or_config.model_type
    config = getattr(model_or_config, "config", None)
    if config is not None:
        return _model_type(config)
    inner = getattr(model_or_config, "_fsdp_wrapped_module", None) or getattr(model_or_config, "_orig_mod", None)
    return _model_type(inner)


def checkpoint_name_converter(model_or_config: Any) -> CheckpointNameConverter:
    """The function mapping one ``(name, tensor)`` of this model's in-memory state (``model.state_dict()``) to the
    checkpoint-named tensors that vLLM's / SGLang's loaders take; the identity for architectures whose two namings
    agree (dense models). Takes the model (FSDP-wrapped or not) or its HF config (object or dict)."""
    return _CONVERTERS.get(str(_model_type(model_or_config)), _identity)
