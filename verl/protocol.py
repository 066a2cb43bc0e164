"""``DataProto``: the one data currency passed between the driver and the workers.

A ``DataProto`` is a batch of rows. Tensor columns live in a :class:`tensordict.TensorDict` (``batch``) whose single
batch dimension is the row axis; everything else that is per-row (strings, chat messages, dicts, ragged lists) lives in
``non_tensor_batch`` as numpy arrays (``dtype=object``) of the same length; ``meta_info`` holds batch-level values
(sampling temperature, metrics, flags). Every operation keeps those three parts aligned, so the single controller can
split a batch across workers (``chunk``), gather the results (``concat``) and pad batches that do not divide evenly
(``pad_dataproto_to_divisor`` / ``unpad_dataproto``).

This module imports nothing else from verl (it is the bottom layer), except a lazy device lookup in
:func:`all_gather_data_proto` when the collective backend needs an accelerator.
"""
from __future__ import annotations

import copy
import io
import math
import os
import pickle
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tensordict import NonTensorData, NonTensorStack, TensorDict, is_tensor_collection

__all__ = [
    "AUTO_PADDING_KEY",
    "DataProto",
    "DataProtoConfig",
    "DataProtoFuture",
    "DataProtoItem",
    "all_gather_data_proto",
    "collate_fn",
    "fold_batch_dim",
    "list_of_dict_to_dict_of_list",
    "pad_dataproto_to_divisor",
    "union_numpy_dict",
    "union_tensor_dict",
    "union_two_dict",
    "unfold_batch_dim",
    "unpad_dataproto",
]

#: ``meta_info`` key that turns on automatic padding for one DataProto (see :meth:`DataProto.is_padding_enabled`).
AUTO_PADDING_KEY = "_verl_auto_padding"
_AUTO_PADDING_ENV = "VERL_AUTO_PADDING"
_TRUE_STRINGS = ("1", "true", "yes", "on")


class _DataProtoConfigMeta(type):
    """Metaclass so that ``DataProtoConfig.auto_padding`` reads and writes like a plain class attribute."""

    _auto_padding: bool | None = None

    @property
    def auto_padding(cls) -> bool:
        if cls._auto_padding is not None:
            return cls._auto_padding
        return os.environ.get(_AUTO_PADDING_ENV, "").strip().lower() in _TRUE_STRINGS

    @auto_padding.setter
    def auto_padding(cls, enabled: bool | None) -> None:
        if enabled is not None and not isinstance(enabled, bool):
            raise TypeError(f"DataProtoConfig.auto_padding must be a bool (or None to follow ${_AUTO_PADDING_ENV}), "
                            f"got {enabled!r}")
        cls._auto_padding = enabled


class DataProtoConfig(metaclass=_DataProtoConfigMeta):
    """Global switches for DataProto.

    ``DataProtoConfig.auto_padding = True`` makes every DataProto behave as if it had been built with
    ``auto_padding=True``. When never set (or set back to ``None``) the environment variable ``VERL_AUTO_PADDING=1``
    decides.
    """


# ----------------------------------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------------------------------


def _to_object_array(values: Any, key: str = "?") -> np.ndarray:
    """A 1-D ``dtype=object`` array with one element per row.

    ``np.array(list_of_lists, dtype=object)`` silently builds a 2-D array when the inner lists have equal length, which
    would turn a ragged column (token id lists, chat messages) into a matrix. Filling an empty object array keeps one
    Python object per row.
    """
    if isinstance(values, np.ndarray):
        return values
    if isinstance(values, torch.Tensor):
        raise TypeError(f"non-tensor column {key!r} is a torch.Tensor; pass it in `tensors` instead")
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) and not hasattr(values, "__len__"):
        raise TypeError(f"non-tensor column {key!r} must be a list or numpy array with one entry per row, "
                        f"got {type(values).__name__}")
    values = list(values)
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


def _stack_object_values(values: list[Any]) -> np.ndarray:
    """Stack per-row values (as found in a DataProtoItem) back into one column array."""
    if values and all(isinstance(v, np.ndarray) for v in values) and len({v.shape for v in values}) == 1:
        return np.stack(values)  # rows of a multi-dimensional column
    return _to_object_array(values)


def _values_equal(a: Any, b: Any) -> bool:
    """Deep equality that works for tensors, numpy (object) arrays, NaN and nested containers."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.device != b.device:
            b = b.to(a.device)
        if a.is_floating_point() or a.is_complex():
            return bool(torch.equal(a, b) or torch.allclose(a, b, rtol=0, atol=0, equal_nan=True))
        return bool(torch.equal(a, b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)) or a.shape != b.shape:
            return False
        if a.dtype == object or b.dtype == object:
            return all(_values_equal(x, y) for x, y in zip(a.ravel().tolist(), b.ravel().tolist()))
        try:
            return bool(np.array_equal(a, b, equal_nan=True))
        except TypeError:  # equal_nan is not defined for non-numeric dtypes
            return bool(np.array_equal(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_values_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_values_equal(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - objects whose == is ambiguous are simply "not equal"
        return False


def _as_key_list(keys: str | Sequence[str] | None, what: str) -> list[str] | None:
    if keys is None:
        return None
    if isinstance(keys, str):
        return [keys]
    if not isinstance(keys, (list, tuple, set, frozenset, dict, type({}.keys()))):
        raise TypeError(f"{what} must be a string or a list of strings, got {type(keys).__name__}")
    return list(keys)


def _as_index_array(idxs: Any, length: int) -> np.ndarray:
    """Normalize a list / numpy array / tensor of int or bool indices to a 1-D int64 numpy array."""
    if isinstance(idxs, torch.Tensor):
        idxs = idxs.detach().cpu().numpy()
    idxs = np.asarray(idxs)
    if idxs.ndim != 1:
        raise IndexError(f"DataProto row indices must be 1-D, got shape {idxs.shape}")
    if idxs.dtype == np.bool_:
        if idxs.shape[0] != length:
            raise IndexError(f"boolean mask has length {idxs.shape[0]} but the DataProto has {length} rows")
        return np.nonzero(idxs)[0].astype(np.int64)
    if idxs.size == 0:
        return idxs.astype(np.int64)
    if not np.issubdtype(idxs.dtype, np.integer):
        raise IndexError(f"DataProto row indices must be integers or booleans, got dtype {idxs.dtype}")
    if idxs.max() >= length or idxs.min() < -length:
        raise IndexError(f"row index out of range for a DataProto of {length} rows: "
                         f"min={int(idxs.min())}, max={int(idxs.max())}")
    return np.where(idxs < 0, idxs + length, idxs).astype(np.int64)


def _batch_leaves(td: TensorDict) -> list[tuple[str | tuple[str, ...], Any]]:
    """All leaf entries of a TensorDict, including non-tensor ones (which ``leaves_only=True`` alone skips)."""
    return list(
        td.items(include_nested=True,
                 leaves_only=True,
                 is_leaf=lambda cls: not is_tensor_collection(cls) or issubclass(cls, NonTensorData)))


def _tensor_nbytes(td: TensorDict | None) -> int:
    if td is None:
        return 0
    return sum(t.numel() * t.element_size()
               for t in td.values(include_nested=True, leaves_only=True)
               if isinstance(t, torch.Tensor))


def _object_nbytes(arr: np.ndarray) -> int:
    """Approximate payload of a numpy column: object arrays count the Python objects they point to."""
    if arr.dtype != object:
        return int(arr.nbytes)
    return int(arr.nbytes) + sum(sys.getsizeof(x) for x in arr.ravel().tolist())


# ----------------------------------------------------------------------------------------------------------------------
# dict unions
# ----------------------------------------------------------------------------------------------------------------------


def union_two_dict(dict1: dict, dict2: dict) -> dict:
    """Merge ``dict2`` into ``dict1`` in place; a key present in both must hold equal values."""
    for key, val in dict2.items():
        if key in dict1 and not _values_equal(dict1[key], val):
            raise ValueError(f"cannot union: key {key!r} exists in both dicts with different values "
                             f"({dict1[key]!r} vs {val!r}); rename or pop one of them first")
        dict1[key] = val
    return dict1


def union_tensor_dict(tensor_dict1: TensorDict, tensor_dict2: TensorDict) -> TensorDict:
    """Add the columns of ``tensor_dict2`` to ``tensor_dict1`` (in place) and return it.

    Both must have the same batch size; a column present in both must be equal, otherwise the union would silently
    drop one of them.
    """
    if tensor_dict1.batch_size != tensor_dict2.batch_size:
        raise ValueError(f"cannot union TensorDicts with different batch sizes: {tuple(tensor_dict1.batch_size)} vs "
                         f"{tuple(tensor_dict2.batch_size)}")
    for key in tensor_dict2.keys(include_nested=True, leaves_only=True):
        value = tensor_dict2.get(key)
        if key in tensor_dict1.keys(include_nested=True, leaves_only=True):
            if not _values_equal(tensor_dict1.get(key), value):
                raise ValueError(f"cannot union: tensor column {key!r} exists in both batches with different values; "
                                 "rename or pop one of them first")
        else:
            tensor_dict1.set(key, value)
    return tensor_dict1


def union_numpy_dict(tensor_dict1: dict[str, np.ndarray], tensor_dict2: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Add the numpy columns of ``tensor_dict2`` to ``tensor_dict1`` (in place); shared keys must hold equal data."""
    for key, val in tensor_dict2.items():
        if key in tensor_dict1:
            if not isinstance(val, np.ndarray) or not isinstance(tensor_dict1[key], np.ndarray):
                raise TypeError(f"non-tensor column {key!r} must be a numpy array on both sides of the union")
            if not _values_equal(tensor_dict1[key], val):
                raise ValueError(f"cannot union: non-tensor column {key!r} exists in both with different values; "
                                 "rename or pop one of them first")
        tensor_dict1[key] = val
    return tensor_dict1


def list_of_dict_to_dict_of_list(list_of_dict: list[dict]) -> dict[str, list]:
    """``[{"a": 1}, {"a": 2, "b": 3}] -> {"a": [1, 2], "b": [3]}`` (keys in order of first appearance)."""
    output: dict[str, list] = {}
    for i, d in enumerate(list_of_dict):
        if not isinstance(d, dict):
            raise TypeError(f"list_of_dict_to_dict_of_list: element {i} is a {type(d).__name__}, expected a dict")
        for key, item in d.items():
            output.setdefault(key, []).append(item)
    return output


# ----------------------------------------------------------------------------------------------------------------------
# DataProtoItem / DataProto
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class DataProtoItem:
    """One row of a DataProto: ``batch`` is a TensorDict with empty batch size, ``non_tensor_batch`` holds the row's
    objects."""

    batch: TensorDict | None = None
    non_tensor_batch: dict = field(default_factory=dict)
    meta_info: dict = field(default_factory=dict)


@dataclass(eq=False)
class DataProto:
    """A batch of rows: tensor columns (``batch``), per-row Python objects (``non_tensor_batch``) and batch-level
    ``meta_info``.

    All tensor columns share dimension 0 (the only batch dimension); every non-tensor column is a numpy array (normally
    ``dtype=object``) with the same first dimension. A DataProto may hold only non-tensor columns (``batch is None``).
    """

    batch: TensorDict | None = None
    non_tensor_batch: dict[str, np.ndarray] = field(default_factory=dict)
    meta_info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.non_tensor_batch is None:
            self.non_tensor_batch = {}
        if self.meta_info is None:
            self.meta_info = {}
        self.check_consistency()

    # ------------------------------------------------------------------------------------------------ invariants ----
    def check_consistency(self) -> None:
        """Raise a clear error when the three parts are not aligned (one batch dim, equal lengths)."""
        if self.batch is not None:
            if not isinstance(self.batch, TensorDict):
                raise TypeError(f"DataProto.batch must be a tensordict.TensorDict or None, got "
                                f"{type(self.batch).__name__}; build one with DataProto.from_dict(tensors=...)")
            for key, value in _batch_leaves(self.batch):
                if not isinstance(value, torch.Tensor):
                    raise TypeError(f"DataProto.batch column {key!r} holds {type(value).__name__}, not a tensor; "
                                    "per-row Python objects belong in non_tensor_batch and batch-level values in "
                                    "meta_info")
            if len(self.batch.batch_size) != 1:
                raise ValueError(f"DataProto.batch must have exactly one batch dimension, got batch_size="
                                 f"{tuple(self.batch.batch_size)}; use fold_batch_dim/unfold_batch_dim to regroup rows")
        if not isinstance(self.non_tensor_batch, dict):
            raise TypeError(f"DataProto.non_tensor_batch must be a dict of numpy arrays, got "
                            f"{type(self.non_tensor_batch).__name__}")
        if not isinstance(self.meta_info, dict):
            raise TypeError(f"DataProto.meta_info must be a dict, got {type(self.meta_info).__name__}")
        expected = self.batch.batch_size[0] if self.batch is not None else None
        first_key = "batch"
        for key, val in self.non_tensor_batch.items():
            if not isinstance(val, np.ndarray):
                raise TypeError(f"non_tensor_batch[{key!r}] must be a numpy array (dtype=object), got "
                                f"{type(val).__name__}; convert it with np.array(values, dtype=object) or pass it "
                                "through DataProto.from_dict(non_tensors=...)")
            if val.ndim == 0:
                raise ValueError(f"non_tensor_batch[{key!r}] is a 0-d array; per-row data needs one entry per row "
                                 "(batch-level values belong in meta_info)")
            if expected is None:
                expected, first_key = val.shape[0], f"non_tensor_batch[{key!r}]"
            elif val.shape[0] != expected:
                raise ValueError(f"non_tensor_batch[{key!r}] has {val.shape[0]} rows but {first_key} has {expected}; "
                                 "every column of a DataProto must have the same number of rows")

    def __len__(self) -> int:
        if self.batch is not None:
            return int(self.batch.batch_size[0])
        for val in self.non_tensor_batch.values():
            return int(val.shape[0])
        return 0

    def __repr__(self) -> str:
        batch_keys = list(self.batch.keys(include_nested=True, leaves_only=True)) if self.batch is not None else None
        return (f"DataProto(len={len(self)}, batch_keys={batch_keys}, non_tensor_batch_keys="
                f"{list(self.non_tensor_batch)}, meta_info_keys={list(self.meta_info)})")

    # -------------------------------------------------------------------------------------------------- pickling ----
    def __getstate__(self) -> dict:
        """Serialize the batch with ``torch.save`` after making every tensor compact.

        A row slice (e.g. one chunk sent to one worker) is a view onto the full batch's storage; pickling it as is
        would ship the whole storage. Cloning views first makes each worker receive only its own rows.
        """
        batch_state = None
        if self.batch is not None:
            keys, tensors = [], []
            for key, value in _batch_leaves(self.batch):
                if not isinstance(value, torch.Tensor):
                    raise TypeError(f"DataProto.batch column {key!r} is a {type(value).__name__}, not a tensor; "
                                    "per-row Python objects belong in non_tensor_batch")
                compact = (value.is_contiguous() and
                           value.untyped_storage().nbytes() == value.numel() * value.element_size())
                keys.append(list(key) if isinstance(key, tuple) else key)
                tensors.append(value if compact else value.clone(memory_format=torch.contiguous_format))
            buffer = io.BytesIO()
            torch.save(
                {
                    "keys": keys,
                    "tensors": tensors,
                    "batch_size": list(self.batch.batch_size),
                    "device": None if self.batch.device is None else str(self.batch.device),
                }, buffer)
            batch_state = buffer.getvalue()
        return {"batch": batch_state, "non_tensor_batch": self.non_tensor_batch, "meta_info": self.meta_info}

    def __setstate__(self, state: dict) -> None:
        batch = None
        if state["batch"] is not None:
            loaded = torch.load(io.BytesIO(state["batch"]), weights_only=True, map_location=None)
            batch = TensorDict({}, batch_size=loaded["batch_size"], device=loaded["device"])
            for key, tensor in zip(loaded["keys"], loaded["tensors"]):
                batch.set(tuple(key) if isinstance(key, list) else key, tensor)
        self.batch = batch
        self.non_tensor_batch = state["non_tensor_batch"]
        self.meta_info = state["meta_info"]

    def __copy__(self) -> DataProto:
        # Without this, copy.copy would go through __getstate__ and copy every tensor.
        return type(self)(batch=self.batch, non_tensor_batch=self.non_tensor_batch, meta_info=self.meta_info)

    def __deepcopy__(self, memo: dict) -> DataProto:
        return type(self)(batch=self.batch.clone() if self.batch is not None else None,
                          non_tensor_batch=copy.deepcopy(self.non_tensor_batch, memo),
                          meta_info=copy.deepcopy(self.meta_info, memo))

    def save_to_disk(self, filepath: str | os.PathLike) -> None:
        """Pickle this DataProto to ``filepath`` (e.g. a rollout batch to replay in a test)."""
        with open(filepath, "wb") as f:
            pickle.dump(self, f)

    @staticmethod
    def load_from_disk(filepath: str | os.PathLike) -> DataProto:
        """Load a DataProto written by :meth:`save_to_disk`."""
        with open(filepath, "rb") as f:
            data = pickle.load(f)
        if not isinstance(data, DataProto):
            raise TypeError(f"{os.fspath(filepath)!r} does not contain a DataProto (found {type(data).__name__})")
        return data

    # ----------------------------------------------------------------------------------------------- diagnostics ----
    def get_data_info(self) -> str:
        """Human-readable summary of the columns: shapes, dtypes, devices and sizes."""
        lines = [f"DataProto with {len(self)} rows"]
        if self.batch is not None:
            lines.append(f"batch ({_tensor_nbytes(self.batch) / 2**20:.3f} MB):")
            for key, value in self.batch.items(include_nested=True, leaves_only=True):
                lines.append(f"  {key}: shape={tuple(value.shape)} dtype={value.dtype} device={value.device}")
        if self.non_tensor_batch:
            size = sum(_object_nbytes(v) for v in self.non_tensor_batch.values())
            lines.append(f"non_tensor_batch (~{size / 2**20:.3f} MB):")
            for key, value in self.non_tensor_batch.items():
                sample = type(value.ravel()[0]).__name__ if value.size else "-"
                lines.append(f"  {key}: shape={value.shape} dtype={value.dtype} element={sample}")
        if self.meta_info:
            lines.append(f"meta_info keys: {sorted(map(str, self.meta_info))}")
        return "\n".join(lines)

    def print_size(self, prefix: str = "") -> None:
        """Print the memory taken by the tensor and non-tensor columns (to spot oversized transfers)."""
        tensor_mb = _tensor_nbytes(self.batch) / 2**20
        object_mb = sum(_object_nbytes(v) for v in self.non_tensor_batch.values()) / 2**20
        print(f"{prefix}Size of tensordict: {tensor_mb:.3f} MB, size of non_tensor_batch: ~{object_mb:.3f} MB")

    # ---------------------------------------------------------------------------------------------- construction ----
    @classmethod
    def from_single_dict(cls,
                         data: dict[str, torch.Tensor | np.ndarray],
                         meta_info: dict | None = None,
                         auto_padding: bool = False) -> DataProto:
        """Build from one dict (e.g. a dataloader batch): tensors go to ``batch``, numpy arrays to
        ``non_tensor_batch``."""
        tensors, non_tensors = {}, {}
        for key, val in data.items():
            if isinstance(val, torch.Tensor):
                tensors[key] = val
            elif isinstance(val, np.ndarray):
                non_tensors[key] = val
            else:
                raise ValueError(f"from_single_dict: value of key {key!r} is a {type(val).__name__}; only torch.Tensor "
                                 "and numpy.ndarray are accepted. Convert lists with np.array(values, dtype=object) "
                                 "or use DataProto.from_dict(non_tensors=...)")
        return cls.from_dict(tensors=tensors, non_tensors=non_tensors, meta_info=meta_info, auto_padding=auto_padding)

    @classmethod
    def from_dict(cls,
                  tensors: dict[str, torch.Tensor] | None = None,
                  non_tensors: dict[str, Any] | None = None,
                  meta_info: dict | None = None,
                  num_batch_dims: int = 1,
                  auto_padding: bool = False) -> DataProto:
        """Build from tensor columns, non-tensor columns (lists or arrays; lists become object arrays) and meta_info.

        ``num_batch_dims`` > 1 additionally checks that all tensors agree on their first ``num_batch_dims`` dimensions;
        the DataProto still has one batch dimension (dim 0). ``auto_padding=True`` lets ``chunk`` accept sizes that do
        not divide the batch and tells the single controller to pad before dispatch.
        """
        if not isinstance(num_batch_dims, int) or num_batch_dims < 1:
            raise ValueError(f"num_batch_dims must be a positive int, got {num_batch_dims!r}")
        tensors = dict(tensors or {})
        non_tensors = dict(non_tensors or {})
        meta_info = dict(meta_info or {})
        batch = None
        if tensors:
            ref_key, lead = None, None
            for key, tensor in tensors.items():
                if not isinstance(tensor, torch.Tensor):
                    raise TypeError(f"from_dict: tensors[{key!r}] is a {type(tensor).__name__}, not a torch.Tensor; "
                                    "pass per-row Python objects in `non_tensors`")
                if tensor.dim() < num_batch_dims:
                    raise ValueError(f"from_dict: tensors[{key!r}] has shape {tuple(tensor.shape)}, fewer than "
                                     f"num_batch_dims={num_batch_dims} dimensions")
                if lead is None:
                    ref_key, lead = key, tuple(tensor.shape[:num_batch_dims])
                elif tuple(tensor.shape[:num_batch_dims]) != lead:
                    raise ValueError(f"from_dict: tensors[{key!r}] has leading shape "
                                     f"{tuple(tensor.shape[:num_batch_dims])} but tensors[{ref_key!r}] has {lead}; "
                                     "all tensor columns must share the batch dimension(s)")
            batch = TensorDict(source=tensors, batch_size=[lead[0]])
        non_tensor_batch = {key: _to_object_array(val, key) for key, val in non_tensors.items()}
        if auto_padding:
            meta_info[AUTO_PADDING_KEY] = True
        return cls(batch=batch, non_tensor_batch=non_tensor_batch, meta_info=meta_info)

    @classmethod
    def from_tensordict(cls,
                        tensor_dict: TensorDict,
                        meta_info: dict | None = None,
                        num_batch_dims: int = 1) -> DataProto:
        """Build from a TensorDict that may also carry non-tensor entries (the inverse of :meth:`to_tensordict`).

        Tensors (and nested TensorDicts of tensors) become ``batch``; ``NonTensorStack`` entries (one object per row)
        become object columns; ``NonTensorData`` entries (one value for the batch) go to ``meta_info``.
        """
        if not is_tensor_collection(tensor_dict):
            raise TypeError(f"from_tensordict expects a TensorDict, got {type(tensor_dict).__name__}")
        if len(tensor_dict.batch_size) != num_batch_dims or num_batch_dims != 1:
            raise ValueError(f"from_tensordict: DataProto needs exactly one batch dimension, got a TensorDict with "
                             f"batch_size={tuple(tensor_dict.batch_size)} (num_batch_dims={num_batch_dims})")
        batch = TensorDict({}, batch_size=tensor_dict.batch_size, device=tensor_dict.device)
        non_tensors: dict[str, np.ndarray] = {}
        meta = dict(meta_info or {})
        for key, value in tensor_dict.items():
            if isinstance(value, NonTensorStack):
                non_tensors[key] = _to_object_array(value.tolist(), key)
            elif isinstance(value, NonTensorData):
                meta[key] = value.data
            else:
                batch.set(key, value)
        has_tensors = len(list(batch.keys())) > 0 or not non_tensors
        return cls(batch=batch if has_tensors else None, non_tensor_batch=non_tensors, meta_info=meta)

    def to_tensordict(self) -> TensorDict:
        """One TensorDict holding everything: object columns as ``NonTensorStack``, meta_info as ``NonTensorData``."""
        if self.batch is not None:
            out = self.batch.select(*self.batch.keys())
        else:
            out = TensorDict({}, batch_size=[len(self)])
        for key, val in self.non_tensor_batch.items():
            if key in out.keys():
                raise ValueError(f"to_tensordict: {key!r} is both a tensor and a non-tensor column; rename one")
            out.set(key, NonTensorStack(*[NonTensorData(v) for v in val], stack_dim=0))
        for key, val in self.meta_info.items():
            if key in out.keys():
                raise ValueError(f"to_tensordict: meta_info key {key!r} clashes with a column of the same name")
            out.set_non_tensor(key, val)
        return out

    # ---------------------------------------------------------------------------------------------------- device ----
    def to(self, device: str | torch.device) -> DataProto:
        """Move the tensor columns to ``device`` (in place) and return self."""
        if self.batch is not None:
            self.batch = self.batch.to(device)
        return self

    # -------------------------------------------------------------------------------------------------- indexing ----
    def __getitem__(self, item: Any) -> DataProto | DataProtoItem:
        """``int`` -> :class:`DataProtoItem`; ``slice`` -> :meth:`slice`; list / array / tensor of int or bool ->
        :meth:`select_idxs`."""
        if isinstance(item, torch.Tensor) and item.dim() == 0 and not item.dtype.is_floating_point:
            item = item.item()
        if isinstance(item, (bool, np.bool_)):
            raise TypeError("cannot index a DataProto with a single bool; use a boolean mask with one entry per row")
        if isinstance(item, (int, np.integer)):
            return self._get_item(int(item))
        if isinstance(item, slice):
            return self.slice(item.start, item.stop, item.step)
        if isinstance(item, (list, tuple, np.ndarray, torch.Tensor)):
            return self.select_idxs(item)
        raise TypeError(f"DataProto indices must be int, slice, list, numpy array or tensor, got {type(item).__name__}")

    def _get_item(self, index: int) -> DataProtoItem:
        length = len(self)
        if not -length <= index < length:
            raise IndexError(f"row index {index} out of range for a DataProto of {length} rows")
        index %= length
        batch = self.batch[index] if self.batch is not None else None
        non_tensor = {key: val[index] for key, val in self.non_tensor_batch.items()}
        return DataProtoItem(batch=batch, non_tensor_batch=non_tensor, meta_info=self.meta_info)

    def slice(self, start: int | None = None, end: int | None = None, step: int | None = None) -> DataProto:
        """Rows ``start:end:step`` (Python slice semantics) as a new DataProto; tensors are views."""
        if step == 0:
            raise ValueError("DataProto.slice: step cannot be zero")
        sl = slice(start, end, step)
        batch = self.batch[sl] if self.batch is not None else None
        non_tensor = {key: val[sl] for key, val in self.non_tensor_batch.items()}
        return type(self)(batch=batch, non_tensor_batch=non_tensor, meta_info=dict(self.meta_info))

    def select_idxs(self, idxs: Sequence[int] | np.ndarray | torch.Tensor) -> DataProto:
        """Rows at integer positions (repeats allowed) or where a boolean mask is true, as a new DataProto."""
        index = _as_index_array(idxs, len(self))
        batch = None
        if self.batch is not None:
            batch = self.batch[torch.from_numpy(index).to(self.batch.device or "cpu")]
        non_tensor = {key: val[index] for key, val in self.non_tensor_batch.items()}
        return type(self)(batch=batch, non_tensor_batch=non_tensor, meta_info=dict(self.meta_info))

    # ------------------------------------------------------------------------------------------- column editing ----
    def _check_keys(self, batch_keys: list[str] | None, non_tensor_batch_keys: list[str] | None,
                    meta_info_keys: list[str] | None, op: str) -> None:
        if batch_keys:
            available = set(self.batch.keys(include_nested=True)) if self.batch is not None else set()
            missing = [k for k in batch_keys if k not in available]
            if missing:
                raise KeyError(f"DataProto.{op}: batch has no tensor column(s) {missing}; available: "
                               f"{sorted(map(str, available))}")
        if non_tensor_batch_keys:
            missing = [k for k in non_tensor_batch_keys if k not in self.non_tensor_batch]
            if missing:
                raise KeyError(f"DataProto.{op}: non_tensor_batch has no column(s) {missing}; available: "
                               f"{sorted(self.non_tensor_batch)}")
        if meta_info_keys:
            missing = [k for k in meta_info_keys if k not in self.meta_info]
            if missing:
                raise KeyError(f"DataProto.{op}: meta_info has no key(s) {missing}; available: "
                               f"{sorted(map(str, self.meta_info))}")

    def select(self,
               batch_keys: Sequence[str] | None = None,
               non_tensor_batch_keys: Sequence[str] | None = None,
               meta_info_keys: Sequence[str] | None = None,
               deepcopy: bool = False) -> DataProto:
        """A new DataProto with only the named columns (``None`` keeps all of that part); ``deepcopy`` copies data."""
        batch_keys = _as_key_list(batch_keys, "batch_keys")
        non_tensor_batch_keys = _as_key_list(non_tensor_batch_keys, "non_tensor_batch_keys")
        meta_info_keys = _as_key_list(meta_info_keys, "meta_info_keys")
        self._check_keys(batch_keys, non_tensor_batch_keys, meta_info_keys, "select")
        batch = self.batch
        if batch is not None and batch_keys is not None:
            batch = batch.select(*batch_keys)
        if non_tensor_batch_keys is None:
            non_tensor = dict(self.non_tensor_batch)
        else:
            non_tensor = {k: self.non_tensor_batch[k] for k in non_tensor_batch_keys}
        if meta_info_keys is None:
            meta_info = dict(self.meta_info)
        else:
            meta_info = {k: self.meta_info[k] for k in meta_info_keys}
        if deepcopy:
            batch = batch.clone() if batch is not None else None
            non_tensor = copy.deepcopy(non_tensor)
            meta_info = copy.deepcopy(meta_info)
        elif batch is self.batch and batch is not None:
            batch = batch.select(*batch.keys())  # a new container, so later column edits do not leak back
        return type(self)(batch=batch, non_tensor_batch=non_tensor, meta_info=meta_info)

    def pop(self,
            batch_keys: Sequence[str] | None = None,
            non_tensor_batch_keys: Sequence[str] | None = None,
            meta_info_keys: Sequence[str] | None = None) -> DataProto:
        """Remove the named columns from self and return them as a new DataProto (``None`` pops nothing)."""
        batch_keys = _as_key_list(batch_keys, "batch_keys") or []
        non_tensor_batch_keys = _as_key_list(non_tensor_batch_keys, "non_tensor_batch_keys") or []
        meta_info_keys = _as_key_list(meta_info_keys, "meta_info_keys") or []
        self._check_keys(batch_keys, non_tensor_batch_keys, meta_info_keys, "pop")
        batch = None
        if batch_keys:
            batch = TensorDict({}, batch_size=self.batch.batch_size, device=self.batch.device)
            for key in batch_keys:
                batch.set(key, self.batch.pop(key))
        non_tensor = {key: self.non_tensor_batch.pop(key) for key in non_tensor_batch_keys}
        meta_info = {key: self.meta_info.pop(key) for key in meta_info_keys}
        return type(self)(batch=batch, non_tensor_batch=non_tensor, meta_info=meta_info)

    def rename(self,
               old_keys: str | Sequence[str] | None = None,
               new_keys: str | Sequence[str] | None = None) -> DataProto:
        """Rename columns in place (tensor columns, or non-tensor columns when no tensor has that name); returns
        self."""
        old = _as_key_list(old_keys, "old_keys") or []
        new = _as_key_list(new_keys, "new_keys") or []
        if len(old) != len(new):
            raise ValueError(f"rename: got {len(old)} old keys but {len(new)} new keys; they must pair up")
        batch_keys = set(self.batch.keys()) if self.batch is not None else set()
        for o, n in zip(old, new):
            if o == n:
                continue
            if o in batch_keys:
                if n in batch_keys:
                    raise ValueError(f"rename: cannot rename {o!r} to {n!r}, a tensor column {n!r} already exists")
                self.batch.rename_key_(o, n)
                batch_keys = set(self.batch.keys())
            elif o in self.non_tensor_batch:
                if n in self.non_tensor_batch:
                    raise ValueError(f"rename: cannot rename {o!r} to {n!r}, a non-tensor column {n!r} already exists")
                self.non_tensor_batch[n] = self.non_tensor_batch.pop(o)
            else:
                raise KeyError(f"rename: no column named {o!r}; tensor columns: {sorted(batch_keys)}, non-tensor "
                               f"columns: {sorted(self.non_tensor_batch)}")
        return self

    def union(self, other: DataProto) -> DataProto:
        """Merge ``other``'s columns and meta_info into self (in place); shared keys must hold equal values."""
        if not isinstance(other, DataProto):
            raise TypeError(f"union expects a DataProto, got {type(other).__name__}")
        has_rows = self.batch is not None or bool(self.non_tensor_batch)
        other_has_rows = other.batch is not None or bool(other.non_tensor_batch)
        if has_rows and other_has_rows and len(self) != len(other):
            raise ValueError(f"cannot union DataProtos of different lengths: {len(self)} vs {len(other)}")
        if self.batch is not None and other.batch is not None:
            self.batch = union_tensor_dict(self.batch, other.batch)
        elif other.batch is not None:
            self.batch = other.batch.select(*other.batch.keys())
        self.non_tensor_batch = union_numpy_dict(self.non_tensor_batch, other.non_tensor_batch)
        self.meta_info = union_two_dict(self.meta_info, other.meta_info)
        self.check_consistency()
        return self

    # ---------------------------------------------------------------------------------------- split and merge ----
    def is_padding_enabled(self) -> bool:
        """True when this DataProto (meta flag ``_verl_auto_padding``) or the global ``DataProtoConfig.auto_padding``
        (or ``VERL_AUTO_PADDING=1``) asks for automatic padding."""
        return bool(self.meta_info.get(AUTO_PADDING_KEY, False)) or DataProtoConfig.auto_padding

    def chunk(self, chunks: int) -> list[DataProto]:
        """Split into ``chunks`` consecutive parts of equal size (one per worker); meta_info is copied to each.

        The length must divide evenly unless padding is enabled, in which case the first parts get one extra row.
        """
        if not isinstance(chunks, (int, np.integer)) or isinstance(chunks, bool) or chunks < 1:
            raise ValueError(f"chunk: chunks must be a positive int, got {chunks!r}")
        chunks = int(chunks)
        length = len(self)
        if length % chunks != 0 and not self.is_padding_enabled():
            raise ValueError(f"DataProto.chunk: {length} rows cannot be split into {chunks} equal chunks. Pad first "
                             f"with `padded, pad_size = pad_dataproto_to_divisor(data, {chunks})` (and remove the "
                             "padding from the results with `unpad_dataproto(output, pad_size)`), or enable auto "
                             "padding (DataProto.from_dict(..., auto_padding=True), DataProtoConfig.auto_padding = "
                             "True or VERL_AUTO_PADDING=1)")
        base, extra = divmod(length, chunks)
        out, start = [], 0
        for i in range(chunks):
            size = base + (1 if i < extra else 0)
            out.append(self.slice(start, start + size))
            start += size
        return out

    def split(self, split_size: int) -> list[DataProto]:
        """Consecutive parts of ``split_size`` rows (the last may be smaller), e.g. micro-batches."""
        if not isinstance(split_size, (int, np.integer)) or isinstance(split_size, bool) or split_size < 1:
            raise ValueError(f"split: split_size must be a positive int, got {split_size!r}")
        return [self.slice(start, start + int(split_size)) for start in range(0, len(self), int(split_size))]

    @staticmethod
    def concat(data: Sequence[DataProto]) -> DataProto:
        """Join DataProtos row-wise (the inverse of ``chunk``).

        ``meta_info`` is merged: keys present in several parts must agree, except ``"metrics"``, which is gathered from
        every part (a dict or a list of dicts each) into one dict of lists.
        """
        data = list(data)
        if not data:
            raise ValueError("DataProto.concat needs at least one DataProto, got an empty list")
        for i, d in enumerate(data):
            if not isinstance(d, DataProto):
                raise TypeError(f"DataProto.concat: element {i} is a {type(d).__name__}, not a DataProto")
        has_batch = [d.batch is not None for d in data]
        if any(has_batch) and not all(has_batch):
            odd = has_batch.index(not has_batch[0])
            raise ValueError(f"DataProto.concat: element 0 {'has' if has_batch[0] else 'has no'} tensor batch but "
                             f"element {odd} {'has' if has_batch[odd] else 'has no'} tensor batch; all parts need the "
                             "same columns")
        batch = None
        if all(has_batch):
            ref_keys = set(data[0].batch.keys(include_nested=True, leaves_only=True))
            for i, d in enumerate(data[1:], start=1):
                keys = set(d.batch.keys(include_nested=True, leaves_only=True))
                if keys != ref_keys:
                    raise ValueError(f"DataProto.concat: element {i} has tensor columns {sorted(map(str, keys))} but "
                                     f"element 0 has {sorted(map(str, ref_keys))}")
            batch = torch.cat([d.batch for d in data], dim=0)
        ref_nt = list(data[0].non_tensor_batch)
        for i, d in enumerate(data[1:], start=1):
            if set(d.non_tensor_batch) != set(ref_nt):
                raise ValueError(f"DataProto.concat: element {i} has non-tensor columns {sorted(d.non_tensor_batch)} "
                                 f"but element 0 has {sorted(ref_nt)}")
        non_tensor = {key: np.concatenate([d.non_tensor_batch[key] for d in data], axis=0) for key in ref_nt}

        meta_info: dict[str, Any] = {}
        metrics: list[dict] = []
        for i, d in enumerate(data):
            for key, val in d.meta_info.items():
                if key == "metrics":
                    if val is None:
                        continue
                    if isinstance(val, dict):
                        metrics.append(val)
                    elif isinstance(val, (list, tuple)) and all(isinstance(m, dict) for m in val):
                        metrics.extend(val)
                    else:
                        raise TypeError(f"DataProto.concat: meta_info['metrics'] of element {i} must be a dict or a "
                                        f"list of dicts, got {type(val).__name__}")
                elif key in meta_info and not _values_equal(meta_info[key], val):
                    raise ValueError(f"DataProto.concat: meta_info[{key!r}] differs between parts ({meta_info[key]!r} "
                                     f"vs {val!r} in element {i}); make it equal or pop it before concatenating")
                else:
                    meta_info.setdefault(key, val)
        if metrics:
            meta_info["metrics"] = list_of_dict_to_dict_of_list(metrics)
        return DataProto(batch=batch, non_tensor_batch=non_tensor, meta_info=meta_info)

    def repeat(self, repeat_times: int = 2, interleave: bool = True) -> DataProto:
        """Repeat every row ``repeat_times`` times: ``interleave=True`` keeps copies together (a a b b), as needed for
        ``rollout.n`` samples per prompt; ``interleave=False`` tiles the batch (a b a b)."""
        if not isinstance(repeat_times, (int, np.integer)) or isinstance(repeat_times, bool) or repeat_times < 1:
            raise ValueError(f"repeat: repeat_times must be a positive int, got {repeat_times!r}")
        rows = np.arange(len(self))
        index = np.repeat(rows, repeat_times) if interleave else np.tile(rows, repeat_times)
        return self.select_idxs(index)

    def sample_level_repeat(self, repeat_times: Sequence[int] | np.ndarray | torch.Tensor) -> DataProto:
        """Repeat row ``i`` ``repeat_times[i]`` times, copies kept together (a count of 0 drops the row)."""
        if isinstance(repeat_times, torch.Tensor):
            repeat_times = repeat_times.detach().cpu().numpy()
        counts = np.asarray(repeat_times)
        if counts.ndim != 1 or counts.shape[0] != len(self):
            raise ValueError(f"sample_level_repeat: need one repeat count per row ({len(self)}), got shape "
                             f"{counts.shape}")
        if counts.size and (not np.issubdtype(counts.dtype, np.integer) or counts.min() < 0):
            raise ValueError("sample_level_repeat: repeat counts must be non-negative integers")
        return self.select_idxs(np.repeat(np.arange(len(self)), counts.astype(np.int64)))

    def reorder(self, indices: torch.Tensor | np.ndarray | Sequence[int]) -> None:
        """Permute the rows in place (e.g. to balance sequence lengths across workers)."""
        index = _as_index_array(indices, len(self))
        if index.shape[0] != len(self) or not np.array_equal(np.sort(index), np.arange(len(self))):
            raise ValueError(f"reorder: indices must be a permutation of range({len(self)}); use select_idxs to pick "
                             "a subset or repeat rows")
        reordered = self.select_idxs(index)
        self.batch = reordered.batch
        self.non_tensor_batch = reordered.non_tensor_batch

    def padding(self, padding_size: int, padding_candidate: str = "") -> None:
        """Append ``padding_size`` copies of the last row (or the first, with ``padding_candidate="first"``) in
        place."""
        if padding_size < 0:
            raise ValueError(f"padding: padding_size must be >= 0, got {padding_size}")
        if padding_size == 0:
            return
        if len(self) == 0:
            raise ValueError("padding: cannot pad an empty DataProto (there is no row to copy)")
        candidate = self.slice(0, 1) if padding_candidate == "first" else self.slice(len(self) - 1, len(self))
        padded = DataProto.concat([self, candidate.repeat(padding_size)])
        self.batch = padded.batch
        self.non_tensor_batch = padded.non_tensor_batch

    def unfold_column_chunks(self, n_split: int, split_keys: Sequence[str] | None = None) -> DataProto:
        """Cut dimension 1 of the ``split_keys`` columns into ``n_split`` pieces that become rows of their own.

        Row ``i`` becomes rows ``i * n_split ... i * n_split + n_split - 1``; columns not in ``split_keys`` are repeated
        to stay aligned. ``split_keys=None`` splits every column.
        """
        if not isinstance(n_split, (int, np.integer)) or isinstance(n_split, bool) or n_split < 1:
            raise ValueError(f"unfold_column_chunks: n_split must be a positive int, got {n_split!r}")
        n_split = int(n_split)
        tensor_keys = list(self.batch.keys()) if self.batch is not None else []
        keys = set(tensor_keys) | set(self.non_tensor_batch) if split_keys is None else set(
            _as_key_list(split_keys, "split_keys"))
        unknown = keys - set(tensor_keys) - set(self.non_tensor_batch)
        if unknown:
            raise KeyError(f"unfold_column_chunks: no column(s) {sorted(unknown)}")

        def unfold(key: str, value: Any) -> Any:
            if key not in keys:
                return value.repeat_interleave(n_split, dim=0) if isinstance(value, torch.Tensor) else np.repeat(
                    value, n_split, axis=0)
            if value.ndim < 2 or value.shape[1] % n_split != 0:
                raise ValueError(f"unfold_column_chunks: column {key!r} has shape {tuple(value.shape)}; its dimension "
                                 f"1 must exist and divide by n_split={n_split}")
            return value.reshape(value.shape[0] * n_split, value.shape[1] // n_split, *value.shape[2:])

        new_len = len(self) * n_split
        batch = None
        if self.batch is not None:
            batch = TensorDict({k: unfold(k, self.batch[k]) for k in tensor_keys},
                               batch_size=[new_len],
                               device=self.batch.device)
        non_tensor = {k: unfold(k, v) for k, v in self.non_tensor_batch.items()}
        return type(self)(batch=batch, non_tensor_batch=non_tensor, meta_info=dict(self.meta_info))

    def make_iterator(self,
                      mini_batch_size: int,
                      epochs: int,
                      seed: int | None = None,
                      dataloader_kwargs: dict | None = None) -> Iterator[DataProto]:
        """Iterate over mini-batches of ``mini_batch_size`` rows for ``epochs`` passes (PPO epochs).

        ``dataloader_kwargs`` go to ``torch.utils.data.DataLoader`` (e.g. ``{"shuffle": True}``); ``seed`` makes the
        shuffling reproducible. Every mini-batch carries this DataProto's meta_info.
        """
        if not isinstance(mini_batch_size, (int, np.integer)) or mini_batch_size < 1:
            raise ValueError(f"make_iterator: mini_batch_size must be a positive int, got {mini_batch_size!r}")
        if len(self) % mini_batch_size != 0:
            raise ValueError(f"make_iterator: {len(self)} rows are not divisible by mini_batch_size={mini_batch_size}")
        if epochs < 0:
            raise ValueError(f"make_iterator: epochs must be >= 0, got {epochs}")
        kwargs = dict(dataloader_kwargs or {})
        for reserved in ("dataset", "batch_size", "collate_fn"):
            if reserved in kwargs:
                raise ValueError(f"make_iterator: dataloader_kwargs may not set {reserved!r}")
        generator = None
        if seed is not None:
            generator = torch.Generator()
            generator.manual_seed(seed)
        loader = torch.utils.data.DataLoader(dataset=range(len(self)),
                                             batch_size=int(mini_batch_size),
                                             collate_fn=_collate_indices,
                                             generator=generator,
                                             **kwargs)

        def get_data() -> Iterator[DataProto]:
            for _ in range(epochs):
                for idx in loader:
                    yield self.select_idxs(idx)

        return iter(get_data())


def _collate_indices(indices: list[int]) -> np.ndarray:
    return np.asarray(indices, dtype=np.int64)


# ----------------------------------------------------------------------------------------------------------------------
# module-level helpers
# ----------------------------------------------------------------------------------------------------------------------


def pad_dataproto_to_divisor(data: DataProto, size_divisor: int) -> tuple[DataProto, int]:
    """Pad ``data`` so its length divides ``size_divisor`` by re-appending its leading rows.

    Returns ``(padded, pad_size)``; ``data`` itself is untouched. Undo with ``unpad_dataproto(result, pad_size)``.
    """
    if not isinstance(data, DataProto):
        raise TypeError(f"pad_dataproto_to_divisor expects a DataProto, got {type(data).__name__}")
    if not isinstance(size_divisor, (int, np.integer)) or isinstance(size_divisor, bool) or size_divisor < 1:
        raise ValueError(f"pad_dataproto_to_divisor: size_divisor must be a positive int, got {size_divisor!r}")
    length = len(data)
    pad_size = (-length) % int(size_divisor)
    if pad_size == 0:
        return data, 0
    if length == 0:
        raise ValueError("pad_dataproto_to_divisor: cannot pad an empty DataProto (no row to copy)")
    padding = data.select_idxs(np.arange(pad_size) % length)
    return DataProto.concat([data, padding]), pad_size


def unpad_dataproto(data: DataProto, pad_size: int) -> DataProto:
    """Drop the last ``pad_size`` rows added by :func:`pad_dataproto_to_divisor`."""
    if pad_size < 0 or pad_size > len(data):
        raise ValueError(f"unpad_dataproto: pad_size={pad_size} is out of range for a DataProto of {len(data)} rows")
    if pad_size == 0:
        return data
    return data.slice(0, len(data) - pad_size)


def collate_fn(x: list[DataProtoItem]) -> DataProto:
    """Stack a list of :class:`DataProtoItem` (single rows) back into a DataProto (a DataLoader ``collate_fn``)."""
    if not x:
        raise ValueError("collate_fn needs at least one DataProtoItem")
    batches = [item.batch for item in x]
    if any(b is None for b in batches) and not all(b is None for b in batches):
        raise ValueError("collate_fn: some items have tensor columns and some do not")
    batch = None if batches[0] is None else torch.stack(batches).contiguous()
    keys = list(x[0].non_tensor_batch)
    for i, item in enumerate(x):
        if list(item.non_tensor_batch) != keys and set(item.non_tensor_batch) != set(keys):
            raise ValueError(f"collate_fn: item {i} has non-tensor keys {sorted(item.non_tensor_batch)}, item 0 has "
                             f"{sorted(keys)}")
    non_tensor = {key: _stack_object_values([item.non_tensor_batch[key] for item in x]) for key in keys}
    return DataProto(batch=batch, non_tensor_batch=non_tensor, meta_info=dict(x[0].meta_info or {}))


def fold_batch_dim(data: DataProto, new_batch_size: int) -> DataProto:
    """Group rows: ``[B, ...] -> [new_batch_size, B // new_batch_size, ...]`` for every column."""
    length = len(data)
    if new_batch_size < 1 or length % new_batch_size != 0:
        raise ValueError(f"fold_batch_dim: {length} rows cannot be folded into new_batch_size={new_batch_size}")
    batch = None
    if data.batch is not None:
        batch = data.batch.apply(lambda t: t.reshape(new_batch_size, -1, *t.shape[1:]), batch_size=[new_batch_size])
    non_tensor = {k: v.reshape(new_batch_size, -1, *v.shape[1:]) for k, v in data.non_tensor_batch.items()}
    return type(data)(batch=batch, non_tensor_batch=non_tensor, meta_info=data.meta_info)


def unfold_batch_dim(data: DataProto, batch_dims: int = 2) -> DataProto:
    """Inverse of :func:`fold_batch_dim`: merge the first ``batch_dims`` dimensions of every column into one."""
    if batch_dims < 1:
        raise ValueError(f"unfold_batch_dim: batch_dims must be >= 1, got {batch_dims}")

    def merge(shape: Sequence[int], key: str) -> int:
        if len(shape) < batch_dims:
            raise ValueError(f"unfold_batch_dim: column {key!r} has shape {tuple(shape)}, fewer than "
                             f"batch_dims={batch_dims} dimensions")
        return int(np.prod(shape[:batch_dims]))

    batch = None
    if data.batch is not None:
        sizes = {merge(t.shape, str(k)) for k, t in data.batch.items(include_nested=True, leaves_only=True)}
        new_len = sizes.pop() if len(sizes) == 1 else None
        if sizes:
            raise ValueError("unfold_batch_dim: tensor columns disagree on the size of the folded dimensions")
        if new_len is None:  # no tensor columns at all
            new_len = len(data)
        batch = data.batch.apply(lambda t: t.reshape(-1, *t.shape[batch_dims:]), batch_size=[new_len])
    non_tensor = {}
    for key, val in data.non_tensor_batch.items():
        merge(val.shape, key)
        non_tensor[key] = val.reshape(-1, *val.shape[batch_dims:])
    return type(data)(batch=batch, non_tensor_batch=non_tensor, meta_info=data.meta_info)


def all_gather_data_proto(data: DataProto, process_group: Any = None) -> None:
    """All-gather ``data`` across ``process_group`` in place: afterwards every rank holds all ranks' rows in rank order.

    Used by sharding managers so each tensor-parallel rank of an inference engine sees the full data-parallel shard.
    Ranks may hold different numbers of rows; they must hold the same columns.
    """
    import torch.distributed as dist

    world_size = dist.get_world_size(group=process_group)
    if world_size == 1:
        return
    local_len = len(data)
    tensor_items = []
    if data.batch is not None:
        tensor_items = sorted(((str(k), k, v) for k, v in data.batch.items(include_nested=True, leaves_only=True)),
                              key=lambda item: item[0])
    signature = [(name, tuple(t.shape[1:]), str(t.dtype)) for name, _, t in tensor_items]
    gathered_meta: list[Any] = [None] * world_size
    dist.all_gather_object(gathered_meta, {
        "len": local_len,
        "has_batch": data.batch is not None,
        "signature": signature,
        "non_tensor_batch": data.non_tensor_batch,
    },
                           group=process_group)
    for rank, meta in enumerate(gathered_meta):
        if meta["has_batch"] != (data.batch is not None) or meta["signature"] != signature:
            raise ValueError(f"all_gather_data_proto: rank {rank} has tensor columns {meta['signature']} but this rank "
                             f"has {signature}; every rank must hold the same columns")
        if set(meta["non_tensor_batch"]) != set(data.non_tensor_batch):
            raise ValueError(f"all_gather_data_proto: rank {rank} has non-tensor columns "
                             f"{sorted(meta['non_tensor_batch'])} but this rank has {sorted(data.non_tensor_batch)}")
    lengths = [meta["len"] for meta in gathered_meta]
    max_len = max(lengths)

    if data.batch is not None:
        comm_device = None
        if dist.get_backend(process_group) == "nccl":
            from verl.utils.device import get_device  # lazy: only needed when the collective runs on an accelerator

            comm_device = get_device()
        new_batch = TensorDict({}, batch_size=[sum(lengths)], device=data.batch.device)
        for _, key, tensor in tensor_items:
            original_device = tensor.device
            work = tensor.to(comm_device) if comm_device is not None else tensor
            if work.shape[0] < max_len:
                pad = work.new_zeros((max_len - work.shape[0], *work.shape[1:]))
                work = torch.cat([work, pad], dim=0)
            work = work.contiguous()
            buffers = [torch.empty_like(work) for _ in range(world_size)]
            dist.all_gather(buffers, work, group=process_group)
            merged = torch.cat([buf[:n] for buf, n in zip(buffers, lengths)], dim=0)
            new_batch.set(key, merged.to(original_device))
        data.batch = new_batch
    data.non_tensor_batch = {
        key: np.concatenate([meta["non_tensor_batch"][key] for meta in gathered_meta], axis=0)
        for key in data.non_tensor_batch
    }
    data.check_consistency()


# ----------------------------------------------------------------------------------------------------------------------
# DataProtoFuture
# ----------------------------------------------------------------------------------------------------------------------


class _ChunkSelector:
    """Picklable ``dispatch_fn`` that keeps shard ``index`` of ``chunks`` (after an optional earlier dispatch)."""

    def __init__(self, chunks: int, index: int, parent: Callable | None = None) -> None:
        self.chunks, self.index, self.parent = chunks, index, parent

    def __call__(self, data: DataProto) -> DataProto:
        if self.parent is not None:
            data = self.parent(data)
        return data.chunk(chunks=self.chunks)[self.index]

    def __repr__(self) -> str:
        return f"_ChunkSelector(chunks={self.chunks}, index={self.index}, parent={self.parent!r})"


@dataclass(eq=False)
class DataProtoFuture:
    """A DataProto that is still being computed by workers (a list of Ray object refs plus how to assemble them).

    The driver passes it straight into the next worker-group call without fetching the data; the worker side calls
    :meth:`get`. ``collect_fn`` joins the fetched parts (``DataProto.concat``); ``dispatch_fn`` then picks this
    future's shard.
    """

    collect_fn: Callable
    futures: list
    dispatch_fn: Callable | None = None

    @staticmethod
    def concat(data: list) -> DataProtoFuture:
        """A future for the row-wise concatenation of the DataProtos behind ``data`` (Ray object refs)."""
        return DataProtoFuture(collect_fn=DataProto.concat, futures=list(data))

    def chunk(self, chunks: int) -> list[DataProtoFuture]:
        """``chunks`` futures sharing the same refs; future ``i`` resolves to shard ``i`` of the collected data."""
        if not isinstance(chunks, int) or chunks < 1:
            raise ValueError(f"DataProtoFuture.chunk: chunks must be a positive int, got {chunks!r}")
        return [
            DataProtoFuture(collect_fn=self.collect_fn,
                            futures=self.futures,
                            dispatch_fn=_ChunkSelector(chunks, i, self.dispatch_fn)) for i in range(chunks)
        ]

    def get(self) -> Any:
        """Fetch the parts with ``ray.get``, join them with ``collect_fn`` and apply ``dispatch_fn``."""
        import ray

        output = self.collect_fn(ray.get(self.futures))
        if self.dispatch_fn is not None:
            output = self.dispatch_fn(output)
        return output
