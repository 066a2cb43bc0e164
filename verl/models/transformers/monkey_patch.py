"""Ulysses sequence parallelism for Hugging Face decoder models through transformers' attention interface.

transformers >= 4.48 (and 5.x) looks every attention call up in ``ALL_ATTENTION_FUNCTIONS`` by
``config._attn_implementation`` (``sdpa``, ``flash_attention_2``, ...), passing the attention module, the
rotary-embedded ``(batch, heads, seq, head_dim)`` queries/keys/values, the mask and ``position_ids`` in the kwargs.
:func:`apply_monkey_patch` wraps that entry once (for the model's implementation) and marks the model's attention
modules with the sp size. For a marked module, inside an sp group of that size (see
:class:`~verl.workers.sharding_manager.fsdp_ulysses.FSDPUlyssesShardingManager`), the wrapper

1. repeats the key/value heads when their number does not split over the sp ranks,
2. all-to-alls the sequence-sharded queries/keys/values into head-sharded ones over the whole packed sequence,
3. runs the original attention with the all-gathered ``position_ids``; for SDPA it passes the block-diagonal causal
   mask of the packed rows (rows end where positions stop increasing by one, as in
   ``transformers.masking_utils.find_packed_sequence_indices``), flash-attention derives its varlen boundaries from
   the position ids itself,
4. all-to-alls the output back to sequence-sharded.

Everything else (unmarked modules, or no sp group) goes to the original function unchanged, so a patched model
still runs without sequence parallelism and other models in the process are unaffected.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from verl.utils.ulysses import (all_gather_tensor, gather_heads_scatter_seq, gather_seq_scatter_heads,
                                get_ulysses_sequence_parallel_group, get_ulysses_sequence_parallel_world_size,
                                validate_ulysses_config)

__all__ = ["apply_monkey_patch", "SUPPORTED_ATTN_IMPLEMENTATIONS"]

#: attention implementations the Ulysses wrapper supports (``eager`` and ``flex_attention`` are not in the registry
#: or need their own mask objects).
SUPPORTED_ATTN_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4")

_SP_ATTR = "_verl_ulysses_sp_size"
# the all-gathered position ids (and SDPA mask) of the current forward, keyed by the local position-id tensor that
# every layer of one forward receives
_CACHE: dict[str, Any] = {}
_FLASH_VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def _repeat_heads(x: torch.Tensor, times: int) -> torch.Tensor:
    """``(b, h, s, d)`` -> ``(b, h * times, s, d)``, each head repeated ``times`` times in place (GQA layout)."""
    if times == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, times, s, d).reshape(b, h * times, s, d)


def _packed_causal_mask(positions: torch.Tensor, sliding_window: int | None) -> torch.Tensor | None:
    """Boolean ``(1, 1, T, T)``: query i may attend key j when both are in the same packed row and j <= i (and
    within ``sliding_window`` tokens); None (plain causal attention) for a single row without a window. The mask
    costs T^2 bytes: for long sequences use flash-attention, which needs none."""
    pos = positions[0]
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[1:] = (pos[1:] - pos[:-1]) != 1
    if not sliding_window and not bool(starts[1:].any()):
        return None
    segment = torch.cumsum(starts.long(), dim=0)
    idx = torch.arange(pos.numel(), device=pos.device)
    allowed = (segment[:, None] == segment[None, :]) & (idx[None, :] <= idx[:, None])
    if sliding_window:
        allowed &= (idx[:, None] - idx[None, :]) < int(sliding_window)
    return allowed[None, None]


def _full_positions(local_positions: torch.Tensor | None, group: Any, base: str,
                    sliding_window: int | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """All-gathered position ids and, for SDPA, the packed causal mask; computed once per forward."""
    if local_positions is None:
        return None, None
    if local_positions.dim() != 2 or local_positions.shape[0] != 1:
        raise ValueError(f"Ulysses attention needs (1, seq) position ids of one packed sequence, got "
                         f"{tuple(local_positions.shape)}")
    key = (base, sliding_window)
    if _CACHE.get("local") is not local_positions:
        _CACHE.clear()
        _CACHE["local"] = local_positions
        _CACHE["full"] = all_gather_tensor(local_positions, dim=1, group=group)
    full = _CACHE["full"]
    if base != "sdpa":
        return full, None
    if key not in _CACHE:
        _CACHE[key] = _packed_causal_mask(full, sliding_window)
    return full, _CACHE[key]


def _ulysses_attention(original: Callable, base: str, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                       value: torch.Tensor, group: Any, sp: int, *args: Any,
                       **kwargs: Any) -> tuple[torch.Tensor, None]:
    if query.shape[0] != 1:
        raise ValueError(f"Ulysses attention runs on one packed sequence (batch 1, use_remove_padding=True); got a "
                         f"batch of {query.shape[0]}")
    repeats = sp // math.gcd(key.shape[1], sp)  # kv heads repeated until they split over the sp ranks
    key, value = _repeat_heads(key, repeats), _repeat_heads(value, repeats)
    # (1, heads, T/sp, d) -> (1, heads/sp, T, d)
    query = gather_seq_scatter_heads(query, seq_dim=2, head_dim=1, group=group)
    key = gather_seq_scatter_heads(key, seq_dim=2, head_dim=1, group=group)
    value = gather_seq_scatter_heads(value, seq_dim=2, head_dim=1, group=group)
    full_positions, mask = _full_positions(kwargs.get("position_ids"), group, base, kwargs.get("sliding_window"))
    for name in _FLASH_VARLEN_KWARGS:  # computed by the caller from the local slice; let the kernel use the full ids
        kwargs.pop(name, None)
    if full_positions is not None:
        kwargs["position_ids"] = full_positions
    groups = getattr(module, "num_key_value_groups", None)
    if repeats > 1 and groups is not None:
        module.num_key_value_groups = groups // repeats
    try:
        output, _ = original(module, query, key, value, mask, *args, **kwargs)
    finally:
        if repeats > 1 and groups is not None:
            module.num_key_value_groups = groups
    # (1, T, heads/sp, d) -> (1, T/sp, heads, d)
    return gather_heads_scatter_seq(output, head_dim=2, seq_dim=1, group=group), None


def _make_wrapper(base: str, original: Callable) -> Callable:

    def ulysses_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: Any, *args: Any, **kwargs: Any):
        sp_size = getattr(module, _SP_ATTR, 1)
        group = get_ulysses_sequence_parallel_group() if sp_size > 1 else None
        sp = get_ulysses_sequence_parallel_world_size(group) if group is not None else 1
        if sp == 1:
            return original(module, query, key, value, attention_mask, *args, **kwargs)
        if sp != sp_size:
            raise RuntimeError(f"the model was patched for ulysses_sequence_parallel_size={sp_size} but the current sp "
                               f"group has {sp} ranks")
        return _ulysses_attention(original, base, module, query, key, value, group, sp, *args, **kwargs)

    ulysses_attention.verl_ulysses_original = original
    return ulysses_attention


def _install(base: str) -> None:
    """Wrap ``ALL_ATTENTION_FUNCTIONS[base]`` once per process."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    current = ALL_ATTENTION_FUNCTIONS[base]
    if getattr(current, "verl_ulysses_original", None) is not None:
        return
    AttentionInterface.register(base, _make_wrapper(base, current))


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "num_key_value_groups") and hasattr(m, "head_dim")]


def apply_monkey_patch(model: torch.nn.Module,
                       ulysses_sp_size: int = 1,
                       use_remove_padding: bool = True,
                       use_fused_kernels: bool = False,
                       fused_kernels_backend: str | None = None) -> None:
    """Prepare ``model`` (a transformers decoder: Qwen2, Llama, ...) for Ulysses sequence parallelism of size
    ``ulysses_sp_size``; a no-op for 1. Raises a clear error when it cannot work: no remove-padding, heads not
    divisible by the sp size, or an attention implementation other than SDPA / flash-attention."""
    if use_fused_kernels:
        raise NotImplementedError("model.use_fused_kernels=True is not supported by this verl; set "
                                  "actor_rollout_ref.model.use_fused_kernels=False")
    sp = int(ulysses_sp_size or 1)
    if sp < 1:
        raise ValueError(f"ulysses_sequence_parallel_size must be >= 1, got {ulysses_sp_size}")
    if sp == 1:
        return
    if not use_remove_padding:
        raise ValueError(f"ulysses_sequence_parallel_size={sp} splits the packed (remove-padding) sequence over ranks "
                         "and needs use_remove_padding=True; set actor_rollout_ref.model.use_remove_padding=True (and "
                         "critic.model.use_remove_padding=True for the critic)")
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no transformers config; Ulysses needs a Hugging Face model")
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    validate_ulysses_config(int(text_config.num_attention_heads), sp)
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl not in SUPPORTED_ATTN_IMPLEMENTATIONS:
        raise ValueError(f"ulysses_sequence_parallel_size={sp} supports attn_implementation in "
                         f"{list(SUPPORTED_ATTN_IMPLEMENTATIONS)}, but the model uses {impl!r}; set "
                         "model.override_config.attn_implementation=sdpa (or flash_attention_2)")
    modules = _attention_modules(model)
    if not modules:
        raise ValueError(
            f"found no attention modules (with num_key_value_groups and head_dim) in "
            f"{type(model).__name__}; Ulysses supports transformers decoder models such as Qwen2 and Llama")
    _install(impl)
    for module in modules:
        setattr(module, _SP_ATTR, sp)
