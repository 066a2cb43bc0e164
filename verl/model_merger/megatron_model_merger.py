"""Merge a Megatron dist checkpoint into full Hugging Face tensors, offline (no process group, no GPU).

:class:`~verl.utils.checkpoint.megatron_checkpoint_manager.MegatronCheckpointManager` writes
``<step>/actor/dist_ckpt`` with megatron-core's ``torch_dist`` format: a PyTorch distributed checkpoint (DCP) whose
tensors are stored under megatron's *global* keys and shapes, whatever TP / PP / VPP sizes wrote it. Each rank saved
its slice at its offset inside the global tensor, so reading a key with DCP as one plain tensor yields the full,
sharding-free parameter:

* decoder layers are stacked: ``decoder.layers.<name>`` has shape ``(num_layers, *param_shape)`` (or, when saved
  with megatron's ``non_homogeneous_layers`` / ``singleton_local_shards`` options, one key per global layer,
  ``decoder.layers.<i>.<name>``);
* TP-split parameters are the concatenation of the TP shards, i.e. what a TP=1 model holds: the fused QKV grouped by
  query group, the embedding and output layer padded to the padded vocabulary; the GLU ``linear_fc1`` is stored as
  ``[gate; up]`` (megatron re-chunks it per TP rank on save; ``<key>_w`` / ``<key>_v`` halves with
  ``singleton_local_shards``);
* the layer norms carry Transformer Engine's names (``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``)
  with either layer spec (megatron's local spec maps its ``input_layernorm`` / ``pre_mlp_layernorm`` to them on save);
  the local names are accepted too;
* a tied output layer on the last pipeline stage is saved as a replica of the embedding (no key of its own);
* MoE experts (megatron's ``SequentialMLP``) are saved under their *global* expert index, whatever the expert-parallel
  size: ``decoder.layers.mlp.experts.experts.<name>`` of shape ``(num_layers, num_experts, *param_shape)`` (or, with
  ``singleton_local_shards``, ``...experts.experts.<e>.<name>``); an MoE layer's ``pre_mlp_layernorm`` is saved as
  ``mlp.linear_fc1.layer_norm_weight`` like the dense one. :func:`expand_experts` turns them back into the names
  of a one-rank model (``mlp.experts.local_experts.<e>.<name>``, ``pre_mlp_layernorm.weight``).

The merger reads only the model's keys (not the optimizer's), rebuilds the state dict of a TP=1 / PP=1 model and
hands it to the architecture's weight converter from :mod:`verl.models.mcore` with ``McoreLayout()`` (one rank), which
splits the fused QKV / gate-up tensors and drops the vocabulary padding. Weights come out in the dtype the model
trained in (bf16 under mixed precision; the fp32 master copy lives in the optimizer state).
"""
from __future__ import annotations

import json
import os
import re
import warnings
from typing import Any, Optional

import torch

from verl.model_merger.base_model_merger import BaseModelMerger
from verl.utils.checkpoint.megatron_checkpoint_manager import DIST_SUBDIR, META_FILE

__all__ = [
    "MegatronModelMerger", "expand_experts", "load_megatron_model_tensors", "merge_megatron_checkpoint",
    "unstack_layers"
]

_MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")
_LAYER_KEY_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_STACKED_PREFIX = "decoder.layers."
_EXPERTS_KEY_RE = re.compile(r"^(decoder\.layers\.\d+\.mlp\.experts\.)experts\.(?:(\d+)\.)?(.+)$")
_MOE_NORM_RE = re.compile(r"^(decoder\.layers\.\d+\.)mlp\.linear_fc1\.layer_norm_weight$")


def _expected_files_message(local_dir: str) -> str:
    hint = ""
    roles = [d for d in ("actor", "critic") if os.path.isdir(os.path.join(local_dir, d))]
    if roles:
        hint = f"; this looks like a step directory, did you mean --local_dir {os.path.join(local_dir, roles[0])}?"
    elif os.path.isfile(os.path.join(local_dir, "fsdp_config.json")) or any(
            name.startswith("model_world_size_") for name in os.listdir(local_dir)):
        hint = "; this is an FSDP checkpoint: use --backend fsdp"
    return (f"{local_dir} is not a Megatron checkpoint directory: expected {DIST_SUBDIR}/ (megatron-core dist "
            "checkpoint) and huggingface/config.json, as written by MegatronCheckpointManager under "
            f"<default_local_dir>/global_step_N/actor{hint}")


def _read_meta(local_dir: str) -> dict[str, Any]:
    path = os.path.join(local_dir, META_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _check_dist_dir(local_dir: str) -> str:
    """The dist checkpoint directory of ``local_dir``; clear errors for a wrong, model-less or foreign-format one."""
    if not os.path.isdir(local_dir):
        raise FileNotFoundError(f"checkpoint directory {local_dir} does not exist")
    ckpt_dir = os.path.join(local_dir, DIST_SUBDIR)
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(_expected_files_message(local_dir))
    meta = _read_meta(local_dir)
    if meta and "model" not in meta.get("contents", ["model"]):
        raise FileNotFoundError(f"checkpoint {local_dir} was saved without model weights (save_contents="
                                f"{meta['contents']}); save with 'model' in actor.checkpoint.save_contents")
    info_path = os.path.join(ckpt_dir, "metadata.json")
    if not os.path.isfile(info_path) or not os.path.isfile(os.path.join(ckpt_dir, ".metadata")):
        raise FileNotFoundError(f"{ckpt_dir} is an incomplete megatron dist checkpoint (metadata.json or .metadata is "
                                "missing): the save was interrupted or files were lost; merge another global_step_N")
    with open(info_path, encoding="utf-8") as f:
        backend = json.load(f).get("sharded_backend")
    if backend != "torch_dist":
        raise ValueError(f"{ckpt_dir} uses megatron's {backend!r} sharded format; the merger reads 'torch_dist' (the "
                         "default of megatron-core and of verl's MegatronCheckpointManager): convert the checkpoint "
                         "with megatron's dist_checkpointing tools or re-save it")
    return ckpt_dir


def load_megatron_model_tensors(ckpt_dir: str) -> dict[str, torch.Tensor]:
    """Every model tensor of a ``torch_dist`` dist checkpoint as one full tensor per megatron key (optimizer and other
    state skipped), read with PyTorch DCP in this process alone."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(ckpt_dir)
    metadata = reader.read_metadata()
    state: dict[str, torch.Tensor] = {}
    for key, info in metadata.state_dict_metadata.items():
        if isinstance(info, TensorStorageMetadata) and key.startswith(_MODEL_PREFIXES):
            state[key] = torch.empty(info.size, dtype=info.properties.dtype)
    if not state:
        raise FileNotFoundError(f"{ckpt_dir} holds no model tensors (keys {_MODEL_PREFIXES}): it was saved without "
                                "'model' in checkpoint.save_contents, or by a model this merger does not know")
    with warnings.catch_warnings():  # reading in one process is the point here, not a mistake to warn about
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        load(state, storage_reader=reader, no_dist=True)
    return state


def unstack_layers(tensors: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Megatron keys -> the state dict of a one-rank model: stacked ``decoder.layers.<name>`` split into
    ``decoder.layers.<i>.<name>``, and ``<key>_w`` / ``<key>_v`` GLU halves joined into ``<key>``."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if key.startswith(_STACKED_PREFIX) and not _LAYER_KEY_RE.match(key):
            rest = key[len(_STACKED_PREFIX):]
            if tensor.shape[0] != num_layers:
                raise ValueError(f"the checkpoint has {tensor.shape[0]} decoder layers ({key} has shape "
                                 f"{tuple(tensor.shape)}) but the HF config has num_hidden_layers={num_layers}; pass "
                                 "the config of the trained model with --hf_model_config_path")
            for layer in range(num_layers):
                out[f"{_STACKED_PREFIX}{layer}.{rest}"] = tensor[layer]
        else:
            out[key] = tensor
    for key in [k for k in out if k.endswith("_w")]:
        base = key[:-2]
        if base + "_v" in out and base not in out:
            out[base] = torch.cat([out.pop(key), out.pop(base + "_v")], dim=0)
    layers = {int(m.group(1)) for m in map(_LAYER_KEY_RE.match, out) if m}
    if layers and layers != set(range(num_layers)):
        raise ValueError(f"the checkpoint has {len(layers)} decoder layers (indices {min(layers)}..{max(layers)}) "
                         f"but the HF config has num_hidden_layers={num_layers}; pass the config of the trained "
                         "model with --hf_model_config_path")
    return out


def expand_experts(state: dict[str, torch.Tensor], num_experts: int) -> dict[str, torch.Tensor]:
    """Per-layer MoE keys of a dist checkpoint -> a one-rank MoE model's names: the expert-stacked
    ``...mlp.experts.experts.<name>`` (``(num_experts, *shape)``) or singleton ``...experts.experts.<e>.<name>`` become
    ``...mlp.experts.local_experts.<e>.<name>``; the MoE layer's norm ``mlp.linear_fc1.layer_norm_weight`` becomes
    ``pre_mlp_layernorm.weight`` (an MoE layer has no ``linear_fc1`` of its own)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        match = _EXPERTS_KEY_RE.match(key)
        if match:
            prefix, expert, rest = match.groups()
            if expert is not None:
                out[f"{prefix}local_experts.{expert}.{rest}"] = tensor
                continue
            if tensor.shape[0] != num_experts:
                raise ValueError(f"{key} holds {tensor.shape[0]} experts but the HF config has {num_experts}; pass "
                                 "the config of the trained model with --hf_model_config_path")
            for e in range(num_experts):
                out[f"{prefix}local_experts.{e}.{rest}"] = tensor[e]
            continue
        norm = _MOE_NORM_RE.match(key)
        out[f"{norm.group(1)}pre_mlp_layernorm.weight" if norm else key] = tensor
    return out


class MegatronModelMerger(BaseModelMerger):
    """``python -m verl.model_merger merge --backend megatron --local_dir .../actor --target_dir OUT``."""

    backend = "megatron"

    def _check_architecture(self, hf_config: Any) -> None:
        """Fail before reading any tensor when no converter of :mod:`verl.models.mcore` handles the config."""
        from verl.models.mcore import get_architecture, get_mcore_model_entry

        try:
            get_mcore_model_entry(hf_config)
        except NotImplementedError as exc:
            raise NotImplementedError(f"{self.config.hf_model_config_path}/config.json names architecture "
                                      f"{get_architecture(hf_config)!r}, which the Megatron merger cannot convert: "
                                      f"{exc}") from None

    def merge_state_dict(self) -> dict[str, torch.Tensor]:
        """The HF state dict (full tensors, HF names) of the checkpoint's model."""
        from verl.models.mcore import McoreLayout, get_weight_converter

        ckpt_dir = _check_dist_dir(self.config.local_dir)
        hf_config = self.load_hf_config()
        self._check_architecture(hf_config)
        tensors = load_megatron_model_tensors(ckpt_dir)
        num_layers = int(getattr(hf_config, "num_hidden_layers", 0) or 0)
        state = unstack_layers(tensors, num_layers)
        head = state.get("output_layer.weight")
        if head is not None and head.shape[0] == 1:
            raise NotImplementedError(f"{self.config.local_dir} holds a value model (a one-output head in place of "
                                      "the LM head: a critic or reward model); the Megatron merger converts "
                                      "causal-LM (actor) checkpoints, e.g. --local_dir <step>/actor")
        fused = any(k.endswith("self_attention.linear_qkv.layer_norm_weight") for k in state)
        try:
            converter = get_weight_converter(hf_config, McoreLayout(fused_layernorm=fused))
        except ValueError as exc:
            raise ValueError(f"{self.config.hf_model_config_path}/config.json: {exc}") from None
        if converter.num_experts:
            state = expand_experts(state, converter.num_experts)
        if converter.dims.tie_word_embeddings:
            state.pop("output_layer.weight", None)  # a tied copy, if one was written, is the embedding
        try:
            merged = converter.mcore_to_hf({(0, 0): [state]})
        except (KeyError, ValueError) as exc:
            msg = exc.args[0] if exc.args else exc
            raise ValueError(f"the dist checkpoint in {ckpt_dir} does not fit the model of "
                             f"{self.config.hf_model_config_path}/config.json ({msg}); pass the config of the trained "
                             "model with --hf_model_config_path") from None
        merged = self._check_shapes(merged, hf_config, converter)
        return {name: tensor.contiguous() for name, tensor in merged.items()}

    def _check_shapes(self, merged: dict[str, torch.Tensor], hf_config: Any, converter: Any) -> dict[str, torch.Tensor]:
        """Compare with the model the config describes (built on the meta device), so that a config of another size
        gives an error naming the tensor instead of a failure inside ``load_state_dict``. Returns the state dict in
        that model's parameter naming (transformers 5 keeps Mixtral's experts fused in memory, and saves them back
        in the checkpoint naming)."""
        from verl.utils.checkpoint.hf_checkpoint import build_hf_model_on_meta

        model = build_hf_model_on_meta(hf_config, trust_remote_code=self.config.trust_remote_code)
        expected = dict(model.named_parameters())
        merged = converter.hf_state_dict_for_module(merged, set(expected))
        for name, tensor in merged.items():
            want = expected.get(name)
            if want is not None and tuple(want.shape) != tuple(tensor.shape):
                raise ValueError(f"merged {name} has shape {tuple(tensor.shape)} but {self.config.hf_model_config_path}"
                                 f"/config.json describes {tuple(want.shape)}; pass the config of the trained model "
                                 "with --hf_model_config_path")
        return merged


def merge_megatron_checkpoint(local_dir: str, target_dir: str, hf_model_config_path: Optional[str] = None) -> str:
    """Python entry point of the merge: write ``target_dir`` and return it."""
    return MegatronModelMerger.merge_checkpoint(local_dir, target_dir, hf_model_config_path)
