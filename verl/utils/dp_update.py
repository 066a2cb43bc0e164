"""Shared mechanics of the data-parallel actor and critic updates (FSDP and Megatron): config access, micro-batching,
loss weighting across micro-batches and ranks, the guarded optimizer step, and the epochs / mini-batch schedule
(:func:`run_ppo_epochs`).

Loss weighting. A mini-batch is split into micro-batches (gradient accumulation) and across data-parallel ranks
(FSDP averages gradients over ranks). Each micro-batch's aggregated loss is multiplied by

    weight = (aggregation units in this micro-batch / units in the whole mini-batch over all ranks) * dp_size

where the unit is a token for ``token-mean`` and a sequence for the ``seq-mean-*`` modes. Summed over micro-batches
and averaged over ranks this is exactly the loss aggregated over the whole mini-batch, so the gradient does not
depend on the micro-batch size, on ``use_dynamic_bsz`` or on the number of ranks.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable

import torch
import torch.distributed as dist

from verl.utils.device import get_device, get_device_name

__all__ = [
    "FORWARD_KEYS",
    "require_batch_keys",
    "cfg_get",
    "to_float",
    "DPInfo",
    "get_dp_info",
    "loss_weight_context",
    "micro_batch_weight",
    "split_micro_batches",
    "guarded_optimizer_step",
    "PPOSchedule",
    "run_ppo_epochs",
    "append_to_dict",
    "mean_metric_lists",
    "device_of",
]

#: the batch columns every actor/critic forward reads
FORWARD_KEYS = ("responses", "input_ids", "attention_mask", "position_ids")


def require_batch_keys(data: Any, keys: Any, where: str) -> None:
    """Raise a KeyError naming the columns ``where`` needs that ``data`` (a DataProto) lacks, and those it has."""
    missing = [k for k in keys if data.batch is None or k not in data.batch.keys()]
    if missing:
        raise KeyError(f"{where} needs batch columns {missing}; the batch has "
                       f"{[] if data.batch is None else sorted(data.batch.keys())}")


logger = logging.getLogger(__name__)

# modes whose aggregated value is a mean over sequences (weight by sequence share); token-mean weighs by tokens
_SEQ_MEAN_MODES = ("seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
_TOKEN_MODES = ("token-mean",)


def cfg_get(config: Any, key: str, default: Any = None) -> Any:
    """``config[key]`` for DictConfig / dict / dataclass configs, ``default`` when absent or None. ``key`` may be
    dotted (``policy_loss.loss_mode``)."""
    node = config
    for part in key.split("."):
        if node is None:
            return default
        if hasattr(node, "get") and not isinstance(node, torch.Tensor):
            try:
                node = node.get(part, None)
                continue
            except TypeError:
                pass
        node = getattr(node, part, None)
    return default if node is None else node


def to_float(value: Any) -> float:
    """A metric value (tensor, numpy scalar, number) as a Python float."""
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().mean().item())
    return float(value)


def append_to_dict(data: dict[str, list], new: dict[str, Any]) -> None:
    """Append each value of ``new`` to the list under the same key of ``data``."""
    for key, value in new.items():
        data.setdefault(key, []).append(value)


def device_of(module: torch.nn.Module) -> torch.device:
    """Where inputs of ``module`` must go: verl's device for a sharded (FSDP2) module, whose shards may sit on the
    host under CPU offload while it computes on the accelerator; else the device of its parameters."""
    for param in module.parameters():
        if hasattr(param, "device_mesh"):
            return get_device()
        if param.device.type != "meta":
            return param.device
    return get_device()


class DPInfo:
    """Data-parallel size and process group over which gradients of ``module`` are averaged."""

    def __init__(self, size: int, group: Any) -> None:
        self.size = size
        self.group = group


def get_dp_info(module: torch.nn.Module) -> DPInfo:
    """DP size = ranks of the FSDP mesh the parameters are sharded on (1 for a plain, unsharded module, whose
    gradients nobody averages)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DPInfo(1, None)
    for param in module.parameters():
        mesh = getattr(param, "device_mesh", None)
        if mesh is None:
            continue
        if mesh.size() == dist.get_world_size():
            return DPInfo(mesh.size(), None)
        if mesh.ndim == 1:
            return DPInfo(mesh.size(), mesh.get_group())
        raise NotImplementedError(f"a {mesh.ndim}-D FSDP mesh over {mesh.size()} of {dist.get_world_size()} ranks "
                                  "is not supported by the data-parallel actor/critic; shard over all ranks")
    return DPInfo(1, None)


def defer_gradient_reduction(module: torch.nn.Module, last_micro_batch: bool, dp: DPInfo) -> None:
    """Call before each micro-batch's backward. On a one-rank FSDP2 mesh the per-micro-batch gradient
    reduce-scatter only copies and casts every gradient into its shard; it is skipped for all but the last
    micro-batch of an optimizer step, and FSDP2 accumulates the unsharded gradients in its reduce dtype (float32)
    meanwhile, so the step sees the same sum. With more ranks every micro-batch reduces, so that no rank holds a
    whole model's unsharded gradients."""
    if dp.size == 1 and hasattr(module, "set_requires_gradient_sync"):
        module.set_requires_gradient_sync(last_micro_batch)


def _unit_count(response_mask: torch.Tensor, loss_agg_mode: str) -> float:
    if loss_agg_mode in _TOKEN_MODES:
        return float(response_mask.sum().item())
    if loss_agg_mode in _SEQ_MEAN_MODES:
        return float(response_mask.shape[0])
    raise ValueError(f"unknown loss_agg_mode {loss_agg_mode!r}; use one of {list(_TOKEN_MODES + _SEQ_MEAN_MODES)}")


def loss_weight_context(response_mask: torch.Tensor, loss_agg_mode: str, dp: DPInfo) -> float:
    """Aggregation units (tokens or sequences) of a whole mini-batch summed over the DP ranks."""
    local = _unit_count(response_mask, loss_agg_mode)
    if dp.size > 1:
        backend_device = "cpu" if dist.get_backend(dp.group) == "gloo" else get_device_name()
        t = torch.tensor([local], dtype=torch.float64, device=backend_device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=dp.group)
        return float(t.item())
    return local


def micro_batch_weight(micro_response_mask: torch.Tensor, loss_agg_mode: str, global_units: float, dp: DPInfo) -> float:
    """Weight of one micro-batch's aggregated loss (see module docstring). 0 when the mini-batch has no units."""
    if global_units <= 0:
        return 0.0
    return _unit_count(micro_response_mask, loss_agg_mode) / global_units * dp.size


def split_micro_batches(data: Any,
                        use_dynamic_bsz: bool,
                        micro_batch_size: int | None,
                        max_token_len: int | None,
                        dp: DPInfo,
                        what: str = "ppo_micro_batch_size_per_gpu") -> list[Any]:
    """Micro-batches of a DataProto: fixed row count, or balanced token budget (same count on every DP rank)."""
    if use_dynamic_bsz:
        from verl.utils.seqlen_balancing import prepare_dynamic_batch

        # FSDP forwards are collectives: every rank of the group must run the same number of micro-batches
        micro_batches, _ = prepare_dynamic_batch(data,
                                                 max_token_len=max_token_len,
                                                 dp_group=dp.group,
                                                 same_micro_num_in_dp=dp.size > 1)
        return micro_batches
    if micro_batch_size is None or int(micro_batch_size) <= 0:
        raise ValueError(f"{what} must be a positive int when use_dynamic_bsz is False, got {micro_batch_size!r}")
    return data.split(int(micro_batch_size))


def guarded_optimizer_step(module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                           grad_clip: float | None) -> tuple[float, bool]:
    """Clip gradients to ``grad_clip`` and step, unless the gradient norm is not finite (then the step is skipped
    and the gradients dropped). Returns ``(grad_norm, stepped)``; every rank takes the same decision because the
    norm is global."""
    from verl.utils.fsdp_utils import clip_grad_norm_

    grad_norm = clip_grad_norm_(module.parameters(), max_norm=grad_clip)
    norm = float(grad_norm.item())
    if not math.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        return norm, False
    optimizer.step()
    return norm, True


@dataclasses.dataclass(frozen=True)
class PPOSchedule:
    """How a PPO update walks its rows (an ``actor`` or ``critic`` config; sizes per data-parallel rank)."""

    epochs: int
    mini_batch_size: int
    micro_batch_size: int | None
    use_dynamic_bsz: bool
    max_token_len: int | None  # per forward with use_dynamic_bsz, else None
    shuffle: bool
    loss_agg_mode: str

    @classmethod
    def from_config(cls, config: Any, role: str, rows_per: str = "GPU", token_scale: int = 1) -> "PPOSchedule":
        """Read and check the schedule keys of ``config`` (``role``: ``actor`` / ``critic``, named in errors;
        ``token_scale`` multiplies ``ppo_max_token_len_per_gpu``, e.g. by the Ulysses group size)."""
        mini = cfg_get(config, "ppo_mini_batch_size")
        if mini is None or int(mini) <= 0:
            raise ValueError(f"{role}.ppo_mini_batch_size must be a positive int (rows per {rows_per} after the "
                             f"worker's normalisation), got {mini!r}")
        use_dynamic = bool(cfg_get(config, "use_dynamic_bsz", False))
        max_token_len = cfg_get(config, "ppo_max_token_len_per_gpu")
        if use_dynamic and not max_token_len:
            raise ValueError(f"{role}.use_dynamic_bsz=True needs {role}.ppo_max_token_len_per_gpu")
        return cls(epochs=int(cfg_get(config, "ppo_epochs", 1)),
                   mini_batch_size=int(mini),
                   micro_batch_size=cfg_get(config, "ppo_micro_batch_size_per_gpu"),
                   use_dynamic_bsz=use_dynamic,
                   max_token_len=int(max_token_len) * token_scale if use_dynamic else None,
                   shuffle=bool(cfg_get(config, "shuffle", False)),
                   loss_agg_mode=str(cfg_get(config, "loss_agg_mode", "token-mean")))


def run_ppo_epochs(data: Any,
                   schedule: PPOSchedule,
                   accumulate_grads: Callable[[list[Any], float], list[dict[str, Any]]],
                   optimizer_step: Callable[[], tuple[float, bool]],
                   *,
                   role: str,
                   dp: DPInfo,
                   generator: torch.Generator | None = None,
                   log: logging.Logger | None = None) -> tuple[dict[str, list], int]:
    """The update loop every PPO actor and critic shares (FSDP and Megatron), so that the backends only differ in
    how one mini-batch's gradients are computed.

    ``schedule.epochs`` passes over ``data`` (a DataProto with ``response_mask``; a new permutation from
    ``generator`` each pass with ``schedule.shuffle``), split into mini-batches. Each mini-batch is split into
    micro-batches (:func:`split_micro_batches`) and handed, with its units over all DP ranks
    (:func:`loss_weight_context`), to ``accumulate_grads(micro_batches, global_units)``, which zeroes the gradients,
    accumulates those of every micro-batch and returns each micro-batch's metrics; then ``optimizer_step()`` returns
    ``(grad_norm, stepped)`` (not stepped: the norm was not finite; a warning on ``log``).

    Returns the metric lists (micro-batch metrics, ``<role>/grad_norm`` per mini-batch, ``<role>/skipped_steps``) and
    the number of skipped optimizer steps.
    """
    log = log or logger
    metrics: dict[str, list] = {}
    skipped = 0
    for _epoch in range(schedule.epochs):
        epoch_data = data
        if schedule.shuffle and len(data) > 1:
            epoch_data = data.select_idxs(torch.randperm(len(data), generator=generator))
        for mini_batch in epoch_data.split(schedule.mini_batch_size):
            global_units = loss_weight_context(mini_batch.batch["response_mask"], schedule.loss_agg_mode, dp)
            micro_batches = split_micro_batches(mini_batch, schedule.use_dynamic_bsz, schedule.micro_batch_size,
                                                schedule.max_token_len, dp)
            for micro_metrics in accumulate_grads(micro_batches, global_units):
                append_to_dict(metrics, micro_metrics)
            grad_norm, stepped = optimizer_step()
            if not stepped:
                skipped += 1
                log.warning("%s: gradient norm is %s, skipping this optimizer step", role, grad_norm)
            append_to_dict(metrics, {f"{role}/grad_norm": grad_norm})
    metrics[f"{role}/skipped_steps"] = [float(skipped)]
    return metrics, skipped


def mean_metric_lists(metrics: dict[str, list]) -> dict[str, float]:
    """Mean of each metric list (what the worker reports)."""
    return {k: float(sum(map(to_float, v)) / len(v)) for k, v in metrics.items() if len(v)}
