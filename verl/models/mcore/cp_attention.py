"""Context parallelism (CP) for the Megatron backend without Transformer Engine.

Megatron-core's own context parallelism lives in Transformer Engine's attention (ring attention); its local
``DotProductAttention`` asserts ``context_parallel_size == 1``. This module supplies what the local layer spec needs
to run with CP > 1:

* the sequence layout megatron's rotary embedding already uses (``get_pos_emb_on_this_cp_rank``): the (padded)
  sequence is cut into ``2 * CP`` chunks and CP rank ``r`` holds chunks ``r`` and ``2 * CP - 1 - r`` (load-balanced
  under a causal mask) -- :func:`cp_local_index`;
* :class:`ContextParallelAttention`, the core attention that replaces ``DotProductAttention`` in the layer spec: every
  CP rank all-gathers K and V over the CP group and attends with its local queries to the whole sequence, with a
  mask from the *global* positions of its queries (:func:`cp_causal_padding_mask`);
* :func:`gather_from_cp`, an autograd-correct all-gather of per-token tensors (K/V, log-probs, values) into the
  global sequence order.

Memory: K and V of the whole sequence are held on every CP rank (O(seq) per layer, not O(seq / CP) as with ring
attention); the attention scores are ``(b, heads, seq / CP, seq)``. Activations outside attention (MLP, norms,
logits) are O(seq / CP).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.distributed as dist

__all__ = [
    "cp_padded_length",
    "cp_local_index",
    "cp_causal_padding_mask",
    "gather_from_cp",
    "ContextParallelAttention",
]


def cp_padded_length(seq: int, cp_size: int, multiple: int = 1) -> int:
    """The smallest length >= ``seq`` that splits into ``2 * cp_size`` equal chunks, each a multiple of ``multiple``
    (the TP size under sequence parallelism)."""
    step = 2 * cp_size * multiple
    return -(-seq // step) * step


def cp_local_index(padded: int, cp_size: int, cp_rank: int, device: Any = None) -> torch.Tensor:
    """Global positions (ascending within each chunk) that CP rank ``cp_rank`` holds: chunks ``cp_rank`` and
    ``2 * cp_size - 1 - cp_rank`` of ``2 * cp_size`` -- the layout of megatron's ``get_pos_emb_on_this_cp_rank``."""
    if padded % (2 * cp_size):
        raise ValueError(f"sequence length {padded} is not a multiple of 2 * context_parallel_size = {2 * cp_size}")
    chunk = padded // (2 * cp_size)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
    second_start = (2 * cp_size - 1 - cp_rank) * chunk
    second = torch.arange(second_start, second_start + chunk, device=device)
    return torch.cat([first, second])


def _rank_order(padded: int, cp_size: int, device: Any = None) -> torch.Tensor:
    """Global positions of the concatenation of every CP rank's local tensor, in rank order."""
    return torch.cat([cp_local_index(padded, cp_size, r, device) for r in range(cp_size)])


def cp_causal_padding_mask(attention_mask: torch.Tensor, local_index: torch.Tensor) -> torch.Tensor:
    """Megatron's boolean mask ``(b, 1, s_local, s)``, True where attention is *not* allowed, for the local queries
    at global positions ``local_index`` against all ``s`` keys: causal in global positions and excluding padding keys
    (``attention_mask == 0``); a padding query keeps its own position so that no softmax row is empty (as
    :func:`verl.utils.megatron_utils.causal_padding_mask`, of which this is the rows ``local_index``)."""
    s = attention_mask.shape[-1]
    keys = torch.arange(s, device=attention_mask.device)
    q = local_index.to(attention_mask.device)[:, None]
    allowed = (keys[None, :] <= q)[None] & attention_mask.bool()[:, None, :]
    allowed = allowed | (keys[None, :] == q)[None]
    return (~allowed).unsqueeze(1)


class _GatherFromCP(torch.autograd.Function):
    """All-gather along ``dim`` over the CP group into the global order. Backward: ``sum_grads=True`` sums the
    gradient over the CP ranks and keeps this rank's slice (each rank's downstream use differs, as for K/V);
    ``sum_grads=False`` keeps this rank's slice only (every CP rank computes the same downstream loss)."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, dim: int, group: Any, sum_grads: bool) -> torch.Tensor:
        cp_size, cp_rank = dist.get_world_size(group), dist.get_rank(group)
        padded = local.shape[dim] * cp_size
        parts = [torch.empty_like(local) for _ in range(cp_size)]
        dist.all_gather(parts, local.contiguous(), group=group)
        order = _rank_order(padded, cp_size, local.device)
        ctx.dim, ctx.group, ctx.sum_grads = dim, group, sum_grads
        ctx.cp_size, ctx.cp_rank, ctx.local_len = cp_size, cp_rank, local.shape[dim]
        ctx.save_for_backward(order)
        return torch.cat(parts, dim=dim).index_select(dim, torch.argsort(order))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        (order,) = ctx.saved_tensors
        dim, n = ctx.dim, ctx.local_len
        in_rank_order = grad.index_select(dim, order)  # rank r's slice at [r * n, (r + 1) * n)
        if not ctx.sum_grads:
            return in_rank_order.narrow(dim, ctx.cp_rank * n, n).contiguous(), None, None, None
        if dist.get_backend(ctx.group) == "nccl":
            moved = in_rank_order.movedim(dim, 0).contiguous()
            out = torch.empty((n,) + tuple(moved.shape[1:]), dtype=moved.dtype, device=moved.device)
            dist.reduce_scatter_tensor(out, moved, group=ctx.group)
            return out.movedim(0, dim).contiguous(), None, None, None
        summed = in_rank_order.contiguous()  # gloo has no reduce-scatter: all-reduce, keep this rank's slice
        dist.all_reduce(summed, group=ctx.group)
        return summed.narrow(dim, ctx.cp_rank * n, n).contiguous(), None, None, None


def gather_from_cp(local: torch.Tensor, dim: int, group: Any = None, sum_grads: bool = True) -> torch.Tensor:
    """This CP rank's slice (layout of :func:`cp_local_index`) of a per-token tensor -> the whole sequence along
    ``dim``, in global order, on every CP rank; differentiable (see :class:`_GatherFromCP` for ``sum_grads``)."""
    if group is None:
        from megatron.core import parallel_state as mpu

        group = mpu.get_context_parallel_group()
    if dist.get_world_size(group) == 1:
        return local
    return _GatherFromCP.apply(local, dim, group, sum_grads)


try:  # the layout helpers above work without megatron-core; the attention module needs it
    from megatron.core.transformer.module import MegatronModule as _Base
except ImportError:  # pragma: no cover - megatron-core is optional
    _Base = torch.nn.Module


class ContextParallelAttention(_Base):
    """Core attention for ``context_parallel_size > 1`` in megatron's local layer spec (in place of
    ``DotProductAttention``, which refuses CP; Transformer Engine is not needed).

    Inputs are this CP rank's tokens (layout of :func:`cp_local_index`): ``query`` ``[s_local, b, heads, d]``,
    ``key`` / ``value`` ``[s_local, b, groups, d]`` (GQA: fewer groups than heads). K and V are all-gathered over the
    CP group (the backward sums their gradients over the CP ranks), then the local queries attend to the whole
    sequence. ``attention_mask``: ``(b, 1, s_local, s)`` booleans, True = masked (:func:`cp_causal_padding_mask`), or
    None for plain causal attention in global positions. Memory: K/V of the whole sequence per rank (O(seq)), scores
    ``(b, heads, s_local, s)``.
    """

    def __init__(self,
                 config: Any,
                 layer_number: int,
                 attn_mask_type: Any,
                 attention_type: str,
                 attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None,
                 pg_collection: Any = None) -> None:
        super().__init__(config=config)
        from megatron.core import parallel_state as mpu
        from megatron.core.utils import divide

        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise NotImplementedError(f"softmax_type={config.softmax_type!r} with context parallelism")
        if getattr(config, "apply_query_key_layer_scaling", False):
            raise NotImplementedError("apply_query_key_layer_scaling with context parallelism")
        if getattr(config, "window_size", None) is not None:
            raise NotImplementedError("sliding-window attention with context parallelism")
        tp_group = getattr(pg_collection, "tp", None) if pg_collection is not None else None
        tp_size = tp_group.size() if tp_group is not None else mpu.get_tensor_model_parallel_world_size()
        self.cp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
        if self.cp_group is None:
            self.cp_group = mpu.get_context_parallel_group()
        self.layer_number = max(1, layer_number)
        projection = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection, tp_size)
        self.heads = divide(config.num_attention_heads, tp_size)
        self.groups = divide(config.num_query_groups, tp_size)
        head_dim = divide(projection, config.num_attention_heads)
        self.softmax_scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
        self.attention_dropout = torch.nn.Dropout(config.attention_dropout if attention_dropout is
                                                  None else attention_dropout)

    def forward(self,
                query: torch.Tensor,
                key: torch.Tensor,
                value: torch.Tensor,
                attention_mask: Optional[torch.Tensor],
                attn_mask_type: Any = None,
                attention_bias: Any = None,
                packed_seq_params: Any = None) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("packed sequences / attention bias with context parallelism")
        from megatron.core import tensor_parallel

        s_local, b = query.shape[0], query.shape[1]
        cp_size, cp_rank = dist.get_world_size(self.cp_group), dist.get_rank(self.cp_group)
        key = gather_from_cp(key, 0, self.cp_group, sum_grads=True)
        value = gather_from_cp(value, 0, self.cp_group, sum_grads=True)
        s = key.shape[0]
        if self.heads != self.groups:
            key = key.repeat_interleave(self.heads // self.groups, dim=2)
            value = value.repeat_interleave(self.heads // self.groups, dim=2)
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * self.softmax_scale  # [b, n, s_local, s]
        if attention_mask is None:
            local = cp_local_index(s, cp_size, cp_rank, query.device)
            attention_mask = (torch.arange(s, device=query.device)[None, :] > local[:, None])[None, None]
        if tuple(attention_mask.shape[-2:]) != (s_local, s):
            raise ValueError(f"context-parallel attention needs a (b, 1, {s_local}, {s}) mask (local queries x all "
                             f"keys, cp_causal_padding_mask), got {tuple(attention_mask.shape)}")
        scores = scores.masked_fill(attention_mask, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1).to(value.dtype)
        if self.training and self.attention_dropout.p > 0:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                probs = self.attention_dropout(probs)
        context = torch.matmul(probs, v)  # [b, n, s_local, d]
        return context.permute(2, 0, 1, 3).reshape(s_local, b, self.hidden_size_per_partition)
