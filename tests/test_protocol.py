"""Tests of verl.protocol: DataProto, its helpers, DataProtoFuture (local Ray) and all_gather_data_proto (gloo)."""
import copy
import os
import pickle
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tensordict import TensorDict

from verl.protocol import (
    AUTO_PADDING_KEY,
    DataProto,
    DataProtoConfig,
    DataProtoFuture,
    DataProtoItem,
    all_gather_data_proto,
    collate_fn,
    fold_batch_dim,
    list_of_dict_to_dict_of_list,
    pad_dataproto_to_divisor,
    unfold_batch_dim,
    union_numpy_dict,
    union_tensor_dict,
    union_two_dict,
    unpad_dataproto,
)

# ----------------------------------------------------------------------------------------------------------------------
# fixtures and helpers
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _reset_auto_padding(monkeypatch):
    """Every test starts with the global switch unset and no VERL_AUTO_PADDING in the environment."""
    monkeypatch.delenv("VERL_AUTO_PADDING", raising=False)
    DataProtoConfig.auto_padding = None
    yield
    DataProtoConfig.auto_padding = None


def make_proto(n: int = 6, meta_info: dict | None = None) -> DataProto:
    """Rows whose content encodes the row index, so reorderings are easy to check."""
    return DataProto.from_dict(
        tensors={
            "obs": torch.arange(n * 3, dtype=torch.float32).reshape(n, 3),
            "act": torch.arange(n, dtype=torch.int64),
        },
        non_tensors={
            "name": [f"row{i}" for i in range(n)],
            "ids": [[i, i + 1] for i in range(n)],  # equal-length lists: must stay one object per row
        },
        meta_info=meta_info if meta_info is not None else {"temperature": 0.7},
    )


def make_non_tensor_proto(n: int = 5) -> DataProto:
    return DataProto.from_dict(non_tensors={"text": [f"t{i}" for i in range(n)], "extra": [{"i": i} for i in range(n)]})


def row_ids(data: DataProto) -> list[int]:
    if data.batch is not None:
        return data.batch["act"].tolist()
    return [int(t[1:]) for t in data.non_tensor_batch["text"]]


def assert_proto_equal(a: DataProto, b: DataProto) -> None:
    assert len(a) == len(b)
    assert (a.batch is None) == (b.batch is None)
    if a.batch is not None:
        keys_a = set(a.batch.keys(include_nested=True, leaves_only=True))
        assert keys_a == set(b.batch.keys(include_nested=True, leaves_only=True))
        for key in keys_a:
            assert a.batch.get(key).dtype == b.batch.get(key).dtype
            assert torch.equal(a.batch.get(key), b.batch.get(key)), key
    assert set(a.non_tensor_batch) == set(b.non_tensor_batch)
    for key in a.non_tensor_batch:
        assert a.non_tensor_batch[key].shape == b.non_tensor_batch[key].shape, key
        assert a.non_tensor_batch[key].tolist() == b.non_tensor_batch[key].tolist(), key
    assert a.meta_info == b.meta_info


# ----------------------------------------------------------------------------------------------------------------------
# construction and consistency
# ----------------------------------------------------------------------------------------------------------------------


def test_from_dict_builds_aligned_parts():
    data = make_proto(4)
    assert len(data) == 4
    assert isinstance(data.batch, TensorDict) and tuple(data.batch.batch_size) == (4,)
    ids = data.non_tensor_batch["ids"]
    assert ids.dtype == object and ids.shape == (4,), "equal-length lists must not become a 2-D array"
    assert ids[2] == [2, 3]
    assert data.meta_info == {"temperature": 0.7}
    assert not data.is_padding_enabled()


def test_from_dict_copies_meta_info_and_sets_auto_padding_flag():
    meta = {"k": 1}
    data = DataProto.from_dict(tensors={"x": torch.zeros(2)}, meta_info=meta, auto_padding=True)
    assert data.meta_info[AUTO_PADDING_KEY] is True
    assert AUTO_PADDING_KEY not in meta, "the caller's dict must not be modified"
    assert data.is_padding_enabled()


def test_from_dict_keeps_numpy_arrays_and_accepts_empty_input():
    arr = np.array([1, 2, 3])
    data = DataProto.from_dict(non_tensors={"n": arr})
    assert data.non_tensor_batch["n"] is arr and data.batch is None and len(data) == 3
    empty = DataProto.from_dict()
    assert len(empty) == 0 and empty.batch is None and empty.non_tensor_batch == {}


def test_from_dict_rejects_mismatched_tensor_rows_naming_key():
    with pytest.raises(ValueError, match="'b'.*'a'"):
        DataProto.from_dict(tensors={"a": torch.zeros(3, 2), "b": torch.zeros(4, 2)})


def test_from_dict_rejects_mismatched_non_tensor_rows_naming_key():
    with pytest.raises(ValueError, match=r"non_tensor_batch\['short'\] has 2 rows"):
        DataProto.from_dict(tensors={"a": torch.zeros(3)}, non_tensors={"short": ["x", "y"]})


def test_from_dict_rejects_bad_types():
    with pytest.raises(TypeError, match="tensors\\['a'\\]"):
        DataProto.from_dict(tensors={"a": [1, 2]})
    with pytest.raises(TypeError, match="'t'.*tensors"):
        DataProto.from_dict(non_tensors={"t": torch.zeros(2)})
    with pytest.raises(TypeError, match="'s'"):
        DataProto.from_dict(non_tensors={"s": "abc"})
    with pytest.raises(ValueError, match="num_batch_dims"):
        DataProto.from_dict(tensors={"a": torch.zeros(2)}, num_batch_dims=0)


def test_from_dict_num_batch_dims_checks_leading_dims():
    ok = DataProto.from_dict(tensors={"a": torch.zeros(2, 3, 4), "b": torch.zeros(2, 3)}, num_batch_dims=2)
    assert tuple(ok.batch.batch_size) == (2,)
    with pytest.raises(ValueError, match="'b'.*leading shape"):
        DataProto.from_dict(tensors={"a": torch.zeros(2, 3), "b": torch.zeros(2, 4)}, num_batch_dims=2)
    with pytest.raises(ValueError, match="fewer than num_batch_dims"):
        DataProto.from_dict(tensors={"a": torch.zeros(2)}, num_batch_dims=2)


def test_from_single_dict_splits_by_type():
    data = DataProto.from_single_dict({
        "x": torch.ones(2, 2),
        "s": np.array(["a", "b"], dtype=object)
    },
                                      meta_info={"m": 1},
                                      auto_padding=True)
    assert list(data.batch.keys()) == ["x"] and list(data.non_tensor_batch) == ["s"]
    assert data.meta_info == {"m": 1, AUTO_PADDING_KEY: True}
    with pytest.raises(ValueError, match="'bad'.*list"):
        DataProto.from_single_dict({"x": torch.ones(2), "bad": ["a", "b"]})


def test_direct_construction_is_checked():
    with pytest.raises(ValueError, match="exactly one batch dimension"):
        DataProto(batch=TensorDict({"a": torch.zeros(2, 3)}, batch_size=[2, 3]))
    with pytest.raises(TypeError, match=r"non_tensor_batch\['s'\].*numpy"):
        DataProto(batch=TensorDict({"a": torch.zeros(2)}, batch_size=[2]), non_tensor_batch={"s": ["a", "b"]})
    with pytest.raises(TypeError, match="TensorDict"):
        DataProto(batch={"a": torch.zeros(2)})
    with pytest.raises(ValueError, match="0-d"):
        DataProto(non_tensor_batch={"s": np.array(3)})
    with pytest.raises(TypeError, match="meta_info must be a dict"):
        DataProto(meta_info=[1])
    td = TensorDict({"a": torch.ones(3)}, batch_size=[3])
    td.set("s", "hello")  # tensordict stores this as NonTensorData, which would be silently lost on pickling
    with pytest.raises(TypeError, match="'s'.*not a tensor"):
        DataProto(batch=td)


def test_check_consistency_after_manual_edit():
    data = make_proto(3)
    data.check_consistency()
    data.non_tensor_batch["oops"] = np.array([1, 2], dtype=object)
    with pytest.raises(ValueError, match="'oops'"):
        data.check_consistency()


def test_len_and_repr():
    assert len(make_non_tensor_proto(5)) == 5
    data = make_proto(3)
    text = repr(data)
    assert "len=3" in text and "obs" in text and "name" in text and "temperature" in text


# ----------------------------------------------------------------------------------------------------------------------
# indexing
# ----------------------------------------------------------------------------------------------------------------------


def test_getitem_int_returns_item():
    data = make_proto(4)
    item = data[2]
    assert isinstance(item, DataProtoItem)
    assert item.batch["act"].item() == 2 and item.non_tensor_batch["name"] == "row2"
    assert item.non_tensor_batch["ids"] == [2, 3]
    assert item.meta_info == data.meta_info
    assert data[-1].batch["act"].item() == 3
    assert data[np.int64(1)].non_tensor_batch["name"] == "row1"
    assert data[torch.tensor(0)].non_tensor_batch["name"] == "row0"
    with pytest.raises(IndexError, match="out of range"):
        data[4]
    with pytest.raises(IndexError):
        data[-5]


def test_iteration_yields_all_rows():
    data = make_proto(3)
    assert [item.non_tensor_batch["name"] for item in data] == ["row0", "row1", "row2"]


def test_getitem_slice():
    data = make_proto(6)
    assert row_ids(data[1:4]) == [1, 2, 3]
    assert row_ids(data[::2]) == [0, 2, 4]
    assert row_ids(data[-2:]) == [4, 5]
    assert data[1:4].non_tensor_batch["name"].tolist() == ["row1", "row2", "row3"]
    assert row_ids(data.slice(2)) == [2, 3, 4, 5]
    assert data[1:4].meta_info == data.meta_info
    with pytest.raises(ValueError, match="step"):
        data.slice(0, 4, 0)


@pytest.mark.parametrize(
    "index",
    [[4, 0, 0], np.array([4, 0, 0]), torch.tensor([4, 0, 0]),
     torch.tensor([-2, 0, 0])],
    ids=["list", "ndarray", "tensor", "negative"],
)
def test_getitem_integer_arrays(index):
    data = make_proto(6)
    picked = data[index]
    expected = [4, 0, 0]
    assert row_ids(picked) == expected
    assert picked.non_tensor_batch["name"].tolist() == [f"row{i}" for i in expected]


def test_getitem_bool_masks():
    data = make_proto(4)
    mask = [True, False, True, False]
    assert row_ids(data[torch.tensor(mask)]) == [0, 2]
    assert row_ids(data[np.array(mask)]) == [0, 2]
    assert row_ids(data.select_idxs(mask)) == [0, 2]
    with pytest.raises(IndexError, match="boolean mask has length 3"):
        data[torch.tensor([True, False, True])]


def test_getitem_errors():
    data = make_proto(4)
    with pytest.raises(IndexError, match="out of range"):
        data[[0, 9]]
    with pytest.raises(IndexError, match="integers or booleans"):
        data[np.array([0.5, 1.0])]
    with pytest.raises(IndexError, match="1-D"):
        data[np.zeros((2, 2), dtype=int)]
    with pytest.raises(TypeError, match="indices must be"):
        data["obs"]
    with pytest.raises(TypeError, match="single bool"):
        data[True]


def test_select_idxs_empty_and_non_tensor_only():
    data = make_proto(3)
    assert len(data.select_idxs([])) == 0
    nt = make_non_tensor_proto(5)
    assert row_ids(nt[[3, 1]]) == [3, 1]
    assert nt[2].non_tensor_batch == {"text": "t2", "extra": {"i": 2}}
    assert nt[2].batch is None


# ----------------------------------------------------------------------------------------------------------------------
# select / pop / rename / union
# ----------------------------------------------------------------------------------------------------------------------


def test_select_by_keys():
    data = make_proto(3, meta_info={"a": 1, "b": 2})
    sub = data.select(batch_keys=["obs"], non_tensor_batch_keys=["name"], meta_info_keys=["b"])
    assert list(sub.batch.keys()) == ["obs"] and list(sub.non_tensor_batch) == ["name"]
    assert sub.meta_info == {"b": 2}
    everything = data.select()
    assert_proto_equal(everything, data)
    assert len(data.select(batch_keys=[])) == 3, "an empty key list keeps the rows"


def test_select_shares_data_but_not_containers():
    data = make_proto(3)
    sub = data.select(batch_keys="obs")
    assert sub.batch["obs"].data_ptr() == data.batch["obs"].data_ptr()
    sub.batch["new"] = torch.zeros(3)
    sub.non_tensor_batch["new"] = np.zeros(3, dtype=object)
    sub.meta_info["new"] = 1
    assert "new" not in data.batch.keys() and "new" not in data.non_tensor_batch and "new" not in data.meta_info
    everything = data.select()
    everything.batch["other"] = torch.zeros(3)
    assert "other" not in data.batch.keys()


def test_select_deepcopy_is_independent():
    data = make_proto(3, meta_info={"cfg": {"x": 1}})
    copy_ = data.select(deepcopy=True)
    copy_.batch["obs"].add_(100)
    copy_.non_tensor_batch["ids"][0].append(99)
    copy_.meta_info["cfg"]["x"] = 2
    assert data.batch["obs"][0, 0].item() == 0.0
    assert data.non_tensor_batch["ids"][0] == [0, 1]
    assert data.meta_info["cfg"] == {"x": 1}


def test_select_missing_keys_name_them():
    data = make_proto(3)
    with pytest.raises(KeyError, match="'nope'.*available"):
        data.select(batch_keys=["obs", "nope"])
    with pytest.raises(KeyError, match="'ghost'"):
        data.select(non_tensor_batch_keys=["ghost"])
    with pytest.raises(KeyError, match="'m'"):
        data.select(meta_info_keys=["m"])
    with pytest.raises(KeyError, match="'obs'"):
        make_non_tensor_proto(2).select(batch_keys=["obs"])


def test_select_non_tensor_only():
    data = make_non_tensor_proto(4)
    sub = data.select(non_tensor_batch_keys=["text"])
    assert sub.batch is None and list(sub.non_tensor_batch) == ["text"] and len(sub) == 4


def test_pop_moves_columns_out():
    data = make_proto(3, meta_info={"a": 1, "b": 2})
    popped = data.pop(batch_keys=["obs"], non_tensor_batch_keys=["name"], meta_info_keys=["a"])
    assert list(popped.batch.keys()) == ["obs"] and list(popped.non_tensor_batch) == ["name"]
    assert popped.meta_info == {"a": 1} and len(popped) == 3
    assert list(data.batch.keys()) == ["act"] and list(data.non_tensor_batch) == ["ids"]
    assert data.meta_info == {"b": 2}
    nothing = data.pop()
    assert len(nothing) == 0 and list(data.batch.keys()) == ["act"]


def test_pop_all_tensors_keeps_length():
    data = make_proto(3)
    data.pop(batch_keys=["obs", "act"])
    assert len(data) == 3 and list(data.batch.keys()) == []


def test_pop_missing_key_changes_nothing():
    data = make_proto(3)
    with pytest.raises(KeyError, match="'missing'"):
        data.pop(batch_keys=["obs", "missing"])
    assert set(data.batch.keys()) == {"obs", "act"}
    with pytest.raises(KeyError, match="'missing'"):
        data.pop(non_tensor_batch_keys=["missing"])
    with pytest.raises(KeyError, match="'missing'"):
        data.pop(meta_info_keys=["missing"])


def test_rename():
    data = make_proto(3)
    assert data.rename("obs", "observation") is data
    assert set(data.batch.keys()) == {"observation", "act"}
    data.rename(["act", "name"], ["action", "label"])
    assert set(data.batch.keys()) == {"observation", "action"}
    assert set(data.non_tensor_batch) == {"label", "ids"}
    with pytest.raises(ValueError, match="already exists"):
        data.rename("observation", "action")
    with pytest.raises(ValueError, match="already exists"):
        data.rename("label", "ids")
    with pytest.raises(KeyError, match="'nope'"):
        data.rename("nope", "x")
    with pytest.raises(ValueError, match="pair up"):
        data.rename(["a", "b"], ["c"])


def test_union_merges_everything():
    a = make_proto(3, meta_info={"x": 1})
    b = DataProto.from_dict(
        tensors={
            "obs": a.batch["obs"].clone(),
            "extra": torch.ones(3)
        },
        non_tensors={
            "name": list(a.non_tensor_batch["name"]),
            "more": [1, 2, 3]
        },
        meta_info={
            "x": 1,
            "y": 2
        },
    )
    out = a.union(b)
    assert out is a
    assert set(a.batch.keys()) == {"obs", "act", "extra"}
    assert set(a.non_tensor_batch) == {"name", "ids", "more"}
    assert a.meta_info == {"x": 1, "y": 2}


def test_union_rejects_conflicts_naming_key():
    a = make_proto(3)
    b = DataProto.from_dict(tensors={"obs": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="'obs'"):
        a.union(b)
    c = DataProto.from_dict(non_tensors={"name": ["x", "y", "z"]})
    with pytest.raises(ValueError, match="'name'"):
        make_proto(3).union(c)
    d = DataProto.from_dict(tensors={"z": torch.zeros(3)}, meta_info={"temperature": 1.0})
    with pytest.raises(ValueError, match="'temperature'"):
        make_proto(3).union(d)
    with pytest.raises(ValueError, match="different lengths"):
        make_proto(3).union(make_proto(4))
    with pytest.raises(TypeError, match="DataProto"):
        make_proto(3).union({"a": 1})


def test_union_of_non_tensor_only_with_batch():
    nt = make_non_tensor_proto(3)
    nt.union(DataProto.from_dict(tensors={"v": torch.arange(3)}))
    assert nt.batch["v"].tolist() == [0, 1, 2] and len(nt) == 3
    meta_only = DataProto(meta_info={"k": 1})
    meta_only.union(make_proto(2))
    assert len(meta_only) == 2 and meta_only.meta_info["k"] == 1


def test_union_helpers():
    td1 = TensorDict({"a": torch.tensor([1.0, float("nan")])}, batch_size=[2])
    td2 = TensorDict({"a": torch.tensor([1.0, float("nan")]), "b": torch.zeros(2)}, batch_size=[2])
    assert set(union_tensor_dict(td1, td2).keys()) == {"a", "b"}, "NaN in equal positions counts as equal"
    with pytest.raises(ValueError, match="batch sizes"):
        union_tensor_dict(td1, TensorDict({}, batch_size=[3]))
    n1 = {"s": np.array([{"k": 1}, None], dtype=object)}
    union_numpy_dict(n1, {"s": np.array([{"k": 1}, None], dtype=object), "t": np.array([1, 2])})
    assert set(n1) == {"s", "t"}
    with pytest.raises(ValueError, match="'s'"):
        union_numpy_dict(n1, {"s": np.array([{"k": 2}, None], dtype=object)})
    with pytest.raises(TypeError, match="'s'"):
        union_numpy_dict(n1, {"s": [1, 2]})
    assert union_two_dict({"a": 1}, {"b": 2}) == {"a": 1, "b": 2}
    with pytest.raises(ValueError, match="'a'"):
        union_two_dict({"a": 1}, {"a": 2})


# ----------------------------------------------------------------------------------------------------------------------
# chunk / split / concat
# ----------------------------------------------------------------------------------------------------------------------


def test_chunk_splits_evenly_and_copies_meta_info():
    data = make_proto(6)
    parts = data.chunk(3)
    assert [row_ids(p) for p in parts] == [[0, 1], [2, 3], [4, 5]]
    assert [p.non_tensor_batch["name"].tolist() for p in parts][2] == ["row4", "row5"]
    parts[0].meta_info["changed"] = True
    assert "changed" not in data.meta_info and "changed" not in parts[1].meta_info
    assert [len(p) for p in data.chunk(1)] == [6]


def test_chunk_non_divisible_is_a_clear_error():
    with pytest.raises(ValueError, match="pad_dataproto_to_divisor"):
        make_proto(5).chunk(2)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="positive int"):
            make_proto(4).chunk(bad)


def test_chunk_with_padding_enabled_allows_uneven_sizes():
    data = DataProto.from_dict(tensors={"act": torch.arange(5)}, auto_padding=True)
    parts = data.chunk(2)
    assert [row_ids(p) for p in parts] == [[0, 1, 2], [3, 4]]
    assert [len(p) for p in data.chunk(7)] == [1, 1, 1, 1, 1, 0, 0]


def test_global_auto_padding_switch_and_env(monkeypatch):
    data = make_proto(5)
    assert not data.is_padding_enabled()
    DataProtoConfig.auto_padding = True
    assert DataProtoConfig.auto_padding and data.is_padding_enabled()
    assert [len(p) for p in data.chunk(2)] == [3, 2]
    DataProtoConfig.auto_padding = None
    monkeypatch.setenv("VERL_AUTO_PADDING", "1")
    assert data.is_padding_enabled()
    DataProtoConfig.auto_padding = False  # an explicit setting wins over the environment
    assert not data.is_padding_enabled()
    with pytest.raises(TypeError, match="bool"):
        DataProtoConfig.auto_padding = "yes"


def test_split():
    data = make_proto(5)
    parts = data.split(2)
    assert [row_ids(p) for p in parts] == [[0, 1], [2, 3], [4]]
    assert [row_ids(p) for p in data.split(10)] == [[0, 1, 2, 3, 4]]
    with pytest.raises(ValueError, match="positive int"):
        data.split(0)


def test_chunk_then_concat_roundtrip():
    data = make_proto(6)
    assert_proto_equal(DataProto.concat(data.chunk(3)), data)
    nt = make_non_tensor_proto(6)
    assert_proto_equal(DataProto.concat(nt.chunk(2)), nt)


def test_concat_merges_metrics():
    parts = make_proto(4).chunk(2)
    parts[0].meta_info["metrics"] = {"loss": 1.0, "acc": 0.5}
    parts[1].meta_info["metrics"] = [{"loss": 2.0}, {"loss": 3.0, "kl": 0.1}]
    out = DataProto.concat(parts)
    assert out.meta_info["metrics"] == {"loss": [1.0, 2.0, 3.0], "acc": [0.5], "kl": [0.1]}
    assert out.meta_info["temperature"] == 0.7
    parts[1].meta_info["metrics"] = None
    assert DataProto.concat(parts).meta_info["metrics"] == {"loss": [1.0], "acc": [0.5]}


def test_concat_rejects_conflicting_meta_info_naming_key():
    parts = make_proto(4).chunk(2)
    parts[1].meta_info["temperature"] = 1.0
    with pytest.raises(ValueError, match="'temperature'"):
        DataProto.concat(parts)
    parts[1].meta_info["temperature"] = 0.7
    parts[1].meta_info["metrics"] = 3.0
    with pytest.raises(TypeError, match="metrics"):
        DataProto.concat(parts)


def test_concat_errors():
    with pytest.raises(ValueError, match="at least one"):
        DataProto.concat([])
    with pytest.raises(TypeError, match="element 1"):
        DataProto.concat([make_proto(2), "x"])
    a, b = make_proto(2), make_proto(2)
    b.pop(batch_keys=["obs"])
    with pytest.raises(ValueError, match="element 1 has tensor columns"):
        DataProto.concat([a, b])
    c = make_proto(2)
    c.pop(non_tensor_batch_keys=["ids"])
    with pytest.raises(ValueError, match="non-tensor columns"):
        DataProto.concat([a, c])
    with pytest.raises(ValueError, match="tensor batch"):
        DataProto.concat([a, make_non_tensor_proto(2)])


# ----------------------------------------------------------------------------------------------------------------------
# repeat / sample_level_repeat / reorder / padding
# ----------------------------------------------------------------------------------------------------------------------


def test_repeat_interleave_keeps_groups_together():
    data = make_proto(3)
    out = data.repeat(2, interleave=True)
    assert row_ids(out) == [0, 0, 1, 1, 2, 2]
    assert out.non_tensor_batch["name"].tolist() == ["row0", "row0", "row1", "row1", "row2", "row2"]
    assert out.batch["obs"].shape == (6, 3) and out.meta_info == data.meta_info
    assert row_ids(data.repeat()) == [0, 0, 1, 1, 2, 2], "default is repeat_times=2, interleave=True"


def test_repeat_tile():
    data = make_proto(3)
    out = data.repeat(repeat_times=3, interleave=False)
    assert row_ids(out) == [0, 1, 2] * 3
    assert out.non_tensor_batch["ids"].tolist() == [[0, 1], [1, 2], [2, 3]] * 3


def test_repeat_non_tensor_only_and_errors():
    nt = make_non_tensor_proto(2)
    assert row_ids(nt.repeat(2)) == [0, 0, 1, 1]
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="repeat_times"):
            nt.repeat(bad)


@pytest.mark.parametrize("counts", [[2, 0, 1], np.array([2, 0, 1]), torch.tensor([2, 0, 1])])
def test_sample_level_repeat(counts):
    data = make_proto(3)
    out = data.sample_level_repeat(counts)
    assert row_ids(out) == [0, 0, 2]
    assert out.non_tensor_batch["name"].tolist() == ["row0", "row0", "row2"]


def test_sample_level_repeat_errors():
    data = make_proto(3)
    with pytest.raises(ValueError, match="one repeat count per row"):
        data.sample_level_repeat([1, 2])
    with pytest.raises(ValueError, match="non-negative"):
        data.sample_level_repeat([1, -1, 1])
    with pytest.raises(ValueError, match="non-negative integers"):
        data.sample_level_repeat([1.5, 1, 1])


def test_reorder_in_place():
    data = make_proto(4)
    assert data.reorder(torch.tensor([3, 1, 0, 2])) is None
    assert row_ids(data) == [3, 1, 0, 2]
    assert data.non_tensor_batch["name"].tolist() == ["row3", "row1", "row0", "row2"]
    with pytest.raises(ValueError, match="permutation"):
        data.reorder(torch.tensor([0, 0, 1, 2]))
    with pytest.raises(ValueError, match="permutation"):
        data.reorder([0, 1])


def test_padding_in_place():
    data = make_proto(3)
    data.padding(2)
    assert row_ids(data) == [0, 1, 2, 2, 2]
    assert data.non_tensor_batch["name"].tolist()[-1] == "row2"
    first = make_non_tensor_proto(2)
    first.padding(1, padding_candidate="first")
    assert row_ids(first) == [0, 1, 0]
    same = make_proto(2)
    same.padding(0)
    assert len(same) == 2
    with pytest.raises(ValueError, match=">= 0"):
        same.padding(-1)
    with pytest.raises(ValueError, match="empty"):
        DataProto().padding(1)


def test_pad_and_unpad_to_divisor():
    data = make_proto(5)
    padded, pad_size = pad_dataproto_to_divisor(data, 4)
    assert pad_size == 3 and len(padded) == 8
    assert row_ids(padded) == [0, 1, 2, 3, 4, 0, 1, 2], "padding re-appends the leading rows"
    assert len(data) == 5, "the input is not modified"
    assert_proto_equal(unpad_dataproto(padded, pad_size), data)
    same, zero = pad_dataproto_to_divisor(data, 5)
    assert zero == 0 and same is data and unpad_dataproto(same, 0) is same


def test_pad_more_rows_than_present_cycles():
    data = make_proto(2)
    padded, pad_size = pad_dataproto_to_divisor(data, 7)
    assert pad_size == 5 and row_ids(padded) == [0, 1, 0, 1, 0, 1, 0]


def test_pad_unpad_errors():
    with pytest.raises(ValueError, match="size_divisor"):
        pad_dataproto_to_divisor(make_proto(3), 0)
    with pytest.raises(TypeError, match="DataProto"):
        pad_dataproto_to_divisor([1, 2], 2)
    with pytest.raises(ValueError, match="out of range"):
        unpad_dataproto(make_proto(2), 3)
    with pytest.raises(ValueError, match="out of range"):
        unpad_dataproto(make_proto(2), -1)
    empty, pad = pad_dataproto_to_divisor(DataProto(), 4)
    assert pad == 0 and len(empty) == 0


def test_padded_chunk_dispatch_pattern():
    """What the single controller does: pad, chunk across workers, concat the outputs, unpad."""
    data = make_proto(7)
    padded, pad_size = pad_dataproto_to_divisor(data, 3)
    outputs = [part.select(batch_keys=["act"], non_tensor_batch_keys=["name"]) for part in padded.chunk(3)]
    merged = unpad_dataproto(DataProto.concat(outputs), pad_size)
    assert row_ids(merged) == list(range(7))
    assert merged.non_tensor_batch["name"].tolist() == [f"row{i}" for i in range(7)]


# ----------------------------------------------------------------------------------------------------------------------
# make_iterator / collate_fn / fold
# ----------------------------------------------------------------------------------------------------------------------


def test_make_iterator_in_order():
    data = make_proto(6, meta_info={"epoch_meta": 1})
    batches = list(data.make_iterator(mini_batch_size=2, epochs=2))
    assert len(batches) == 6
    assert [row_ids(b) for b in batches[:3]] == [[0, 1], [2, 3], [4, 5]]
    assert all(b.meta_info == {"epoch_meta": 1} for b in batches)
    assert batches[0].non_tensor_batch["ids"].tolist() == [[0, 1], [1, 2]]


def test_make_iterator_shuffle_is_seeded():
    data = make_proto(8)
    kwargs = {"shuffle": True}
    first = [row_ids(b) for b in data.make_iterator(2, epochs=2, seed=3, dataloader_kwargs=kwargs)]
    second = [row_ids(b) for b in data.make_iterator(2, epochs=2, seed=3, dataloader_kwargs=kwargs)]
    other = [row_ids(b) for b in data.make_iterator(2, epochs=2, seed=4, dataloader_kwargs=kwargs)]
    assert first == second and first != other
    for epoch in (first[:4], first[4:]):
        assert sorted(sum(epoch, [])) == list(range(8)), "every epoch visits every row once"
    assert first[:4] != first[4:], "epochs are shuffled differently"


def test_make_iterator_errors():
    data = make_proto(6)
    with pytest.raises(ValueError, match="not divisible by mini_batch_size=4"):
        data.make_iterator(4, epochs=1)
    with pytest.raises(ValueError, match="'batch_size'"):
        data.make_iterator(2, epochs=1, dataloader_kwargs={"batch_size": 3})
    with pytest.raises(ValueError, match="positive int"):
        data.make_iterator(0, epochs=1)


def test_make_iterator_non_tensor_only():
    nt = make_non_tensor_proto(4)
    assert [row_ids(b) for b in nt.make_iterator(2, epochs=1)] == [[0, 1], [2, 3]]


def test_collate_fn_restacks_items():
    data = make_proto(4)
    data.non_tensor_batch["matrix"] = np.arange(8).reshape(4, 2)  # a numeric 2-D column survives as such
    out = collate_fn([data[i] for i in range(4)])
    assert_proto_equal(out, data)
    nt = make_non_tensor_proto(3)
    assert_proto_equal(collate_fn([nt[i] for i in range(3)]), nt)
    with pytest.raises(ValueError, match="at least one"):
        collate_fn([])


def test_collate_fn_works_as_dataloader_collate():
    data = make_proto(4)
    loader = torch.utils.data.DataLoader(data, batch_size=2, collate_fn=collate_fn)
    assert [row_ids(b) for b in loader] == [[0, 1], [2, 3]]


def test_list_of_dict_to_dict_of_list():
    assert list_of_dict_to_dict_of_list([{"a": 1}, {"a": 2, "b": 3}]) == {"a": [1, 2], "b": [3]}
    assert list_of_dict_to_dict_of_list([]) == {}
    with pytest.raises(TypeError, match="element 1"):
        list_of_dict_to_dict_of_list([{"a": 1}, 2])


def test_fold_and_unfold_batch_dim():
    data = make_proto(6)
    folded = fold_batch_dim(data, 2)
    assert len(folded) == 2
    assert folded.batch["obs"].shape == (2, 3, 3) and folded.batch["act"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert folded.non_tensor_batch["name"].shape == (2, 3)
    assert_proto_equal(unfold_batch_dim(folded, batch_dims=2), data)
    with pytest.raises(ValueError, match="cannot be folded"):
        fold_batch_dim(data, 4)
    nt = make_non_tensor_proto(4)
    assert_proto_equal(unfold_batch_dim(fold_batch_dim(nt, 2)), nt)


def test_unfold_column_chunks():
    data = DataProto.from_dict(
        tensors={
            "seq": torch.arange(12).reshape(2, 6),
            "score": torch.tensor([1.0, 2.0])
        },
        non_tensors={"name": ["a", "b"]},
        meta_info={"m": 1},
    )
    out = data.unfold_column_chunks(3, split_keys=["seq"])
    assert out.batch["seq"].tolist() == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]
    assert out.batch["score"].tolist() == [1.0, 1.0, 1.0, 2.0, 2.0, 2.0]
    assert out.non_tensor_batch["name"].tolist() == ["a", "a", "a", "b", "b", "b"]
    assert out.meta_info == {"m": 1}
    with pytest.raises(ValueError, match="'score'"):
        data.unfold_column_chunks(3)  # "score" has no dimension 1 to split
    with pytest.raises(ValueError, match="'seq'.*divide"):
        data.unfold_column_chunks(4, split_keys=["seq"])
    with pytest.raises(KeyError, match="'nope'"):
        data.unfold_column_chunks(2, split_keys=["nope"])


def test_to_and_from_tensordict():
    data = make_proto(3, meta_info={"temperature": 0.5, "cfg": {"a": 1}})
    td = data.to_tensordict()
    assert isinstance(td, TensorDict) and tuple(td.batch_size) == (3,)
    assert td.get("name").tolist() == ["row0", "row1", "row2"]
    back = DataProto.from_tensordict(td)
    assert_proto_equal(back, data)
    nt = make_non_tensor_proto(2)
    nt_back = DataProto.from_tensordict(nt.to_tensordict(), meta_info={"extra": 1})
    assert nt_back.batch is None and nt_back.meta_info == {"extra": 1}
    assert nt_back.non_tensor_batch["extra"].tolist() == [{"i": 0}, {"i": 1}]
    with pytest.raises(ValueError, match="'temperature'"):
        DataProto.from_dict(tensors={"temperature": torch.zeros(1)}, meta_info={"temperature": 1}).to_tensordict()
    with pytest.raises(ValueError, match="one batch dimension"):
        DataProto.from_tensordict(TensorDict({"a": torch.zeros(2, 2)}, batch_size=[2, 2]))
    with pytest.raises(TypeError, match="TensorDict"):
        DataProto.from_tensordict({"a": torch.zeros(2)})


# ----------------------------------------------------------------------------------------------------------------------
# device, diagnostics, serialization
# ----------------------------------------------------------------------------------------------------------------------


def test_to_moves_batch_and_returns_self():
    data = make_proto(2)
    assert data.to("meta") is data
    assert data.batch["obs"].device.type == "meta"
    nt = make_non_tensor_proto(2)
    assert nt.to("cpu") is nt and nt.batch is None


def test_diagnostics(capsys):
    data = make_proto(3)
    info = data.get_data_info()
    assert "3 rows" in info and "obs" in info and "shape=(3, 3)" in info and "name" in info
    data.print_size(prefix="[x] ")
    out = capsys.readouterr().out
    assert out.startswith("[x] Size of tensordict") and "MB" in out
    assert "0 rows" in DataProto().get_data_info()


def test_pickle_roundtrip_including_odd_tensors():
    data = make_proto(4, meta_info={"metrics": {"a": [1.0]}})
    data.batch["bf16"] = torch.randn(4, 2).to(torch.bfloat16)
    data.batch["transposed"] = torch.randn(5, 4).t()  # non-contiguous
    data.batch["nested"] = TensorDict({"inner": torch.arange(4)}, batch_size=[4])
    restored = pickle.loads(pickle.dumps(data))
    assert_proto_equal(restored, data)
    assert restored.batch["transposed"].is_contiguous()
    assert restored.batch["nested", "inner"].tolist() == [0, 1, 2, 3]
    empty_cols = make_proto(3)
    empty_cols.pop(batch_keys=["obs", "act"])
    assert len(pickle.loads(pickle.dumps(empty_cols))) == 3


def test_copy_is_shallow_and_deepcopy_is_deep():
    data = make_proto(3, meta_info={"cfg": {"x": 1}})
    shallow = copy.copy(data)
    assert shallow.batch["obs"].data_ptr() == data.batch["obs"].data_ptr()
    deep = copy.deepcopy(data)
    deep.batch["obs"].add_(1)
    deep.non_tensor_batch["ids"][0].append(7)
    deep.meta_info["cfg"]["x"] = 2
    assert data.batch["obs"][0, 0].item() == 0.0 and data.non_tensor_batch["ids"][0] == [0, 1]
    assert data.meta_info["cfg"] == {"x": 1}


def test_pickled_chunk_ships_only_its_rows():
    data = DataProto.from_dict(tensors={"x": torch.randn(1000, 64)})
    full = len(pickle.dumps(data))
    part = len(pickle.dumps(data.chunk(10)[3]))
    assert part < full / 5, f"a chunk pickled to {part} bytes, the full batch to {full}"
    assert torch.equal(pickle.loads(pickle.dumps(data.chunk(10)[3])).batch["x"], data.batch["x"][300:400])


def test_save_and_load(tmp_path):
    data = make_proto(3)
    path = tmp_path / "batch.pkl"
    data.save_to_disk(path)
    assert_proto_equal(DataProto.load_from_disk(path), data)
    nt = make_non_tensor_proto(3)
    nt.save_to_disk(str(path))
    assert_proto_equal(DataProto.load_from_disk(str(path)), nt)
    with open(tmp_path / "other.pkl", "wb") as f:
        pickle.dump({"not": "a proto"}, f)
    with pytest.raises(TypeError, match="does not contain a DataProto"):
        DataProto.load_from_disk(tmp_path / "other.pkl")


# ----------------------------------------------------------------------------------------------------------------------
# all_gather_data_proto over a 2-process gloo group
# ----------------------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _all_gather_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        n = 2 + rank  # ranks hold different numbers of rows
        data = DataProto.from_dict(
            tensors={
                "x": torch.full((n, 2), float(rank)),
                "row": torch.arange(n)
            },
            non_tensors={"who": [f"r{rank}-{i}" for i in range(n)]},
            meta_info={"rank": rank},
        )
        all_gather_data_proto(data, process_group=None)
        data.save_to_disk(os.path.join(out_dir, f"rank{rank}.pkl"))
    finally:
        dist.destroy_process_group()


def test_all_gather_data_proto_gloo(tmp_path):
    mp.spawn(_all_gather_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        data = DataProto.load_from_disk(tmp_path / f"rank{rank}.pkl")
        assert len(data) == 5
        assert data.batch["x"][:, 0].tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]
        assert data.batch["row"].tolist() == [0, 1, 0, 1, 2]
        assert data.non_tensor_batch["who"].tolist() == ["r0-0", "r0-1", "r1-0", "r1-1", "r1-2"]
        assert data.meta_info == {"rank": rank}, "meta_info stays local"


# ----------------------------------------------------------------------------------------------------------------------
# DataProtoFuture and Ray transport (one local Ray cluster for the module)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _make_remote_functions(ray):

    @ray.remote
    def produce(start: int, n: int) -> DataProto:
        return DataProto.from_dict(
            tensors={"act": torch.arange(start, start + n)},
            non_tensors={"name": [f"row{i}" for i in range(start, start + n)]},
            meta_info={"metrics": {
                "producer": start
            }},
        )

    @ray.remote
    def materialize(future: DataProtoFuture) -> DataProto:
        data = future.get()  # what a worker does with a future argument
        data.batch["double"] = data.batch["act"] * 2
        return data

    @ray.remote
    def echo(data: DataProto) -> DataProto:
        data.non_tensor_batch["seen"] = np.array([True] * len(data), dtype=object)
        return data

    return produce, materialize, echo


def test_dataproto_survives_ray_transport(ray_cluster):
    ray = ray_cluster
    _, _, echo = _make_remote_functions(ray)
    data = make_proto(4, meta_info={"metrics": {"a": 1}})
    data.batch["nested"] = TensorDict({"inner": torch.ones(4, 2)}, batch_size=[4])
    back = ray.get(echo.remote(data))
    assert isinstance(back.batch, TensorDict)
    assert back.non_tensor_batch.pop("seen").tolist() == [True] * 4
    assert_proto_equal(back, data)
    assert_proto_equal(ray.get(ray.put(make_non_tensor_proto(3))), make_non_tensor_proto(3))


def test_dataproto_future_concat_and_get(ray_cluster):
    ray = ray_cluster
    produce, _, _ = _make_remote_functions(ray)
    future = DataProtoFuture.concat([produce.remote(0, 2), produce.remote(2, 2)])
    assert future.collect_fn is DataProto.concat and future.dispatch_fn is None
    data = future.get()
    assert row_ids(data) == [0, 1, 2, 3]
    assert data.meta_info["metrics"] == {"producer": [0, 2]}


def test_dataproto_future_chunk(ray_cluster):
    ray = ray_cluster
    produce, _, _ = _make_remote_functions(ray)
    future = DataProtoFuture.concat([produce.remote(0, 3), produce.remote(3, 3)])
    shards = future.chunk(3)
    assert len(shards) == 3 and all(s.futures == future.futures for s in shards)
    assert [row_ids(s.get()) for s in shards] == [[0, 1], [2, 3], [4, 5]]
    assert [row_ids(s.get()) for s in shards[1].chunk(2)] == [[2], [3]], "chunking a shard composes"
    with pytest.raises(ValueError, match="positive int"):
        future.chunk(0)


def test_dataproto_future_materialized_in_worker(ray_cluster):
    ray = ray_cluster
    produce, materialize, _ = _make_remote_functions(ray)
    future = DataProtoFuture.concat([produce.remote(0, 2), produce.remote(2, 2)])
    outputs = ray.get([materialize.remote(shard) for shard in future.chunk(2)])
    assert [row_ids(o) for o in outputs] == [[0, 1], [2, 3]]
    assert outputs[1].batch["double"].tolist() == [4, 6]
    assert outputs[1].non_tensor_batch["name"].tolist() == ["row2", "row3"]
