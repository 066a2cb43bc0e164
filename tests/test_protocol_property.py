"""Property tests: DataProto operations that should undo each other do so on random protos.

Random protos have 0-12 rows, 0-3 tensor columns of random dtypes and trailing shapes, and 0-3 object columns holding
mixed Python values (ints, strings, lists, dicts, None); protos with only object columns are included.
"""
import pickle

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from verl.protocol import DataProto, pad_dataproto_to_divisor, unpad_dataproto

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_DTYPES = [torch.float32, torch.int64, torch.bool, torch.bfloat16]

_objects = st.one_of(
    st.integers(-5, 5),
    st.text(max_size=4),
    st.none(),
    st.lists(st.integers(0, 9), max_size=3),
    st.dictionaries(st.sampled_from(["a", "b"]), st.integers(0, 3), max_size=2),
)


@st.composite
def protos(draw, min_rows: int = 0) -> DataProto:
    n = draw(st.integers(min_rows, 12))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(draw(st.integers(0, 3))):
        dtype = draw(st.sampled_from(_DTYPES))
        trailing = draw(st.lists(st.integers(1, 3), max_size=2))
        values = torch.randint(0, 10, (n, *trailing), generator=gen)
        tensors[f"t{i}"] = values.to(dtype) if dtype != torch.bool else values > 4
    n_object_cols = draw(st.integers(0 if tensors else 1, 3))
    non_tensors = {f"o{i}": draw(st.lists(_objects, min_size=n, max_size=n)) for i in range(n_object_cols)}
    meta_info = draw(st.dictionaries(st.sampled_from(["temperature", "step", "flag"]), st.integers(0, 3), max_size=2))
    return DataProto.from_dict(tensors=tensors, non_tensors=non_tensors, meta_info=meta_info)


def assert_proto_equal(a: DataProto, b: DataProto) -> None:
    assert len(a) == len(b)
    assert (a.batch is None) == (b.batch is None)
    if a.batch is not None:
        assert set(a.batch.keys()) == set(b.batch.keys())
        for key in a.batch.keys():
            assert a.batch[key].dtype == b.batch[key].dtype
            assert torch.equal(a.batch[key], b.batch[key]), key
    assert list(a.non_tensor_batch) == list(b.non_tensor_batch)
    for key in a.non_tensor_batch:
        assert a.non_tensor_batch[key].shape == b.non_tensor_batch[key].shape
        assert a.non_tensor_batch[key].tolist() == b.non_tensor_batch[key].tolist(), key
    assert a.meta_info == b.meta_info


@SETTINGS
@given(data=protos(), chunks=st.integers(1, 6))
def test_chunk_concat_inverse(data, chunks):
    n = len(data)
    if n % chunks != 0:
        padded, pad_size = pad_dataproto_to_divisor(data, chunks)
        parts = padded.chunk(chunks)
        assert all(len(p) == len(padded) // chunks for p in parts)
        assert_proto_equal(unpad_dataproto(DataProto.concat(parts), pad_size), data)
    else:
        parts = data.chunk(chunks)
        assert len(parts) == chunks and all(len(p) == n // chunks for p in parts)
        assert_proto_equal(DataProto.concat(parts), data)


@SETTINGS
@given(data=protos(), split_size=st.integers(1, 5))
def test_split_concat_inverse(data, split_size):
    parts = data.split(split_size)
    assert sum(len(p) for p in parts) == len(data)
    if parts:
        assert all(len(p) == split_size for p in parts[:-1])
        assert_proto_equal(DataProto.concat(parts), data)


@SETTINGS
@given(data=protos(), times=st.integers(1, 4))
def test_repeat_then_select_first_of_each_group(data, times):
    n = len(data)
    grouped = data.repeat(repeat_times=times, interleave=True)
    assert len(grouped) == n * times
    assert_proto_equal(grouped.select_idxs(np.arange(0, n * times, times)), data)
    for offset in range(times):  # every member of a group is a copy of its source row
        assert_proto_equal(grouped[offset::times], data)
    tiled = data.repeat(repeat_times=times, interleave=False)
    for copy_index in range(times):
        assert_proto_equal(tiled[copy_index * n:(copy_index + 1) * n], data)


@SETTINGS
@given(data=protos(min_rows=1), divisor=st.integers(1, 8))
def test_pad_unpad_inverse(data, divisor):
    n = len(data)
    padded, pad_size = pad_dataproto_to_divisor(data, divisor)
    assert len(padded) % divisor == 0 and 0 <= pad_size < divisor and len(padded) == n + pad_size
    assert_proto_equal(padded[n:], data.select_idxs(np.arange(pad_size) % n))
    assert_proto_equal(unpad_dataproto(padded, pad_size), data)


@SETTINGS
@given(data=protos())
def test_pickle_and_disk_roundtrip(data, tmp_path_factory):
    assert_proto_equal(pickle.loads(pickle.dumps(data)), data)
    path = tmp_path_factory.mktemp("proto") / "data.pkl"
    data.save_to_disk(path)
    assert_proto_equal(DataProto.load_from_disk(path), data)


@SETTINGS
@given(data=protos(), perm_seed=st.integers(0, 1000))
def test_reorder_then_inverse_permutation(data, perm_seed):
    n = len(data)
    perm = np.random.default_rng(perm_seed).permutation(n)
    shuffled = data.select()  # a shallow copy: reorder works in place
    shuffled.reorder(torch.from_numpy(perm))
    shuffled.reorder(torch.from_numpy(np.argsort(perm)))
    assert_proto_equal(shuffled, data)
