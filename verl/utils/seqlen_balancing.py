"""Balance sequences by token count: across data-parallel ranks and into token-budgeted micro-batches.

Two uses:

* ``use_dynamic_bsz``: instead of micro-batches of a fixed number of rows, a mini-batch is cut into as few
  micro-batches as fit ``max_token_len`` tokens each (:func:`rearrange_micro_batches`, :func:`prepare_dynamic_batch`),
  and results are put back into the original row order (:func:`get_reverse_idx`, :func:`restore_dynamic_batch`).
* the trainer's batch balancing: the global batch is reordered so every DP rank gets about the same work
  (:func:`get_seqlen_balanced_partitions`, :func:`log_seqlen_unbalance`).

Partitioning is the multi-way number-partitioning problem. :func:`karmarkar_karp` implements the largest differencing
method for ``k`` parts (Karmarkar & Karp 1982, generalised to k-way): every item starts as a partial solution (a k-tuple
of bins, one holding the item); the two partial solutions with the largest spread (max bin - min bin) are repeatedly
merged by pairing the heaviest bins of one with the lightest bins of the other, which cancels their spreads against
each other. With ``equal_size`` the items are first grouped, in sorted order, into k-item partial solutions holding one
item per bin, so every merge keeps all bins the same size. It is usually much better balanced than
:func:`greedy_partition` (longest-processing-time first), which is kept as a simple, predictable alternative.
"""
from __future__ import annotations

import heapq
import math
from typing import Any, Sequence

import torch
import torch.distributed as dist

__all__ = [
    "calculate_workload",
    "karmarkar_karp",
    "greedy_partition",
    "get_seqlen_balanced_partitions",
    "log_seqlen_unbalance",
    "rearrange_micro_batches",
    "get_reverse_idx",
    "prepare_dynamic_batch",
    "restore_dynamic_batch",
]


def calculate_workload(seqlen_list: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Approximate forward cost of sequences: a linear (MLP / projection) term plus the quadratic attention term.

    The constant 24576 weighs the linear part for a typical 7B-class hidden size; only relative values matter.
    """
    seqlens = torch.as_tensor(seqlen_list, dtype=torch.float64)
    return 24576 * seqlens + seqlens * seqlens


def _check_partition_args(seqlen_list: Sequence[int], k_partitions: int, equal_size: bool) -> list[int]:
    values = [int(x) for x in seqlen_list]
    if not isinstance(k_partitions, int) or k_partitions < 1:
        raise ValueError(f"k_partitions must be a positive int, got {k_partitions!r}")
    if len(values) < k_partitions:
        raise ValueError(f"cannot split {len(values)} sequences into {k_partitions} non-empty partitions; "
                         "use fewer partitions (micro-batches / ranks) or a larger batch")
    if equal_size and len(values) % k_partitions != 0:
        raise ValueError(f"equal_size partitions need the number of sequences ({len(values)}) to be divisible by "
                         f"k_partitions ({k_partitions})")
    return values


class _PartialSolution:
    """k bins of item indices with their sums; ordered by spread (largest first) for the merge heap."""

    __slots__ = ("bins", "sums", "tiebreak")

    def __init__(self, bins: list[list[int]], sums: list[int], tiebreak: int) -> None:
        # bins sorted by sum, ascending; among equal sums the emptier bin counts as lighter, so that zero-length items
        # still fill empty bins first
        order = sorted(range(len(sums)), key=lambda i: (sums[i], len(bins[i]), i))
        self.bins = [bins[i] for i in order]
        self.sums = [sums[i] for i in order]
        self.tiebreak = tiebreak

    @property
    def spread(self) -> int:
        return self.sums[-1] - self.sums[0]

    def __lt__(self, other: "_PartialSolution") -> bool:
        # heapq is a min-heap: "smaller" means larger spread, ties broken by creation order for determinism
        if self.spread != other.spread:
            return self.spread > other.spread
        return self.tiebreak < other.tiebreak

    def merge(self, other: "_PartialSolution", tiebreak: int) -> "_PartialSolution":
        k = len(self.sums)
        # heaviest bin of one meets the lightest bin of the other
        bins = [self.bins[i] + other.bins[k - 1 - i] for i in range(k)]
        sums = [self.sums[i] + other.sums[k - 1 - i] for i in range(k)]
        return _PartialSolution(bins, sums, tiebreak)


def karmarkar_karp(seqlen_list: Sequence[int], k_partitions: int, equal_size: bool) -> list[list[int]]:
    """Largest-differencing partition of item indices into ``k_partitions`` bins with near-equal sums.

    Returns a list of ``k_partitions`` lists of indices into ``seqlen_list`` (each sorted ascending). With
    ``equal_size`` every bin holds ``len(seqlen_list) / k_partitions`` items.
    """
    values = _check_partition_args(seqlen_list, k_partitions, equal_size)
    k = k_partitions
    order = sorted(range(len(values)), key=lambda i: (values[i], i))
    heap: list[_PartialSolution] = []
    counter = 0
    if equal_size:
        for start in range(0, len(order), k):
            group = order[start:start + k]
            heap.append(_PartialSolution([[i] for i in group], [values[i] for i in group], counter))
            counter += 1
    else:
        for i in order:
            bins = [[] for _ in range(k)]
            sums = [0] * k
            bins[-1].append(i)
            sums[-1] = values[i]
            heap.append(_PartialSolution(bins, sums, counter))
            counter += 1
    heapq.heapify(heap)
    while len(heap) > 1:
        first = heapq.heappop(heap)
        second = heapq.heappop(heap)
        heapq.heappush(heap, first.merge(second, counter))
        counter += 1
    result = [sorted(b) for b in heap[0].bins]
    _fill_empty_bins(result, values)
    return result


def _fill_empty_bins(bins: list[list[int]], values: list[int]) -> None:
    """Guarantee non-empty bins (possible only with zero-length items): move the lightest item of the fullest bin."""
    for empty in [b for b in bins if not b]:
        donor = max(bins, key=len)
        item = min(donor, key=lambda i: (values[i], i))
        donor.remove(item)
        empty.append(item)


def greedy_partition(seqlen_list: Sequence[int], k_partitions: int, equal_size: bool) -> list[list[int]]:
    """Longest-first greedy: each item (largest first) goes to the currently lightest bin that still has room."""
    values = _check_partition_args(seqlen_list, k_partitions, equal_size)
    capacity = len(values) // k_partitions if equal_size else len(values)
    bins: list[list[int]] = [[] for _ in range(k_partitions)]
    sums = [0] * k_partitions
    for i in sorted(range(len(values)), key=lambda i: (-values[i], i)):
        candidates = [b for b in range(k_partitions) if len(bins[b]) < capacity]
        # an empty bin first, so that no bin stays empty when there are at least k items
        target = min(candidates, key=lambda b: (len(bins[b]) > 0, sums[b], b))
        bins[target].append(i)
        sums[target] += values[i]
    return [sorted(b) for b in bins]


def get_seqlen_balanced_partitions(seqlen_list: Sequence[int], k_partitions: int, equal_size: bool) -> list[list[int]]:
    """Split sequence indices into ``k_partitions`` non-empty groups of near-equal total length (Karmarkar-Karp).

    ``equal_size=True`` also makes every group hold the same number of sequences (needed when each DP rank must get
    the same batch size). Returns index lists, each sorted ascending, in a deterministic order.
    """
    return karmarkar_karp(seqlen_list, k_partitions, equal_size)


def log_seqlen_unbalance(seqlen_list: Sequence[int], partitions: list[list[int]], prefix: str) -> dict[str, float]:
    """Metrics comparing naive contiguous chunking with the balanced ``partitions`` of the same sequences.

    ``{prefix}/min``, ``/max``, ``/minmax_diff``: per-partition token sums when the batch is cut into equal
    consecutive chunks (what happens without balancing); ``/balanced_min``, ``/balanced_max``, ``/mean``: with the
    given partitions.
    """
    values = [int(x) for x in seqlen_list]
    k = len(partitions)
    if k == 0:
        raise ValueError("log_seqlen_unbalance needs at least one partition")
    chunk = math.ceil(len(values) / k)
    naive = [sum(values[i:i + chunk]) for i in range(0, len(values), chunk)] or [0]
    balanced = [sum(values[i] for i in part) for part in partitions]
    return {
        f"{prefix}/min": float(min(naive)),
        f"{prefix}/max": float(max(naive)),
        f"{prefix}/minmax_diff": float(max(naive) - min(naive)),
        f"{prefix}/balanced_min": float(min(balanced)),
        f"{prefix}/balanced_max": float(max(balanced)),
        f"{prefix}/mean": float(sum(balanced) / k),
    }


def _all_reduce_int(value: int, op: Any, group: Any) -> int:
    """All-reduce one int over ``group`` (on the device of the collective backend)."""
    from verl.utils.device import get_device_name

    backend = dist.get_backend(group)
    device = "cpu" if backend == "gloo" else get_device_name()
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=op, group=group)
    return int(t.item())


def rearrange_micro_batches(batch: Any,
                            max_token_len: int,
                            dp_group: Any = None,
                            num_batches_divided_by: int | None = None,
                            same_micro_num_in_dp: bool = True,
                            min_num_micro_batch: int | None = None) -> tuple[list[Any], list[list[int]]]:
    """Cut ``batch`` (a TensorDict with ``attention_mask``) into micro-batches of at most ``max_token_len`` tokens.

    Token counts are the rows' ``attention_mask`` sums. The number of micro-batches starts at
    ``ceil(total_tokens / max_token_len)`` (at least ``min_num_micro_batch``, rounded up to a multiple of
    ``num_batches_divided_by``) and grows until every balanced partition fits. With ``same_micro_num_in_dp`` and an
    initialised process group, all ranks of ``dp_group`` (default: the world) agree on the largest count, because
    FSDP forwards are collectives and every rank must run the same number of them.

    Returns ``(micro_batches, micro_bsz_idx)``: the micro-batches and, for each, the row indices of ``batch`` it
    holds; :func:`get_reverse_idx` of the concatenated indices restores the original order.
    """
    if "attention_mask" not in batch.keys():
        raise KeyError("rearrange_micro_batches needs an 'attention_mask' column to count tokens")
    if max_token_len is None or int(max_token_len) <= 0:
        raise ValueError(f"max_token_len must be a positive int, got {max_token_len!r} "
                         "(set ppo_max_token_len_per_gpu / log_prob_max_token_len_per_gpu)")
    max_token_len = int(max_token_len)
    seq_lens = [int(x) for x in batch["attention_mask"].sum(dim=-1).tolist()]
    n = len(seq_lens)
    if n == 0:
        raise ValueError("rearrange_micro_batches got an empty batch")
    longest = max(seq_lens)
    if longest > max_token_len:
        raise ValueError(f"a sequence has {longest} tokens but the micro-batch token budget max_token_len is "
                         f"{max_token_len}; raise ppo_max_token_len_per_gpu (or log_prob_max_token_len_per_gpu) to at "
                         "least prompt_length + response_length")
    sync = same_micro_num_in_dp and dist.is_available() and dist.is_initialized()
    divisor = int(num_batches_divided_by) if num_batches_divided_by else 1

    def round_up(x: int) -> int:
        return -(-x // divisor) * divisor

    num = max(1, math.ceil(sum(seq_lens) / max_token_len), int(min_num_micro_batch or 1))
    num = round_up(num)
    while True:
        if sync:
            num = _all_reduce_int(num, dist.ReduceOp.MAX, dp_group)
        if num > n:
            raise ValueError(f"{num} micro-batches are needed (token budget {max_token_len}) but this rank holds only "
                             f"{n} sequences; give every data-parallel rank the same number of rows, or raise the "
                             "token budget")
        partitions = get_seqlen_balanced_partitions(seq_lens, num, equal_size=False)
        fits = all(sum(seq_lens[i] for i in part) <= max_token_len for part in partitions)
        if sync:
            fits = bool(_all_reduce_int(int(fits), dist.ReduceOp.MIN, dp_group))
        if fits or num >= n:
            break
        num = round_up(num + 1)
    # longest micro-batches first keeps peak memory early and predictable; ties by first index for determinism
    partitions.sort(key=lambda part: (-sum(seq_lens[i] for i in part), part[0]))
    micro_batches = [batch[torch.tensor(part, dtype=torch.long)] for part in partitions]
    return micro_batches, partitions


def get_reverse_idx(idx_map: Sequence[int]) -> list[int]:
    """Inverse permutation: ``reverse[idx_map[i]] = i``, so ``concat(rows)[reverse]`` restores the original order."""
    idx_map = [int(i) for i in idx_map]
    reverse = [0] * len(idx_map)
    seen = [False] * len(idx_map)
    for pos, idx in enumerate(idx_map):
        if not 0 <= idx < len(idx_map) or seen[idx]:
            raise ValueError(f"get_reverse_idx needs a permutation of 0..{len(idx_map) - 1}, got {idx_map}")
        seen[idx] = True
        reverse[idx] = pos
    return reverse


def prepare_dynamic_batch(data: Any,
                          max_token_len: int,
                          dp_group: Any = None,
                          num_batches_divided_by: int | None = None,
                          same_micro_num_in_dp: bool = True,
                          min_num_micro_batch: int | None = None) -> tuple[list[Any], list[list[int]]]:
    """:func:`rearrange_micro_batches` for a DataProto: returns DataProto micro-batches (non-tensor columns and
    meta_info kept) and their row indices."""
    _, partitions = rearrange_micro_batches(data.batch,
                                            max_token_len=max_token_len,
                                            dp_group=dp_group,
                                            num_batches_divided_by=num_batches_divided_by,
                                            same_micro_num_in_dp=same_micro_num_in_dp,
                                            min_num_micro_batch=min_num_micro_batch)
    return [data.select_idxs(part) for part in partitions], partitions


def restore_dynamic_batch(data: torch.Tensor, batch_idx_list: list[list[int]]) -> torch.Tensor:
    """Put rows computed micro-batch by micro-batch (``data``, concatenated in micro-batch order) back in the
    original order."""
    indices = [i for part in batch_idx_list for i in part]
    if data.shape[0] != len(indices):
        raise ValueError(f"restore_dynamic_batch: {data.shape[0]} rows but the index lists cover {len(indices)}")
    reverse = torch.tensor(get_reverse_idx(indices), dtype=torch.long, device=data.device)
    return data[reverse]
