"""``@register``: how a worker method becomes a method of the worker group.

A method decorated with ``@register(dispatch_mode=..., execute_mode=...)`` on a :class:`~verl.single_controller.base.
worker.Worker` subclass is re-exposed on every :class:`~verl.single_controller.base.worker_group.WorkerGroup` built
from that class. Calling it on the driver runs three steps:

1. **dispatch** ``dispatch_fn(worker_group, *args, **kwargs) -> (args, kwargs)``: turns the driver's arguments into
   one share per rank. Every positional argument and keyword value becomes a list of ``world_size`` items (item ``i``
   goes to rank ``i``); only ``ALL_TO_ALL`` passes the arguments through unchanged (every rank gets the same ones).
2. **execute**: the worker group calls the method on every rank (``Execute.ALL``) or on rank 0 (``Execute.RANK_ZERO``).
3. **collect** ``collect_fn(worker_group, outputs) -> result``: joins the per-rank outputs (a list in rank order).

Batches of a ``DP_COMPUTE_PROTO``-like mode that do not divide the number of shards are padded with
:func:`verl.protocol.pad_dataproto_to_divisor` and the padding is removed from the joined result, so callers never
see it. The dispatch function reports the padding by adding :data:`PADDING_SIZE_KEY` to the kwargs it returns; the
worker group pops that key before the call reaches the workers. A ``DataProtoFuture`` argument (the output of a
``blocking=False`` call) is padded on the worker instead, once its rows are known; the worker drops the outputs of
its padding rows before returning.

Execution with ``Execute.RANK_ZERO`` returns rank 0's output as is (the collect function is not applied).

New modes can be added at run time with :func:`register_dispatch_mode`, or given inline as
``register(dispatch_mode={"dispatch_fn": f, "collect_fn": g})``.
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

__all__ = [
    "MAGIC_ATTR",
    "PADDING_SIZE_KEY",
    "PAD_ROWS_META_KEY",
    "DISPATCH_MODE_FN_REGISTRY",
    "Dispatch",
    "DynamicEnum",
    "Execute",
    "collect_all_to_all",
    "collect_dp_compute",
    "collect_dp_compute_data_proto",
    "collect_one_to_all",
    "dispatch_all_to_all",
    "dispatch_dp_compute",
    "dispatch_dp_compute_data_proto",
    "dispatch_dp_compute_data_proto_with_func",
    "dispatch_one_to_all",
    "get_predefined_dispatch_fn",
    "get_predefined_execute_fn",
    "make_nd_compute_dataproto_dispatch_fn",
    "register",
    "register_dispatch_mode",
    "remove_padding_from_output",
    "update_dispatch_mode",
]

#: Attribute under which ``@register`` stores ``{"dispatch_mode", "execute_mode", "blocking"}`` on the method.
MAGIC_ATTR = "attrs_3141562937"

#: Key a dispatch function adds to the kwargs it returns to report ``(pad_size, padded_length)``; popped by the group.
PADDING_SIZE_KEY = "_verl_padding_size"

#: ``meta_info`` key of a future's shard that holds padding rows (set and removed on the worker, never seen by methods).
PAD_ROWS_META_KEY = "_verl_pad_rows"

# ----------------------------------------------------------------------------------------------------------------------
# enums whose members can be added at run time
# ----------------------------------------------------------------------------------------------------------------------


def _restore_enum_member(enum_cls: type[DynamicEnum], name: str, value: int) -> DynamicEnum:
    """Unpickle a member: reuse the registered one, or register it (a custom mode unpickled in a worker process)."""
    member = enum_cls._registry.get(name)
    if member is None:
        member = enum_cls.register(name, value=value)
    return member


class DynamicEnum:
    """A small enum whose members are registered at run time (``Dispatch.register("MY_MODE")``).

    Members compare by class and name, hash, pickle by name, and are reachable as class attributes
    (``Dispatch.ONE_TO_ALL``).
    """

    _registry: dict[str, DynamicEnum] = {}
    _next_value: int = 0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._registry = {}
        cls._next_value = 0

    def __init__(self, name: str, value: int) -> None:
        self.name = name
        self.value = value

    @classmethod
    def register(cls, name: str, value: int | None = None) -> DynamicEnum:
        """Add member ``name``; registering an existing name is an error (use ``cls.from_name``)."""
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"{cls.__name__}.register: name must be a Python identifier, got {name!r}")
        if name in cls._registry:
            raise ValueError(f"{cls.__name__}.{name} is already registered; pick another name or remove it first "
                             f"with {cls.__name__}.remove({name!r})")
        if value is None:
            value = cls._next_value
        cls._next_value = max(cls._next_value, value + 1)
        member = cls(name, value)
        cls._registry[name] = member
        setattr(cls, name, member)
        return member

    @classmethod
    def remove(cls, name: str) -> DynamicEnum:
        """Drop member ``name`` (returns it)."""
        member = cls._registry.pop(name, None)
        if member is None:
            raise KeyError(f"{cls.__name__} has no member {name!r}; known: {sorted(cls._registry)}")
        if getattr(cls, name, None) is member:
            delattr(cls, name)
        return member

    @classmethod
    def from_name(cls, name: str) -> DynamicEnum:
        """Look a member up by name (``KeyError`` naming the known members when absent)."""
        try:
            return cls._registry[name]
        except KeyError:
            raise KeyError(f"{cls.__name__} has no member {name!r}; known: {sorted(cls._registry)}") from None

    @classmethod
    def names(cls) -> list[str]:
        return list(cls._registry)

    @classmethod
    def members(cls) -> list[DynamicEnum]:
        return list(cls._registry.values())

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.name == self.name  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.name))

    def __repr__(self) -> str:
        return f"<{type(self).__name__}.{self.name}: {self.value}>"

    def __str__(self) -> str:
        return f"{type(self).__name__}.{self.name}"

    def __reduce__(self) -> tuple:
        return _restore_enum_member, (type(self), self.name, self.value)


class Dispatch(DynamicEnum):
    """How the driver's arguments are split across ranks and how the outputs are joined (see module docstring)."""


class Execute(DynamicEnum):
    """Which ranks run the method: ``ALL`` or ``RANK_ZERO``."""


for _name in ("RANK_ZERO", "ONE_TO_ALL", "ALL_TO_ALL", "DP_COMPUTE", "DP_COMPUTE_PROTO", "DP_COMPUTE_PROTO_WITH_FUNC",
              "DP_COMPUTE_METRIC", "DIRECT_ROLLOUT_METHOD"):
    Dispatch.register(_name)
for _name in ("ALL", "RANK_ZERO"):
    Execute.register(_name)
del _name

# ----------------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------------


def _is_object_ref(obj: Any) -> bool:
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency, but the base layer does not need it
        return False
    return isinstance(obj, ray.ObjectRef)


def _world_size(worker_group: Any) -> int:
    size = worker_group.world_size
    if size < 1:
        raise RuntimeError("the worker group has no workers; it cannot dispatch a call")
    return size


def _data_length(obj: Any) -> int:
    from tensordict import TensorDict

    if isinstance(obj, TensorDict):
        if len(obj.batch_size) == 0:
            raise ValueError("a TensorDict argument needs a batch dimension to be split across workers")
        return int(obj.batch_size[0])
    return len(obj)


def _pad_tensordict(td: Any, pad_size: int) -> Any:
    """Append copies of the leading rows of a TensorDict (the TensorDict twin of ``pad_dataproto_to_divisor``)."""
    import torch

    length = _data_length(td)
    if length == 0:
        raise ValueError("cannot pad an empty TensorDict (no row to copy)")
    idx = torch.arange(pad_size) % length
    return torch.cat([td, td[idx]], dim=0)


def _chunk_data(obj: Any, chunks: int) -> list:
    from tensordict import TensorDict

    from verl.protocol import DataProtoFuture

    if isinstance(obj, DataProtoFuture):
        return [
            DataProtoFuture(collect_fn=obj.collect_fn,
                            futures=obj.futures,
                            dispatch_fn=_PadAndSelectShard(chunks, i, obj.dispatch_fn)) for i in range(chunks)
        ]
    if isinstance(obj, TensorDict):
        length = _data_length(obj)
        size = length // chunks
        return [obj[i * size:(i + 1) * size] for i in range(chunks)]
    return obj.chunk(chunks)


def _split_data_args(chunks: int, args: tuple, kwargs: dict) -> tuple[list[list], dict[str, list], tuple | None]:
    """Split every DataProto / TensorDict / DataProtoFuture argument into ``chunks`` shards, padding if needed.

    Returns ``(args_chunks, kwargs_chunks, padding)`` where ``padding`` is ``(pad_size, padded_length)`` or ``None``.
    """
    from tensordict import TensorDict

    from verl.protocol import DataProto, DataProtoFuture, pad_dataproto_to_divisor

    named = [(f"positional argument {i}", a) for i, a in enumerate(args)]
    named += [(f"keyword argument {k!r}", v) for k, v in kwargs.items()]
    lengths = {}
    has_future = False
    for label, value in named:
        if isinstance(value, DataProtoFuture):
            has_future = True
        elif isinstance(value, (DataProto, TensorDict)):
            lengths[label] = _data_length(value)
        else:
            raise TypeError(f"this dispatch mode splits its arguments row-wise across workers, but {label} is a "
                            f"{type(value).__name__}, not a DataProto, TensorDict or DataProtoFuture. Put scalar "
                            "settings in data.meta_info, or register the method with Dispatch.ONE_TO_ALL")
    if len(set(lengths.values())) > 1:
        raise ValueError(f"the data arguments have different numbers of rows ({lengths}); they are split row-wise "
                         "across workers, so they must have the same length")
    length = next(iter(lengths.values()), 0)
    pad_size = (-length) % chunks
    padding = None
    if pad_size and lengths:
        if has_future:
            raise ValueError(f"the DataProto arguments have {length} rows, which does not divide the {chunks} shards, "
                             "and they come with a DataProtoFuture argument, whose rows are only known on the "
                             f"workers. Pad first with `pad_dataproto_to_divisor(data, {chunks})`, or pass all data "
                             "arguments as futures (or all as DataProtos)")

        def pad(value: Any) -> Any:
            if isinstance(value, DataProto):
                return pad_dataproto_to_divisor(value, chunks)[0]
            return _pad_tensordict(value, pad_size)

        args = tuple(pad(a) for a in args)
        kwargs = {k: pad(v) for k, v in kwargs.items()}
        padding = (pad_size, length + pad_size)
    split_args = [_chunk_data(a, chunks) for a in args]
    split_kwargs = {k: _chunk_data(v, chunks) for k, v in kwargs.items()}
    return split_args, split_kwargs, padding


def remove_padding_from_output(output: Any, pad_size: int, padded_length: int) -> Any:
    """Drop the outputs of the padding rows from a joined result.

    The padding rows are the last ``pad_size`` of ``padded_length`` input rows; when the method emits ``k`` rows per
    input row (e.g. ``n`` samples per prompt), the last ``k * pad_size`` output rows are dropped. Lists (metrics) and
    other values are returned unchanged.
    """
    from tensordict import TensorDict

    from verl.protocol import DataProto, DataProtoFuture

    if not pad_size:
        return output
    if isinstance(output, DataProtoFuture):
        return DataProtoFuture(collect_fn=_UnpadAfter(output.collect_fn, pad_size, padded_length),
                               futures=output.futures,
                               dispatch_fn=output.dispatch_fn)
    if not isinstance(output, (DataProto, TensorDict)):
        return output
    n_out = _data_length(output)
    if n_out % padded_length != 0:
        raise ValueError(f"the workers returned {n_out} rows for {padded_length} input rows (padded from "
                         f"{padded_length - pad_size} to split evenly), which is not a whole number of rows per input "
                         "row, so the padding cannot be removed. Send a batch whose size divides the number of "
                         "workers")
    drop = pad_size * (n_out // padded_length)
    return output[:n_out - drop] if isinstance(output, TensorDict) else output.slice(0, n_out - drop)


class _PadAndSelectShard:
    """Picklable ``dispatch_fn`` of a DataProtoFuture shard, run on the worker once the data is there.

    Pads the collected data to a multiple of ``chunks`` (its length is unknown on the driver) and keeps shard
    ``index``; when the shard holds padding rows, their count goes into ``meta_info[PAD_ROWS_META_KEY]`` so the
    ``@register`` wrapper drops their outputs on the worker.
    """

    def __init__(self, chunks: int, index: int, parent: Callable | None = None) -> None:
        self.chunks, self.index, self.parent = chunks, index, parent

    def __call__(self, data: Any) -> Any:
        from verl.protocol import pad_dataproto_to_divisor

        if self.parent is not None:
            data = self.parent(data)
        length = len(data)
        padded, _ = pad_dataproto_to_divisor(data, self.chunks)
        size = len(padded) // self.chunks
        start = self.index * size
        shard = padded.slice(start, start + size)
        shard.meta_info = dict(shard.meta_info)  # slices share meta_info; the pad count is this shard's own
        pad_rows = max(0, start + size - max(length, start))
        if pad_rows:
            shard.meta_info[PAD_ROWS_META_KEY] = pad_rows
        return shard

    def __repr__(self) -> str:
        return f"_PadAndSelectShard(chunks={self.chunks}, index={self.index}, parent={self.parent!r})"


class _UnpadAfter:
    """Picklable ``collect_fn`` for a DataProtoFuture: join the parts, then drop the padding rows."""

    def __init__(self, collect_fn: Callable, pad_size: int, padded_length: int) -> None:
        self.collect_fn, self.pad_size, self.padded_length = collect_fn, pad_size, padded_length

    def __call__(self, parts: list) -> Any:
        return remove_padding_from_output(self.collect_fn(parts), self.pad_size, self.padded_length)


# ----------------------------------------------------------------------------------------------------------------------
# predefined dispatch / collect functions
# ----------------------------------------------------------------------------------------------------------------------


def dispatch_one_to_all(worker_group: Any, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
    """Every rank gets the same arguments."""
    n = _world_size(worker_group)
    return tuple([a] * n for a in args), {k: [v] * n for k, v in kwargs.items()}


def collect_one_to_all(worker_group: Any, output: list) -> list:
    """The list of per-rank outputs, in rank order."""
    return output


def dispatch_all_to_all(worker_group: Any, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
    """Arguments pass through unchanged (every rank gets them as given)."""
    return args, kwargs


def collect_all_to_all(worker_group: Any, output: Any) -> Any:
    """The outputs pass through unchanged."""
    return output


def dispatch_rank_zero(worker_group: Any, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
    """Every rank gets the same arguments (all take part, e.g. in a collective); only rank 0's output is kept."""
    return dispatch_one_to_all(worker_group, *args, **kwargs)


def collect_rank_zero(worker_group: Any, output: list) -> Any:
    return output[0]


def dispatch_dp_compute(worker_group: Any, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
    """The caller already split the data: every argument is a list or tuple with one item per rank."""
    n = _world_size(worker_group)
    named = [(f"positional argument {i}", a) for i, a in enumerate(args)]
    named += [(f"keyword argument {k!r}", v) for k, v in kwargs.items()]
    for label, value in named:
        if not isinstance(value, (list, tuple)) or len(value) != n:
            got = f"a {type(value).__name__} of length {len(value)}" if isinstance(value,
                                                                                   (list, tuple)) else repr(value)[:80]
            raise ValueError(f"Dispatch.DP_COMPUTE needs every argument to be a list with one item per rank "
                             f"({n} ranks), but {label} is {got}")
    return tuple(list(a) for a in args), {k: list(v) for k, v in kwargs.items()}


def collect_dp_compute(worker_group: Any, output: list) -> list:
    """The list of per-rank outputs (one per rank)."""
    n = _world_size(worker_group)
    if len(output) != n:
        raise RuntimeError(f"expected {n} outputs (one per rank), got {len(output)}")
    return output


def dispatch_dp_compute_data_proto(worker_group: Any, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
    """Split every DataProto argument into ``world_size`` equal shards (padding when needed); shard ``i`` -> rank
    ``i``."""
    n = _world_size(worker_group)
    split_args, split_kwargs, padding = _split_data_args(n, args, kwargs)
    if padding is not None:
        split_kwargs[PADDING_SIZE_KEY] = padding
    return tuple(split_args), split_kwargs


def dispatch_dp_compute_data_proto_with_func(worker_group: Any, func: Callable, *args: Any,
                                             **kwargs: Any) -> tuple[tuple, dict]:
    """Like ``DP_COMPUTE_PROTO`` for the arguments after the first, which is a function sent to every rank."""
    if not callable(func):
        raise TypeError(f"Dispatch.DP_COMPUTE_PROTO_WITH_FUNC needs a function as first argument, got "
                        f"{type(func).__name__}")
    n = _world_size(worker_group)
    split_args, split_kwargs = dispatch_dp_compute_data_proto(worker_group, *args, **kwargs)
    return ([func] * n, *split_args), split_kwargs


def collect_dp_compute_data_proto(worker_group: Any, output: list) -> Any:
    """Join per-rank DataProtos (or TensorDicts) row-wise; Ray object refs become one ``DataProtoFuture``."""
    import torch
    from tensordict import TensorDict

    from verl.protocol import DataProto, DataProtoFuture

    output = list(output)
    if not output:
        raise RuntimeError("no outputs to collect")
    if all(_is_object_ref(o) for o in output):
        return DataProtoFuture.concat(output)
    if all(isinstance(o, DataProto) for o in output):
        return DataProto.concat(output)
    if all(isinstance(o, TensorDict) for o in output):
        return torch.cat(output, dim=0)
    if all(o is None for o in output):
        return None
    kinds = sorted({type(o).__name__ for o in output})
    raise TypeError(f"this dispatch mode joins the outputs row-wise, so the method must return a DataProto (or a "
                    f"TensorDict, or None) on every rank; got {kinds}. Return a DataProto, or register the method "
                    "with Dispatch.DP_COMPUTE_METRIC or Dispatch.ONE_TO_ALL to get the list of outputs")


# --- n-d mesh mode ----------------------------------------------------------------------------------------------------


def _mesh_dp_ranks(worker_group: Any, mesh_name: str) -> list[int]:
    dp_ranks = worker_group._get_dispatch_info(mesh_name)
    missing = [rank for rank, dp in enumerate(dp_ranks) if dp is None]
    if missing:
        raise RuntimeError(f"mesh {mesh_name!r}: ranks {missing} did not declare their data-parallel rank. Call "
                           f"self._register_dispatch_collect_info({mesh_name!r}, dp_rank=..., is_collect=...) in the "
                           "worker's __init__ (or before the first call of this method)")
    dp_size = max(dp_ranks) + 1
    absent = sorted(set(range(dp_size)) - set(dp_ranks))
    if absent or min(dp_ranks) < 0:
        raise RuntimeError(f"mesh {mesh_name!r}: the declared dp ranks {dp_ranks} must cover 0..{dp_size - 1} "
                           f"(missing {absent})")
    return dp_ranks


def _nd_dispatch(mesh_name: str, worker_group: Any, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
    dp_ranks = _mesh_dp_ranks(worker_group, mesh_name)
    dp_size = max(dp_ranks) + 1
    split_args, split_kwargs, padding = _split_data_args(dp_size, args, kwargs)
    out_args = tuple([chunks[dp] for dp in dp_ranks] for chunks in split_args)
    out_kwargs = {k: [chunks[dp] for dp in dp_ranks] for k, chunks in split_kwargs.items()}
    if padding is not None:
        out_kwargs[PADDING_SIZE_KEY] = padding
    return out_args, out_kwargs


def _nd_collect(mesh_name: str, worker_group: Any, output: list) -> Any:
    dp_ranks = _mesh_dp_ranks(worker_group, mesh_name)
    collect_mask = worker_group._get_collect_info(mesh_name)
    chosen: dict[int, Any] = {}
    for rank, (dp, keep, out) in enumerate(zip(dp_ranks, collect_mask, output)):
        if not keep:
            continue
        if dp in chosen:
            raise RuntimeError(f"mesh {mesh_name!r}: several ranks with dp rank {dp} declared is_collect=True; exactly "
                               "one rank per data-parallel group must be collected (e.g. the one with tp rank 0)")
        chosen[dp] = out
    missing = sorted(set(range(max(dp_ranks) + 1)) - set(chosen))
    if missing:
        raise RuntimeError(f"mesh {mesh_name!r}: no rank with dp rank(s) {missing} declared is_collect=True; exactly "
                           "one rank per data-parallel group must be collected")
    return collect_dp_compute_data_proto(worker_group, [chosen[dp] for dp in sorted(chosen)])


def make_nd_compute_dataproto_dispatch_fn(mesh_name: str) -> dict[str, Callable]:
    """A dispatch mode for n-d device meshes (data parallel x tensor/pipeline/sequence parallel).

    Every worker declares ``self._register_dispatch_collect_info(mesh_name, dp_rank, is_collect)``. The data is split
    into ``dp_size = max(dp_rank) + 1`` shards (padding when needed); every worker gets the shard of its dp rank, and
    only the outputs of ``is_collect`` workers (one per dp rank) are joined, in dp-rank order. Use as
    ``@register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn("actor"))``.
    """
    if not isinstance(mesh_name, str) or not mesh_name:
        raise ValueError(f"mesh_name must be a non-empty string, got {mesh_name!r}")
    return {
        "dispatch_fn": functools.partial(_nd_dispatch, mesh_name),
        "collect_fn": functools.partial(_nd_collect, mesh_name),
    }


# ----------------------------------------------------------------------------------------------------------------------
# registries
# ----------------------------------------------------------------------------------------------------------------------

DISPATCH_MODE_FN_REGISTRY: dict[Dispatch, dict[str, Callable]] = {
    Dispatch.RANK_ZERO: {
        "dispatch_fn": dispatch_rank_zero,
        "collect_fn": collect_rank_zero
    },
    Dispatch.ONE_TO_ALL: {
        "dispatch_fn": dispatch_one_to_all,
        "collect_fn": collect_one_to_all
    },
    Dispatch.ALL_TO_ALL: {
        "dispatch_fn": dispatch_all_to_all,
        "collect_fn": collect_all_to_all
    },
    Dispatch.DP_COMPUTE: {
        "dispatch_fn": dispatch_dp_compute,
        "collect_fn": collect_dp_compute
    },
    Dispatch.DP_COMPUTE_PROTO: {
        "dispatch_fn": dispatch_dp_compute_data_proto,
        "collect_fn": collect_dp_compute_data_proto
    },
    Dispatch.DP_COMPUTE_PROTO_WITH_FUNC: {
        "dispatch_fn": dispatch_dp_compute_data_proto_with_func,
        "collect_fn": collect_dp_compute_data_proto
    },
    Dispatch.DP_COMPUTE_METRIC: {
        "dispatch_fn": dispatch_dp_compute_data_proto,
        "collect_fn": collect_dp_compute
    },
}

#: Modes whose dispatch function returns one item per rank for every argument (the rest pass arguments through).
_PER_RANK_MODES = {
    Dispatch.RANK_ZERO, Dispatch.ONE_TO_ALL, Dispatch.DP_COMPUTE, Dispatch.DP_COMPUTE_PROTO,
    Dispatch.DP_COMPUTE_PROTO_WITH_FUNC, Dispatch.DP_COMPUTE_METRIC
}

_EXECUTE_FN_NAMES = {Execute.ALL: "execute_all", Execute.RANK_ZERO: "execute_rank_zero"}


def _check_fn_dict(fns: Any, where: str) -> None:
    if not isinstance(fns, dict) or set(fns) != {"dispatch_fn", "collect_fn"}:
        raise ValueError(f"{where}: a custom dispatch mode is a dict with exactly the keys 'dispatch_fn' and "
                         f"'collect_fn', got {fns!r}")
    for key in ("dispatch_fn", "collect_fn"):
        if not callable(fns[key]):
            raise TypeError(f"{where}: {key} must be callable, got {type(fns[key]).__name__}")


def register_dispatch_mode(dispatch_mode_name: str, dispatch_fn: Callable, collect_fn: Callable) -> Dispatch:
    """Add a dispatch mode ``Dispatch.<dispatch_mode_name>`` with its own split and join functions.

    ``dispatch_fn(worker_group, *args, **kwargs) -> (args, kwargs)`` must return one item per rank for every argument;
    ``collect_fn(worker_group, outputs: list) -> result``.
    """
    fns = {"dispatch_fn": dispatch_fn, "collect_fn": collect_fn}
    _check_fn_dict(fns, "register_dispatch_mode")
    mode = Dispatch.register(dispatch_mode_name)
    DISPATCH_MODE_FN_REGISTRY[mode] = fns
    return mode


def update_dispatch_mode(dispatch_mode: Dispatch, dispatch_fn: Callable, collect_fn: Callable) -> None:
    """Replace the split and join functions of an existing mode."""
    if dispatch_mode not in DISPATCH_MODE_FN_REGISTRY:
        raise KeyError(f"{dispatch_mode} has no functions registered; add it with register_dispatch_mode")
    fns = {"dispatch_fn": dispatch_fn, "collect_fn": collect_fn}
    _check_fn_dict(fns, "update_dispatch_mode")
    DISPATCH_MODE_FN_REGISTRY[dispatch_mode] = fns


def get_predefined_dispatch_fn(dispatch_mode: Dispatch) -> dict[str, Callable]:
    """``{"dispatch_fn", "collect_fn"}`` of a registered mode."""
    try:
        return DISPATCH_MODE_FN_REGISTRY[dispatch_mode]
    except KeyError:
        raise KeyError(f"{dispatch_mode!r} has no dispatch functions (DIRECT_ROLLOUT_METHOD cannot be called from the "
                       "driver); known modes: "
                       f"{sorted(str(m) for m in DISPATCH_MODE_FN_REGISTRY)}") from None


def get_predefined_execute_fn(execute_mode: Execute) -> dict[str, str]:
    """``{"execute_fn_name": "execute_all" | "execute_rank_zero"}``: the worker-group method that runs the call."""
    try:
        return {"execute_fn_name": _EXECUTE_FN_NAMES[execute_mode]}
    except KeyError:
        raise KeyError(f"unknown execute mode {execute_mode!r}; use Execute.ALL or Execute.RANK_ZERO") from None


def dispatch_returns_per_rank(dispatch_mode: Any) -> bool | None:
    """True when the mode's dispatch returns one item per rank for every argument, False when it passes arguments
    through (``ALL_TO_ALL``: every rank gets them as given), None for custom modes: then the group splits the
    arguments when all of them are lists of ``world_size`` items, as :meth:`WorkerGroup.execute_all` does."""
    if dispatch_mode == Dispatch.ALL_TO_ALL:
        return False
    if isinstance(dispatch_mode, Dispatch) and dispatch_mode in _PER_RANK_MODES:
        return True
    return None


# ----------------------------------------------------------------------------------------------------------------------
# the decorator
# ----------------------------------------------------------------------------------------------------------------------


def _materialize_futures(args: tuple, kwargs: dict) -> tuple[tuple, dict, tuple[int, int] | None]:
    """Replace every ``DataProtoFuture`` argument by its data (runs on the worker).

    Returns ``(args, kwargs, padding)``; ``padding`` is ``(pad_rows, shard_rows)`` when the shards hold padding rows
    (see :class:`_PadAndSelectShard`), whose outputs :func:`_drop_worker_padding` removes after the call.
    """
    from verl.protocol import DataProto, DataProtoFuture

    if not any(isinstance(a, DataProtoFuture)
               for a in args) and not any(isinstance(v, DataProtoFuture) for v in kwargs.values()):
        return args, kwargs, None
    padding = None

    def resolve(value: Any) -> Any:
        nonlocal padding
        if not isinstance(value, DataProtoFuture):
            return value
        data = value.get()
        if isinstance(data, DataProto) and PAD_ROWS_META_KEY in data.meta_info:
            data.meta_info = dict(data.meta_info)
            padding = (int(data.meta_info.pop(PAD_ROWS_META_KEY)), len(data))
        return data

    args = tuple(resolve(a) for a in args)
    kwargs = {k: resolve(v) for k, v in kwargs.items()}
    return args, kwargs, padding


def _drop_worker_padding(output: Any, padding: tuple[int, int] | None) -> Any:
    if padding is None:
        return output
    pad_rows, shard_rows = padding
    return remove_padding_from_output(output, pad_rows, shard_rows)


def _check_dispatch_mode(dispatch_mode: Any) -> None:
    if isinstance(dispatch_mode, Dispatch):
        if dispatch_mode.name not in Dispatch._registry:
            raise ValueError(f"{dispatch_mode} is not a registered dispatch mode")
        return
    if isinstance(dispatch_mode, dict):
        _check_fn_dict(dispatch_mode, "register(dispatch_mode=...)")
        return
    raise TypeError(f"register: dispatch_mode must be a Dispatch member (e.g. Dispatch.DP_COMPUTE_PROTO) or a dict "
                    f"with 'dispatch_fn' and 'collect_fn', got {dispatch_mode!r}")


def register(dispatch_mode: Dispatch | dict = Dispatch.ALL_TO_ALL,
             execute_mode: Execute = Execute.ALL,
             blocking: bool = True,
             materialize_futures: bool = True) -> Callable[[Callable], Callable]:
    """Expose a worker method on the worker group (see module docstring).

    Args:
        dispatch_mode: how arguments are split and outputs joined: a :class:`Dispatch` member or a dict with
            ``dispatch_fn`` and ``collect_fn`` (e.g. from :func:`make_nd_compute_dataproto_dispatch_fn`).
        execute_mode: ``Execute.ALL`` (every rank) or ``Execute.RANK_ZERO``.
        blocking: when False the group method returns at once: a ``DataProtoFuture`` for DataProto modes (pass it
            straight into another call), otherwise the Ray object refs.
        materialize_futures: resolve ``DataProtoFuture`` arguments on the worker before the method runs.
    """
    _check_dispatch_mode(dispatch_mode)
    if not isinstance(execute_mode, Execute):
        raise TypeError(f"register: execute_mode must be Execute.ALL or Execute.RANK_ZERO, got {execute_mode!r}")
    if not isinstance(blocking, bool):
        raise TypeError(f"register: blocking must be a bool, got {blocking!r}")

    def decorator(func: Callable) -> Callable:
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def inner(*args: Any, **kwargs: Any) -> Any:
                padding = None
                if materialize_futures:
                    args, kwargs, padding = _materialize_futures(args, kwargs)
                return _drop_worker_padding(await func(*args, **kwargs), padding)
        else:

            @functools.wraps(func)
            def inner(*args: Any, **kwargs: Any) -> Any:
                padding = None
                if materialize_futures:
                    args, kwargs, padding = _materialize_futures(args, kwargs)
                return _drop_worker_padding(func(*args, **kwargs), padding)

        setattr(inner, MAGIC_ATTR, {"dispatch_mode": dispatch_mode, "execute_mode": execute_mode, "blocking": blocking})
        return inner

    return decorator
