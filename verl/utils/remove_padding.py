"""Remove padding: pack the valid tokens of a padded batch into one sequence, run the model once, and map back.

RL batches are left-padded prompts followed by right-padded responses, so a large share of a padded batch is pad
tokens. With ``use_remove_padding`` the actor and critic drop them: the valid tokens of all rows are concatenated into
a batch of one sequence, ``position_ids`` restart at 0 for each original row, and attention must stay inside each row.

How attention stays inside a row depends on the backend, and this module picks it:

* flash-attention 2/3 in transformers reads the row boundaries from ``position_ids`` (varlen kernel, no mask);
* transformers >= 4.56 (``masking_utils.find_packed_sequence_indices``) builds a block-diagonal causal mask from
  ``position_ids`` for SDPA / eager / flex attention when ``attention_mask`` is ``None``;
* otherwise an explicit 4-D block-diagonal causal mask (additive, 0 / dtype-min) is passed, which SDPA and eager
  attention of every transformers version accept.

``unpad_input`` / ``pad_input`` / ``index_first_axis`` are pure-torch versions of flash-attn's ``bert_padding``
helpers with the same call conventions, so code written against those works here.
"""
from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "index_first_axis",
    "unpad_input",
    "pad_input",
    "get_unpad_data",
    "build_packed_causal_mask",
    "packed_mask_mode",
    "forward_response_positions",
    "scatter_to_response",
]


def index_first_axis(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Rows ``indices`` of ``x`` along the first axis (differentiable; gradient scatters back)."""
    return x.reshape(x.shape[0], *x.shape[1:])[indices]


def get_unpad_data(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(indices, cu_seqlens, max_seqlen)`` of the valid tokens of a ``(batch, seqlen)`` 0/1 mask.

    ``indices`` index the flattened ``(batch * seqlen)`` positions; ``cu_seqlens`` (int32, length batch+1) are the
    cumulative valid lengths, the layout varlen attention kernels take.
    """
    seqlens = attention_mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(attention_mask.flatten(), as_tuple=False).flatten()
    max_seqlen = int(seqlens.max().item()) if seqlens.numel() else 0
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    return indices, cu_seqlens, max_seqlen


def unpad_input(hidden_states: torch.Tensor, attention_mask: torch.Tensor):
    """Drop padded positions: ``(batch, seqlen, ...)`` -> ``(total_valid, ...)``.

    Returns ``(hidden_states_unpad, indices, cu_seqlens, max_seqlen_in_batch, seqused)`` like flash-attn >= 2.6
    (``seqused`` = valid length per row, int32); unpack with ``x, indices, *_ = unpad_input(...)``.
    """
    if hidden_states.shape[:2] != attention_mask.shape:
        raise ValueError(f"unpad_input: hidden_states {tuple(hidden_states.shape)} and attention_mask "
                         f"{tuple(attention_mask.shape)} disagree on (batch, seqlen)")
    indices, cu_seqlens, max_seqlen = get_unpad_data(attention_mask)
    seqused = attention_mask.sum(dim=-1, dtype=torch.int32)
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
    return index_first_axis(flat, indices), indices, cu_seqlens, max_seqlen, seqused


def pad_input(hidden_states: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Inverse of :func:`unpad_input`: ``(total_valid, ...)`` -> ``(batch, seqlen, ...)`` with zeros at pads."""
    out = hidden_states.new_zeros((batch * seqlen, *hidden_states.shape[1:]))
    out = out.index_put((indices,), hidden_states)
    return out.reshape(batch, seqlen, *hidden_states.shape[1:])


def build_packed_causal_mask(cu_seqlens: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive ``(1, 1, T, T)`` mask: 0 where query i may attend key j (same row, j <= i), dtype-min elsewhere.

    Used only where the backend cannot derive row boundaries from ``position_ids``; it costs T^2 memory.
    """
    total = int(cu_seqlens[-1].item())
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device=device, dtype=torch.long)
    row = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)
    pos = torch.arange(total, device=device)
    allowed = (row[:, None] == row[None, :]) & (pos[None, :] <= pos[:, None])
    mask = torch.zeros((total, total), dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


@lru_cache(maxsize=None)
def _transformers_detects_packing() -> bool:
    try:
        from transformers import masking_utils
    except ImportError:
        return False
    return hasattr(masking_utils, "find_packed_sequence_indices")


def _attn_implementation(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None) or getattr(config, "attn_implementation", None)
    return str(impl or "eager")


def packed_mask_mode(model: torch.nn.Module) -> str:
    """``"position_ids"`` when the model's attention separates packed rows from ``position_ids`` alone, else
    ``"explicit"`` (pass a 4-D block-diagonal mask)."""
    impl = _attn_implementation(model)
    if "flash" in impl or _transformers_detects_packing():
        return "position_ids"
    return "explicit"


def has_varlen_attention(model: torch.nn.Module) -> bool:
    """Whether ``model`` attends over packed rows with a variable-length kernel (flash-attention).

    Without one, a packed micro-batch of ``total`` tokens attends through a ``(total, total)`` block-diagonal mask
    (built by transformers or by :func:`build_packed_causal_mask`): ``O(total^2)`` work, far more than the padded
    batch's ``O(batch * seqlen^2)``; measured 4x slower per SFT step on CPU (SDPA, 64 rows x ~60 tokens).
    """
    return "flash" in _attn_implementation(model)


def _padded_forward(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    position_ids: torch.Tensor, r: int, keep_logits: bool, kwargs: dict[str, Any]) -> torch.Tensor:
    """Logits ``(batch, r, ...)`` at the positions predicting the last ``r`` tokens, from the padded batch.

    Columns that are padding in every row before the first valid token (prompts left-padded to
    ``data.max_prompt_length``) are cut first: they are masked out of every row's attention, so the logits are the
    same, and a batch of short prompts costs what its longest prompt needs."""
    seqlen = input_ids.shape[1]
    valid_columns = attention_mask.bool().any(dim=0).nonzero()
    first = int(valid_columns[0]) if valid_columns.numel() else 0
    first = min(first, seqlen - r - 1)  # keep every position that predicts a response token
    if keep_logits:
        kwargs["logits_to_keep"] = r + 1
    output = model(input_ids=input_ids[:, first:],
                   attention_mask=attention_mask[:, first:],
                   position_ids=position_ids[:, first:],
                   **kwargs)
    return _output_logits(output)[:, -r - 1:-1]


@lru_cache(maxsize=None)
def _forward_params(cls: type) -> frozenset[str]:
    try:
        return frozenset(inspect.signature(cls.forward).parameters)
    except (TypeError, ValueError):
        return frozenset()


def _supports_logits_to_keep(model: torch.nn.Module) -> bool:
    return "logits_to_keep" in _forward_params(type(model))


def _output_logits(output: Any) -> torch.Tensor:
    """Logits of a HF output object, or the value head of a ``(lm_logits, loss, value)`` tuple (trl value-head)."""
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)):
        return output[2] if len(output) >= 3 else output[0]
    if isinstance(output, torch.Tensor):
        return output
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


def forward_response_positions(model: torch.nn.Module,
                               input_ids: torch.Tensor,
                               attention_mask: torch.Tensor,
                               position_ids: torch.Tensor,
                               response_length: int,
                               use_remove_padding: bool = False,
                               packed_mask: str | None = None,
                               **model_kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` and return its logits at the positions that predict the response tokens.

    Response token ``j`` of row ``b`` (the last ``response_length`` columns) is predicted by position
    ``seqlen - response_length - 1 + j``. Returns ``(logits, selected)``: ``selected`` is a ``(batch,
    response_length)`` bool mask of the positions computed and ``logits`` holds them in row-major order,
    ``(selected.sum(), ...)``; put per-token results back with :func:`scatter_to_response`.

    Padded path: all positions are selected. With ``use_remove_padding`` only valid (attention_mask 1) positions are
    returned; they are computed in one packed sequence where the attention has a varlen kernel (flash-attention),
    else on the padded batch (see :func:`has_varlen_attention`: packing without varlen costs more than padding). Causal-LM heads are evaluated only at the selected positions when the model
    takes ``logits_to_keep``. ``packed_mask`` (``"position_ids"`` / ``"explicit"``) forces packing with that mask
    mode instead of :func:`packed_mask_mode`.
    """
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} must be "
                         "the same (batch, seqlen) shape")
    if position_ids.shape != input_ids.shape:
        raise ValueError(f"position_ids {tuple(position_ids.shape)} must have input_ids' shape "
                         f"{tuple(input_ids.shape)} (3-D rope position ids are not supported here)")
    batch, seqlen = input_ids.shape
    r = int(response_length)
    if not 0 < r < seqlen:
        raise ValueError(f"response_length {r} must be in [1, seqlen-1] for sequences of length {seqlen}")
    keep_logits = _supports_logits_to_keep(model)
    kwargs = dict(model_kwargs)
    kwargs["use_cache"] = False

    if not use_remove_padding:
        logits = _padded_forward(model, input_ids, attention_mask, position_ids, r, keep_logits, kwargs)
        selected = torch.ones((batch, r), dtype=torch.bool, device=input_ids.device)
        return logits.reshape(batch * r, *logits.shape[2:]), selected

    mask = attention_mask.bool()
    indices, cu_seqlens, _ = get_unpad_data(mask)
    pos_rmpad = position_ids.flatten()[indices].unsqueeze(0)
    starts = cu_seqlens[:-1][cu_seqlens[1:] > cu_seqlens[:-1]].long()
    if starts.numel() and bool((pos_rmpad[0, starts] != 0).any()):
        raise ValueError("use_remove_padding needs position_ids that are 0 at each row's first valid token (compute "
                         "them as clamp(cumsum(attention_mask) - 1, min=0)); got rows starting at "
                         f"{pos_rmpad[0, starts].tolist()}")
    if packed_mask is None and not has_varlen_attention(model):
        # no varlen kernel: the padded batch gives the same logits for less work (see has_varlen_attention)
        selected = mask[:, seqlen - r - 1:seqlen - 1]
        return _padded_forward(model, input_ids, attention_mask, position_ids, r, keep_logits,
                               kwargs)[selected], selected
    ids_rmpad = input_ids.flatten()[indices].unsqueeze(0)  # (1, total)
    # packed index of each padded position (valid ones only), and the positions predicting response tokens
    packed_index = (torch.cumsum(mask.flatten().long(), dim=0) - 1).view(batch, seqlen)
    selected = mask[:, seqlen - r - 1:seqlen - 1]
    keep = packed_index[:, seqlen - r - 1:seqlen - 1][selected]

    mode = packed_mask or packed_mask_mode(model)
    if mode == "explicit":
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        attn = build_packed_causal_mask(cu_seqlens, dtype=dtype, device=input_ids.device)
    elif mode == "position_ids":
        attn = None
    else:
        raise ValueError(f"packed_mask must be 'position_ids' or 'explicit', got {mode!r}")
    if keep_logits:
        kwargs["logits_to_keep"] = keep
    output = model(input_ids=ids_rmpad, attention_mask=attn, position_ids=pos_rmpad, **kwargs)
    logits = _output_logits(output)[0]
    if not keep_logits:
        logits = logits[keep]
    return logits, selected


def scatter_to_response(values: torch.Tensor, selected: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Place per-position ``values`` (``(selected.sum(), ...)``) into a ``(batch, response_length, ...)`` tensor,
    ``fill`` elsewhere. Differentiable."""
    out = values.new_full((*selected.shape, *values.shape[1:]), fill)
    return out.index_put((selected,), values)
