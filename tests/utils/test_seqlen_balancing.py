"""Sequence-length balancing: partitions are valid and balanced, micro-batches respect the token budget, and the
reverse index restores the original order."""
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tensordict import TensorDict

from verl.protocol import DataProto
from verl.utils.seqlen_balancing import (get_reverse_idx, get_seqlen_balanced_partitions, greedy_partition,
                                         karmarkar_karp, log_seqlen_unbalance, prepare_dynamic_batch,
                                         rearrange_micro_batches, restore_dynamic_batch)


@st.composite
def _lengths_and_k(draw, equal_size):
    k = draw(st.integers(1, 8))
    per = draw(st.integers(1, 6)) if equal_size else None
    n = k * per if equal_size else draw(st.integers(k, 48))
    lengths = draw(st.lists(st.integers(0, 500), min_size=n, max_size=n))
    return lengths, k


def _check_valid(parts, lengths, k, equal_size):
    assert len(parts) == k
    assert sorted(i for p in parts for i in p) == list(range(len(lengths)))  # a partition of all indices
    assert all(p for p in parts)
    assert all(p == sorted(p) for p in parts)
    if equal_size:
        assert {len(p) for p in parts} == {len(lengths) // k}


@settings(max_examples=150, deadline=None)
@given(_lengths_and_k(equal_size=False))
def test_balanced_partitions_property(case):
    lengths, k = case
    parts = get_seqlen_balanced_partitions(lengths, k, equal_size=False)
    _check_valid(parts, lengths, k, equal_size=False)
    sums = [sum(lengths[i] for i in p) for p in parts]
    # largest differencing never leaves a spread larger than the longest single item
    assert max(sums) - min(sums) <= max(lengths)


@settings(max_examples=150, deadline=None)
@given(_lengths_and_k(equal_size=True))
def test_equal_size_partitions_property(case):
    lengths, k = case
    for fn in (karmarkar_karp, greedy_partition):
        parts = fn(lengths, k, equal_size=True)
        _check_valid(parts, lengths, k, equal_size=True)
    parts = get_seqlen_balanced_partitions(lengths, k, equal_size=True)
    sums = [sum(lengths[i] for i in p) for p in parts]
    assert max(sums) - min(sums) <= max(lengths)


def test_karmarkar_karp_beats_naive_chunking():
    rng = random.Random(0)
    lengths = sorted(rng.randint(10, 2000) for _ in range(64))  # sorted: the worst case for contiguous chunks
    parts = get_seqlen_balanced_partitions(lengths, 8, equal_size=True)
    metrics = log_seqlen_unbalance(lengths, parts, prefix="global_seqlen")
    assert metrics["global_seqlen/balanced_max"] - metrics[
        "global_seqlen/balanced_min"] < 0.02 * metrics["global_seqlen/mean"]
    assert metrics["global_seqlen/minmax_diff"] > 10 * (metrics["global_seqlen/balanced_max"] -
                                                        metrics["global_seqlen/balanced_min"])
    assert metrics["global_seqlen/mean"] == pytest.approx(sum(lengths) / 8)


def test_partition_errors_are_clear():
    with pytest.raises(ValueError, match="non-empty"):
        get_seqlen_balanced_partitions([1, 2], 3, equal_size=False)
    with pytest.raises(ValueError, match="divisible"):
        get_seqlen_balanced_partitions([1, 2, 3], 2, equal_size=True)


def _batch(lengths, seqlen=32):
    mask = torch.zeros(len(lengths), seqlen, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, seqlen - n:] = 1
    return TensorDict({"attention_mask": mask, "row": torch.arange(len(lengths))}, batch_size=[len(lengths)])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 32), min_size=1, max_size=40), st.integers(32, 200))
def test_rearrange_micro_batches_respects_budget(lengths, max_token_len):
    batch = _batch(lengths)
    micro_batches, idx = rearrange_micro_batches(batch, max_token_len=max_token_len)
    assert sorted(i for p in idx for i in p) == list(range(len(lengths)))
    for mb, part in zip(micro_batches, idx):
        assert int(mb["attention_mask"].sum()) <= max_token_len
        assert mb["row"].tolist() == part
    assert len(micro_batches) >= -(-sum(lengths) // max_token_len)
    flat = torch.cat([mb["row"] for mb in micro_batches])
    assert flat[torch.tensor(get_reverse_idx([i for p in idx for i in p]))].tolist() == list(range(len(lengths)))


def test_rearrange_rejects_too_long_sequence_and_honours_divisor():
    with pytest.raises(ValueError, match="ppo_max_token_len_per_gpu"):
        rearrange_micro_batches(_batch([30, 4]), max_token_len=16)
    micro_batches, _ = rearrange_micro_batches(_batch([4] * 10), max_token_len=1000, num_batches_divided_by=4)
    assert len(micro_batches) == 4
    micro_batches, _ = rearrange_micro_batches(_batch([4] * 10), max_token_len=1000, min_num_micro_batch=3)
    assert len(micro_batches) == 3


def test_prepare_and_restore_dynamic_batch_roundtrip():
    lengths = [3, 30, 7, 12, 25, 1, 9, 16]
    batch = _batch(lengths)
    data = DataProto.from_dict(tensors=dict(batch.items()),
                               non_tensors={"uid": [f"u{i}" for i in range(8)]},
                               meta_info={"temperature": 0.7})
    micro, idx = prepare_dynamic_batch(data, max_token_len=40)
    assert all(m.meta_info["temperature"] == 0.7 for m in micro)
    assert [list(m.non_tensor_batch["uid"]) for m in micro] == [[f"u{i}" for i in p] for p in idx]
    restored = restore_dynamic_batch(torch.cat([m.batch["row"] for m in micro]), idx)
    assert restored.tolist() == list(range(8))


def test_get_reverse_idx_validates():
    assert get_reverse_idx([2, 0, 1]) == [1, 2, 0]
    with pytest.raises(ValueError, match="permutation"):
        get_reverse_idx([0, 0, 1])
