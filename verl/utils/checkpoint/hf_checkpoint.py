"""Write a Hugging Face model directory from a full state dict (used by the FSDP checkpoint manager's ``hf_model``
content and by ``python -m verl.model_merger``).

The model is built on the meta device from its config (no memory, no random init) and the given tensors are
assigned to it, so ``save_pretrained`` applies the transformers version's own naming, tied-weight handling and
shard splitting; ``from_pretrained`` of the result then loads exactly those tensors.
"""
from __future__ import annotations

import copy
import inspect
import os
import shutil
from typing import Any, Optional

import torch

__all__ = ["HF_WEIGHT_SUFFIXES", "build_hf_model_on_meta", "copy_hf_assets", "save_hf_model_from_state_dict"]

# files that hold weights (or their index): everything else in an HF directory is an asset to carry over
HF_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".safetensors.index.json", ".bin.index.json")


def resolve_hf_model_class(config: Any) -> Optional[type]:
    """The transformers class named by ``config.architectures`` (None when it names none that transformers has)."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type):
            return cls
    return None


def build_hf_model_on_meta(config: Any, trust_remote_code: bool = False) -> torch.nn.Module:
    """An HF model of ``config`` on the meta device: the class from ``config.architectures``, else a causal LM."""
    cls = resolve_hf_model_class(config)
    with torch.device("meta"):
        if cls is not None:
            return cls._from_config(config) if hasattr(cls, "_from_config") else cls(config)
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def _floating_dtype(state_dict: dict[str, torch.Tensor]) -> Optional[torch.dtype]:
    for tensor in state_dict.values():
        if tensor.is_floating_point():
            return tensor.dtype
    return None


def _set_config_dtype(config: Any, dtype: torch.dtype) -> None:
    """Record the weights' dtype in the config, so ``from_pretrained(dtype="auto")`` loads them unchanged."""
    for attr in ("dtype", "torch_dtype"):
        try:
            setattr(config, attr, dtype)
        except Exception:  # noqa: BLE001 - some transformers versions expose only one of the two
            pass


def save_hf_model_from_state_dict(state_dict: dict[str, torch.Tensor],
                                  config: Any,
                                  target_dir: str,
                                  trust_remote_code: bool = False,
                                  max_shard_size: str | int = "5GB",
                                  generation_config: Any = None) -> None:
    """Save ``state_dict`` (HF parameter names, full tensors) as a Hugging Face model directory with ``config``
    (and ``generation_config`` when given; otherwise transformers writes the default one derived from the config).

    Raises ``ValueError`` naming missing or unexpected parameters when the state dict does not fit the model that
    ``config`` describes (e.g. a value model's checkpoint merged with a causal-LM config).
    """
    config = copy.deepcopy(config)
    model = build_hf_model_on_meta(config, trust_remote_code=trust_remote_code)
    result = model.load_state_dict(state_dict, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    still_meta = [name for name, p in model.named_parameters() if p.is_meta]
    if result.unexpected_keys or still_meta:
        raise ValueError(f"the weights do not match {type(model).__name__} built from the config: missing "
                         f"{still_meta[:8]}{' ...' if len(still_meta) > 8 else ''}, unexpected "
                         f"{result.unexpected_keys[:8]}{' ...' if len(result.unexpected_keys) > 8 else ''}; pass the "
                         "config of the model that was trained (--hf_model_config_path)")
    if generation_config is not None:
        model.generation_config = copy.deepcopy(generation_config)
    dtype = _floating_dtype(state_dict)
    if dtype is not None:
        _set_config_dtype(model.config, dtype)
    os.makedirs(target_dir, exist_ok=True)
    kwargs: dict[str, Any] = {"max_shard_size": max_shard_size}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True
    from transformers.utils import logging as hf_logging

    bars_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(target_dir, **kwargs)
    finally:
        if bars_on:
            hf_logging.enable_progress_bar()


def copy_hf_assets(src_dir: str, dst_dir: str) -> list[str]:
    """Copy tokenizer, processor, generation-config and chat-template files (everything but weights and
    ``config.json``) from ``src_dir`` to ``dst_dir``; return the copied file names."""
    copied = []
    os.makedirs(dst_dir, exist_ok=True)
    for name in sorted(os.listdir(src_dir)):
        src = os.path.join(src_dir, name)
        if not os.path.isfile(src) or name == "config.json" or name.endswith(HF_WEIGHT_SUFFIXES):
            continue
        shutil.copy2(src, os.path.join(dst_dir, name))
        copied.append(name)
    return copied
