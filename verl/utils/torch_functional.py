"""Tensor helpers shared by the algorithm code, the workers and the rollouts.

Everything here is pure torch, works on any device and keeps the leading (batch, time) layout of its inputs.

Sections:

* masked statistics: ``masked_sum``, ``masked_mean``, ``masked_var``, ``masked_whiten``
* log-probabilities from logits: ``logprobs_from_logits``, ``entropy_from_logits`` (row-chunked so that a large
  vocabulary never needs a second full-size float copy at once)
* masks and padding: ``clip_by_value``, ``get_response_mask``, ``compute_position_id_with_mask``,
  ``pad_2d_list_to_length``, ``pad_sequence_to_length``
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

__all__ = [
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "logprobs_from_logits",
    "entropy_from_logits",
    "clip_by_value",
    "get_response_mask",
    "compute_position_id_with_mask",
    "pad_2d_list_to_length",
    "pad_sequence_to_length",
]

Axis = int | Sequence[int] | None

# ---------------------------------------------------------------------------------------------------------------
# masked statistics
# ---------------------------------------------------------------------------------------------------------------


def _masked_values(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values * mask`` that stays finite where the mask is 0 even if ``values`` holds inf/nan there (padding)."""
    mask = mask.to(values.dtype) if values.is_floating_point() else mask.to(torch.float32)
    product = values * mask
    return torch.where(mask != 0, product, torch.zeros_like(product))


def masked_sum(values: torch.Tensor, mask: torch.Tensor, axis: Axis = None) -> torch.Tensor:
    """Sum of ``values`` where ``mask`` is set (``mask`` may be bool, int or float weights)."""
    masked = _masked_values(values, mask)
    return masked.sum() if axis is None else masked.sum(dim=axis)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, axis: Axis = None) -> torch.Tensor:
    """Mean of ``values`` over the positions where ``mask`` is set; 0 where the mask is empty (no NaN)."""
    total = masked_sum(values, mask, axis)
    count = masked_sum(torch.ones_like(values, dtype=total.dtype), mask, axis)
    return total / count.clamp(min=1e-8)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``values`` over the masked positions (scalar). With ``unbiased`` the Bessel factor n/(n-1) is
    applied when at least two positions are set; with fewer the (biased) value 0 is returned instead of inf/NaN, so
    whitening a one-token batch gives zeros rather than crashing."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean)**2, mask)
    if unbiased:
        count = masked_sum(torch.ones_like(values, dtype=variance.dtype), mask)
        bessel = torch.where(count > 1, count / (count - 1).clamp(min=1.0), torch.ones_like(count))
        variance = variance * bessel
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise ``values`` to zero mean and unit variance, statistics taken over the masked positions only (every
    position is transformed). ``shift_mean=False`` keeps the original mean (only rescales)."""
    mean = masked_mean(values, mask)
    var = masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


# ---------------------------------------------------------------------------------------------------------------
# log-probabilities and entropy
# ---------------------------------------------------------------------------------------------------------------

# rows per chunk are chosen so that one chunk's float32 copy of the logits stays around this many elements (~256 MiB)
_CHUNK_ELEMENTS = 1 << 26


def _rows_per_chunk(vocab: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}")
        return int(chunk_size)
    return max(1, _CHUNK_ELEMENTS // max(1, vocab))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # half-precision logits lose too much in logsumexp: compute in float32; float64 stays float64
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class _ChunkedLogProbs(torch.autograd.Function):
    """``z[label] - logsumexp(z)`` over chunks of rows, with a backward that writes each chunk's gradient straight
    into one buffer of the logits' dtype.

    Differentiating a loop over ``logits[start:end]`` slices costs a full-size zero tensor and an add per chunk in the
    backward (a slice's gradient is the whole tensor), and keeps every chunk's float32 copy alive for logsumexp's
    backward: on a GPU micro-batch of 4096 x 151,936 bf16 logits that is ~10 full-size passes more than needed. Here
    the forward keeps only the per-row logsumexp, and the backward recomputes ``softmax = exp(z - lse)`` one chunk at
    a time. Optionally also returns the entropy ``lse - sum(softmax * z)`` of each row from the same pass, without a
    gradient (the PPO update's metrics-only entropy).
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, labels: torch.Tensor, step: int,
                with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
        rows = logits.shape[0]
        out_dtype = _compute_dtype(logits.dtype)
        log_probs = torch.empty(rows, dtype=out_dtype, device=logits.device)
        lse = torch.empty(rows, dtype=out_dtype, device=logits.device)
        entropy = torch.empty(rows if with_entropy else 0, dtype=out_dtype, device=logits.device)
        for start in range(0, rows, step):
            end = min(rows, start + step)
            chunk = logits[start:end].to(out_dtype)
            chunk_lse = torch.logsumexp(chunk, dim=-1)
            lse[start:end] = chunk_lse
            log_probs[start:end] = chunk.gather(-1, labels[start:end]).squeeze(-1) - chunk_lse
            if with_entropy:
                probs = torch.exp(chunk - chunk_lse.unsqueeze(-1))
                entropy[start:end] = chunk_lse - (probs * chunk).sum(dim=-1)
        ctx.save_for_backward(logits, labels, lse)
        ctx.step = step
        ctx.mark_non_differentiable(entropy)
        return log_probs, entropy

    @staticmethod
    def backward(ctx: Any, grad_log_probs: torch.Tensor, grad_entropy: torch.Tensor) -> tuple:
        logits, labels, lse = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        grad_log_probs = grad_log_probs.to(lse.dtype)
        for start in range(0, logits.shape[0], ctx.step):
            end = min(logits.shape[0], start + ctx.step)
            g = grad_log_probs[start:end].unsqueeze(-1)
            # d(z[label] - lse)/dz = onehot(label) - softmax(z)
            chunk_grad = torch.exp(logits[start:end].to(lse.dtype) - lse[start:end].unsqueeze(-1)).mul_(-g)
            chunk_grad.scatter_add_(-1, labels[start:end], g)
            grad_logits[start:end] = chunk_grad
        return grad_logits, None, None, None


def logprobs_from_logits(logits: torch.Tensor,
                         labels: torch.Tensor,
                         chunk_size: int | None = None,
                         return_entropy: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``log_softmax(logits)[..., label]`` without materialising the full log-softmax: label logit minus the row's
    logsumexp, computed over chunks of rows (``chunk_size`` rows, default chosen from the vocabulary size) so that
    half-precision logits are upcast one chunk at a time.

    ``logits`` ``(..., vocab)``, ``labels`` ``(...)`` integer ids. Returns ``(...)`` in float32 (float64 for
    float64 logits). Differentiable with respect to ``logits``; the backward recomputes the softmax chunk by chunk
    into one gradient buffer (see :class:`_ChunkedLogProbs`). ``return_entropy`` also returns the entropy of
    ``softmax(logits)`` per row from the same pass, as ``(log_probs, entropy)``; the entropy has no gradient.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logprobs_from_logits: logits {tuple(logits.shape)} must be labels {tuple(labels.shape)} "
                         "plus a trailing vocabulary dimension")
    vocab = logits.shape[-1]
    out_dtype = _compute_dtype(logits.dtype)
    flat_logits = logits.reshape(-1, vocab)
    flat_labels = labels.reshape(-1, 1).long()
    if flat_logits.shape[0] == 0:
        empty = torch.zeros(labels.shape, dtype=out_dtype, device=logits.device)
        return (empty, empty.clone()) if return_entropy else empty
    log_probs, entropy = _ChunkedLogProbs.apply(flat_logits, flat_labels, _rows_per_chunk(vocab, chunk_size),
                                                return_entropy)
    if return_entropy:
        return log_probs.reshape(labels.shape), entropy.reshape(labels.shape)
    return log_probs.reshape(labels.shape)


def entropy_from_logits(logits: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """Entropy ``-(p * log p).sum(-1)`` of ``softmax(logits)``, as ``logsumexp(z) - sum(p * z)`` over chunks of rows
    (see :func:`logprobs_from_logits`). ``(..., vocab) -> (...)``, float32 (float64 for float64 logits)."""
    vocab = logits.shape[-1]
    out_dtype = _compute_dtype(logits.dtype)
    flat_logits = logits.reshape(-1, vocab)
    rows = flat_logits.shape[0]
    if rows == 0:
        return torch.zeros(logits.shape[:-1], dtype=out_dtype, device=logits.device)
    step = _rows_per_chunk(vocab, chunk_size)
    pieces = []
    for start in range(0, rows, step):
        chunk = flat_logits[start:start + step].to(out_dtype)
        probs = torch.softmax(chunk, dim=-1)
        pieces.append(torch.logsumexp(chunk, dim=-1) - (probs * chunk).sum(dim=-1))
    return torch.cat(pieces).reshape(logits.shape[:-1])


# ---------------------------------------------------------------------------------------------------------------
# masks, positions and padding
# ---------------------------------------------------------------------------------------------------------------


def clip_by_value(x: torch.Tensor, tensor_min: torch.Tensor | float, tensor_max: torch.Tensor | float) -> torch.Tensor:
    """Element-wise clamp of ``x`` into ``[tensor_min, tensor_max]``; the bounds may be tensors (broadcast)."""
    lower = torch.as_tensor(tensor_min, dtype=x.dtype, device=x.device)
    upper = torch.as_tensor(tensor_max, dtype=x.dtype, device=x.device)
    return torch.maximum(torch.minimum(x, upper), lower)


def get_response_mask(response_id: torch.Tensor,
                      eos_token: int | Sequence[int] = 2,
                      dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Mask ``(batch, response_length)`` that is 1 up to and including the first EOS of each row and 0 after it;
    rows without EOS are all ones. ``eos_token`` is one id or a list of ids (any of them ends the response)."""
    eos_ids = torch.as_tensor(eos_token if isinstance(eos_token, (list, tuple)) else [eos_token],
                              dtype=response_id.dtype,
                              device=response_id.device)
    is_eos = torch.isin(response_id, eos_ids).to(torch.int64)
    eos_seen_before = torch.cumsum(is_eos, dim=-1) - is_eos  # EOS tokens strictly before each position
    return (eos_seen_before == 0).to(dtype)


def compute_position_id_with_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids for a (left- or right-) padded batch: 0 at the first attended token, counting attended tokens;
    padding before the first token gets 0."""
    return torch.clamp(torch.cumsum(mask.long(), dim=-1) - 1, min=0)


def pad_2d_list_to_length(response: Sequence[Sequence[int]],
                          pad_token_id: int,
                          max_length: int | None = None) -> torch.Tensor:
    """Right-pad a list of token-id lists into a ``(batch, length)`` long tensor; ``length`` is the longest row, or
    ``max_length`` when that is larger."""
    longest = max((len(row) for row in response), default=0)
    target = longest if max_length is None else max(longest, int(max_length))
    padded = torch.full((len(response), target), pad_token_id, dtype=torch.long)
    for i, row in enumerate(response):
        if len(row):
            padded[i, :len(row)] = torch.as_tensor(list(row), dtype=torch.long)
    return padded


def pad_sequence_to_length(tensors: torch.Tensor,
                           max_seq_len: int,
                           pad_token_id: int | float,
                           left_pad: bool = False) -> torch.Tensor:
    """Pad the last dimension of ``tensors`` up to ``max_seq_len`` with ``pad_token_id`` (on the left with
    ``left_pad``); a tensor already that long or longer is returned unchanged."""
    missing = max_seq_len - tensors.shape[-1]
    if missing <= 0:
        return tensors
    pad_shape = tensors.shape[:-1] + (missing,)
    pad = torch.full(pad_shape, pad_token_id, dtype=tensors.dtype, device=tensors.device)
    return torch.cat([pad, tensors] if left_pad else [tensors, pad], dim=-1)
