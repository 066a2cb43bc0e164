"""Ulysses sequence parallelism (DeepSpeed-Ulysses style) for packed (remove-padding) sequences.

With ``ulysses_sequence_parallel_size = sp > 1`` the ranks form a ``(dp, sp)`` mesh. The ``sp`` ranks of one group
receive the same rows; the rows' valid tokens are packed into one sequence, padded to a multiple of ``sp`` and each
rank runs the model on its contiguous slice of ``1/sp`` of the tokens. Everything in a decoder layer is per-token
except attention, which :mod:`verl.models.transformers.monkey_patch` wraps: an all-to-all turns the
sequence-sharded ``(1, heads, T/sp, d)`` queries/keys/values into head-sharded ``(1, heads/sp, T, d)`` ones, the
model's own attention runs over the whole sequence for its heads, and a second all-to-all turns the output back.
The per-token results (log-probs, entropies, values) are all-gathered at the end.

Gradients: every rank of an sp group computes the same loss from the same gathered tensor. The backward of
:func:`gather_outputs_and_unpad` keeps this rank's slice of the gradient, times ``sp`` with ``grad_scaler`` (the
default), so that FSDP's average over all ``dp * sp`` ranks equals the average over the ``dp`` groups: sp ranks
count like data-parallel replicas, and loss weights computed over all ranks stay right.

The collectives use ``all_to_all_single`` (NCCL and gloo both have it); :func:`set_all_to_all_via_all_gather` switches
to an all-gather + slice implementation for backends without all-to-all.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist

__all__ = [
    "set_ulysses_sequence_parallel_group",
    "get_ulysses_sequence_parallel_group",
    "get_ulysses_sequence_parallel_world_size",
    "get_ulysses_sequence_parallel_rank",
    "set_all_to_all_via_all_gather",
    "all_to_all_tensor",
    "all_gather_tensor",
    "SeqAllToAll",
    "gather_seq_scatter_heads",
    "gather_heads_scatter_seq",
    "ulysses_pad",
    "slice_input_tensor",
    "ulysses_pad_and_slice_inputs",
    "gather_outputs_and_unpad",
    "validate_ulysses_config",
    "check_ulysses_config",
    "check_ulysses_group",
    "ulysses_forward_response_positions",
]

_ULYSSES_SP_GROUP: Any = None
_A2A_VIA_ALL_GATHER = False


# ------------------------------------------------------------------------------------------------------ group -----
def set_ulysses_sequence_parallel_group(group: Any) -> None:
    """Make ``group`` (a process group, or None for no sequence parallelism) the current sp group; the attention
    wrapper and the helpers below use it when no group is passed."""
    global _ULYSSES_SP_GROUP
    _ULYSSES_SP_GROUP = group


def get_ulysses_sequence_parallel_group() -> Any:
    """The current sp group (None outside a :class:`~verl.workers.sharding_manager.fsdp_ulysses.
    FSDPUlyssesShardingManager` context)."""
    return _ULYSSES_SP_GROUP


def get_ulysses_sequence_parallel_world_size(group: Any = None) -> int:
    """Ranks in ``group`` (default: the current sp group); 1 when there is none."""
    group = _ULYSSES_SP_GROUP if group is None else group
    if group is None or not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def get_ulysses_sequence_parallel_rank(group: Any = None) -> int:
    """This process's rank in ``group`` (default: the current sp group); 0 when there is none."""
    group = _ULYSSES_SP_GROUP if group is None else group
    if group is None or not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank(group)


def set_all_to_all_via_all_gather(enabled: bool) -> None:
    """Implement all-to-all with an all-gather and local slicing (for backends that lack all-to-all; moves ``sp``
    times more data)."""
    global _A2A_VIA_ALL_GATHER
    _A2A_VIA_ALL_GATHER = bool(enabled)


def _group_or_current(group: Any) -> Any:
    return _ULYSSES_SP_GROUP if group is None else group


# ----------------------------------------------------------------------------------------------- collectives -----
def all_gather_tensor(x: torch.Tensor, dim: int, group: Any = None) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` (rank order). Not differentiable; see
    :func:`gather_outputs_and_unpad`."""
    group = _group_or_current(group)
    world = get_ulysses_sequence_parallel_world_size(group)
    if world == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def all_to_all_tensor(local_input: torch.Tensor, scatter_dim: int, gather_dim: int, group: Any = None) -> torch.Tensor:
    """Split ``local_input`` into ``world`` chunks along ``scatter_dim``, send chunk ``i`` to rank ``i`` and
    concatenate the chunks received from ranks ``0..world-1`` along ``gather_dim``. Not differentiable; see
    :class:`SeqAllToAll`."""
    group = _group_or_current(group)
    world = get_ulysses_sequence_parallel_world_size(group)
    if world == 1:
        return local_input
    size = local_input.shape[scatter_dim]
    if size % world:
        raise ValueError(f"all_to_all: dimension {scatter_dim} of size {size} does not split over {world} ranks")
    if _A2A_VIA_ALL_GATHER:
        rank = dist.get_rank(group)
        full = [torch.empty_like(local_input.contiguous()) for _ in range(world)]
        dist.all_gather(full, local_input.contiguous(), group=group)
        return torch.cat([part.chunk(world, dim=scatter_dim)[rank] for part in full], dim=gather_dim).contiguous()
    # chunk i of the scatter dim first, so that all_to_all_single exchanges contiguous blocks
    send = local_input.movedim(scatter_dim, 0)
    send = send.reshape(world, size // world, *send.shape[1:]).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    # recv[i]: rank i's chunk for this rank, in local_input's layout with the scatter dim shrunk
    pieces = [piece.movedim(0, scatter_dim) for piece in recv.unbind(0)]
    return torch.cat(pieces, dim=gather_dim).contiguous()


class SeqAllToAll(torch.autograd.Function):
    """Differentiable :func:`all_to_all_tensor`: the backward is the all-to-all with the two dims swapped."""

    @staticmethod
    def forward(ctx: Any, group: Any, local_input: torch.Tensor, scatter_dim: int, gather_dim: int) -> torch.Tensor:
        ctx.group, ctx.scatter_dim, ctx.gather_dim = group, scatter_dim, gather_dim
        return all_to_all_tensor(local_input, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):
        grad = all_to_all_tensor(grad_output.contiguous(), ctx.gather_dim, ctx.scatter_dim, ctx.group)
        return None, grad, None, None


def _unpad(x: torch.Tensor, dim: int, padding_size: int) -> torch.Tensor:
    if padding_size == 0:
        return x
    return x.narrow(dim, 0, x.shape[dim] - padding_size)


def gather_seq_scatter_heads(x: torch.Tensor,
                             seq_dim: int,
                             head_dim: int,
                             unpadded_dim_size: int = 0,
                             group: Any = None) -> torch.Tensor:
    """Sequence-sharded -> head-sharded: ``(.., T/sp, .., H, ..)`` -> ``(.., T, .., H/sp, ..)``. With
    ``unpadded_dim_size`` the gathered sequence is cut back to that length (drops the sp padding)."""
    group = _group_or_current(group)
    if get_ulysses_sequence_parallel_world_size(group) == 1:
        return x
    x = SeqAllToAll.apply(group, x, head_dim, seq_dim)
    if unpadded_dim_size and unpadded_dim_size < x.shape[seq_dim]:
        x = _unpad(x, seq_dim, x.shape[seq_dim] - unpadded_dim_size)
    return x


def gather_heads_scatter_seq(x: torch.Tensor, head_dim: int, seq_dim: int, group: Any = None) -> torch.Tensor:
    """Head-sharded -> sequence-sharded: ``(.., T, .., H/sp, ..)`` -> ``(.., T/sp, .., H, ..)``."""
    group = _group_or_current(group)
    if get_ulysses_sequence_parallel_world_size(group) == 1:
        return x
    return SeqAllToAll.apply(group, x, seq_dim, head_dim)


class _GatherSeq(torch.autograd.Function):
    """All-gather along ``dim``; the backward keeps this rank's slice (scaled by ``grad_scale``), which is the exact
    gradient when every rank computes the same loss from the gathered tensor (see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, group: Any, x: torch.Tensor, dim: int, grad_scale: float) -> torch.Tensor:
        ctx.dim, ctx.grad_scale = dim, grad_scale
        ctx.rank, ctx.world, ctx.local = dist.get_rank(group), dist.get_world_size(group), x.shape[dim]
        return all_gather_tensor(x, dim, group)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):
        grad = grad_output.narrow(ctx.dim, ctx.rank * ctx.local, ctx.local)
        if ctx.grad_scale != 1.0:
            grad = grad * ctx.grad_scale
        return None, grad.contiguous(), None, None


def gather_outputs_and_unpad(x: torch.Tensor,
                             gather_dim: int,
                             unpad_dim: int | None = None,
                             padding_size: int = 0,
                             grad_scaler: bool = True,
                             group: Any = None) -> torch.Tensor:
    """All-gather the per-slice outputs along ``gather_dim`` (differentiable) and drop the last ``padding_size``
    entries of ``unpad_dim`` (the padding :func:`ulysses_pad` added). ``grad_scaler`` multiplies the gradient by the
    sp size (see the module docstring)."""
    group = _group_or_current(group)
    world = get_ulysses_sequence_parallel_world_size(group)
    if world > 1:
        x = _GatherSeq.apply(group, x, gather_dim, float(world) if grad_scaler else 1.0)
    if unpad_dim is not None:
        x = _unpad(x, unpad_dim, padding_size)
    return x


# --------------------------------------------------------------------------------------------- pad and slice -----
def ulysses_pad(input_ids_rmpad: torch.Tensor,
                position_ids_rmpad: torch.Tensor | None = None,
                sp_size: int = 1) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Pad the packed ``(1, total)`` ids (with 0) and position ids to a multiple of ``sp_size`` tokens. The padded
    tokens get positions ``0, 1, ...``, i.e. they form a sequence of their own that attends only to itself.
    Returns ``(input_ids, position_ids, pad_size)``."""
    total = input_ids_rmpad.shape[1]
    pad_size = (-total) % sp_size
    if pad_size:
        input_ids_rmpad = torch.nn.functional.pad(input_ids_rmpad, (0, pad_size), value=0)
        if position_ids_rmpad is not None:
            extra = torch.arange(pad_size, device=position_ids_rmpad.device, dtype=position_ids_rmpad.dtype)
            extra = extra.unsqueeze(0).expand(position_ids_rmpad.shape[0], -1)
            position_ids_rmpad = torch.cat([position_ids_rmpad, extra], dim=-1)
    return input_ids_rmpad, position_ids_rmpad, pad_size


def slice_input_tensor(x: torch.Tensor, dim: int, group: Any = None) -> torch.Tensor:
    """This rank's contiguous ``1/sp`` of ``x`` along ``dim`` (which must divide evenly)."""
    group = _group_or_current(group)
    world = get_ulysses_sequence_parallel_world_size(group)
    if world == 1:
        return x
    if x.shape[dim] % world:
        raise ValueError(f"cannot slice dimension {dim} of size {x.shape[dim]} over {world} sp ranks; pad it first "
                         "(ulysses_pad)")
    return x.chunk(world, dim=dim)[get_ulysses_sequence_parallel_rank(group)].contiguous()


def ulysses_pad_and_slice_inputs(input_ids_rmpad: torch.Tensor,
                                 position_ids_rmpad: torch.Tensor | None = None,
                                 sp_size: int = 1,
                                 group: Any = None) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """:func:`ulysses_pad` then keep this rank's slice of the ids and position ids (sequence dim, the last).
    Returns ``(input_ids_slice, position_ids_slice, pad_size)``."""
    input_ids_rmpad, position_ids_rmpad, pad_size = ulysses_pad(input_ids_rmpad, position_ids_rmpad, sp_size)
    if sp_size > 1:
        input_ids_rmpad = slice_input_tensor(input_ids_rmpad, dim=-1, group=group)
        if position_ids_rmpad is not None:
            position_ids_rmpad = slice_input_tensor(position_ids_rmpad, dim=-1, group=group)
    return input_ids_rmpad, position_ids_rmpad, pad_size


def validate_ulysses_config(num_heads: int, ulysses_sequence_size: int) -> None:
    """Raise a clear error when the attention heads cannot be split over the sp ranks."""
    if ulysses_sequence_size > 1 and num_heads % ulysses_sequence_size:
        raise ValueError(f"ulysses_sequence_parallel_size={ulysses_sequence_size} must divide the model's "
                         f"num_attention_heads={num_heads} (each sp rank attends with heads/sp heads); choose a "
                         f"divisor of {num_heads}")


def check_ulysses_config(sp_size: int, use_remove_padding: bool, sp_key: str, remove_padding_key: str) -> None:
    """Raise a clear error for an sp size that is not a positive int, or sp > 1 without remove-padding (the packed
    sequence is what the ranks split). ``*_key`` name the config keys in the message."""
    if int(sp_size) < 1:
        raise ValueError(f"{sp_key} must be >= 1, got {sp_size}")
    if int(sp_size) > 1 and not use_remove_padding:
        raise ValueError(f"{sp_key}={sp_size} splits the packed (remove-padding) sequence over ranks and needs "
                         f"{remove_padding_key}=True; set it, or set {sp_key}=1")


def check_ulysses_group(sp_size: int) -> None:
    """Raise a clear error when the current sp group does not have ``sp_size`` ranks (the forward was called outside
    the worker's :class:`~verl.workers.sharding_manager.fsdp_ulysses.FSDPUlyssesShardingManager` context)."""
    world = get_ulysses_sequence_parallel_world_size()
    if world != int(sp_size):
        raise RuntimeError(f"ulysses_sequence_parallel_size={sp_size}, but the current sp group has {world} rank(s); "
                           "run the forward inside `with FSDPUlyssesShardingManager(ulysses_device_mesh):` (or call "
                           "verl.utils.ulysses.set_ulysses_sequence_parallel_group(group) first)")


# ------------------------------------------------------------------------------------------------ forward -----
def _model_output(output: Any) -> torch.Tensor:
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)):
        return output[2] if len(output) >= 3 else output[0]
    if isinstance(output, torch.Tensor):
        return output
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


def _takes_logits_to_keep(model: torch.nn.Module) -> bool:
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(type(model).forward).parameters
    except (TypeError, ValueError):
        return False


def ulysses_forward_response_positions(model: torch.nn.Module,
                                       input_ids: torch.Tensor,
                                       attention_mask: torch.Tensor,
                                       position_ids: torch.Tensor,
                                       response_length: int,
                                       head_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                                       responses: torch.Tensor | None = None,
                                       group: Any = None,
                                       **model_kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The sequence-parallel counterpart of :func:`verl.utils.remove_padding.forward_response_positions`.

    Packs the valid tokens of the ``(batch, seqlen)`` rows, pads the packed sequence to a multiple of sp, runs
    ``model`` (patched by :func:`verl.models.transformers.monkey_patch.apply_monkey_patch`) on this rank's slice and
    applies ``head_fn(outputs, labels)`` to the model outputs at the positions of this slice that predict response
    tokens (``outputs`` ``(n, ...)``, ``labels`` the ``(n,)`` response tokens they predict, from ``responses``, default
    the last ``response_length`` columns of ``input_ids``), which returns ``(n, k)`` per-position
    results. These are all-gathered over the sp group (differentiable). Returns ``(results, selected)``: ``selected``
    is the ``(batch, response_length)`` mask of computed positions, ``results`` ``(selected.sum(), k)`` in row-major
    order, as :func:`~verl.utils.remove_padding.scatter_to_response` expects. Every rank of the group must call this
    with the same rows.
    """
    from verl.utils.remove_padding import get_unpad_data

    group = _group_or_current(group)
    sp = get_ulysses_sequence_parallel_world_size(group)
    if sp == 1:
        raise RuntimeError("ulysses_forward_response_positions needs an sp group of size > 1; enter "
                           "FSDPUlyssesShardingManager (or call set_ulysses_sequence_parallel_group) first")
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape or position_ids.shape != input_ids.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)}, attention_mask {tuple(attention_mask.shape)} and "
                         f"position_ids {tuple(position_ids.shape)} must share one (batch, seqlen) shape")
    batch, seqlen = input_ids.shape
    r = int(response_length)
    if not 0 < r < seqlen:
        raise ValueError(f"response_length {r} must be in [1, seqlen-1] for sequences of length {seqlen}")
    mask = attention_mask.bool()
    indices, cu_seqlens, _ = get_unpad_data(mask)
    ids_rmpad = input_ids.flatten()[indices].unsqueeze(0)  # (1, total)
    pos_rmpad = position_ids.flatten()[indices].unsqueeze(0)
    starts = cu_seqlens[:-1][cu_seqlens[1:] > cu_seqlens[:-1]].long()
    if starts.numel() and bool((pos_rmpad[0, starts] != 0).any()):
        raise ValueError("sequence parallelism packs the rows, which needs position_ids that are 0 at each row's "
                         "first valid token (clamp(cumsum(attention_mask) - 1, min=0))")
    total = ids_rmpad.shape[1]
    packed_index = (torch.cumsum(mask.flatten().long(), dim=0) - 1).view(batch, seqlen)
    selected = mask[:, seqlen - r - 1:seqlen - 1]
    keep = packed_index[:, seqlen - r - 1:seqlen - 1][selected]  # packed positions predicting response tokens
    if responses is None:
        responses = input_ids[:, seqlen - r:]
    if responses.shape != (batch, r):
        raise ValueError(f"responses {tuple(responses.shape)} must be (batch, response_length) = {(batch, r)}")
    # the response token each kept packed position predicts (what the padded path scores), 0 elsewhere
    labels_rmpad = torch.zeros_like(ids_rmpad)
    labels_rmpad[0, keep] = responses[selected].to(labels_rmpad.dtype)

    ids_local, pos_local, pad_size = ulysses_pad_and_slice_inputs(ids_rmpad, pos_rmpad, sp, group)
    labels_local, _, _ = ulysses_pad_and_slice_inputs(labels_rmpad, None, sp, group)
    local_len = ids_local.shape[1]
    start = get_ulysses_sequence_parallel_rank(group) * local_len
    local_keep = keep[(keep >= start) & (keep < start + local_len)] - start

    kwargs = dict(model_kwargs)
    kwargs["use_cache"] = False
    keep_logits = _takes_logits_to_keep(model)
    if keep_logits:
        kwargs["logits_to_keep"] = local_keep
    output = _model_output(model(input_ids=ids_local, attention_mask=None, position_ids=pos_local, **kwargs))[0]
    if not keep_logits:
        output = output[local_keep]
    results = head_fn(output, labels_local[0, local_keep])
    if results.dim() == 1:
        results = results.unsqueeze(-1)
    # place this slice's results at their positions, gather the whole packed sequence, keep the wanted positions
    placed = results.new_zeros((local_len, results.shape[-1])).index_put((local_keep,), results)
    if output.requires_grad:
        # keep this rank's backward connected to its model graph even when its slice holds no wanted position: the
        # backward all-to-alls in attention are collectives that every rank of the group must run
        placed = placed + output[..., :0].sum().to(placed.dtype)
    full = gather_outputs_and_unpad(placed, gather_dim=0, unpad_dim=0, padding_size=pad_size, group=group)
    assert full.shape[0] == total
    return full[keep], selected
