"""``ResourcePool``, ``ClassWithInitArgs`` and ``WorkerGroup``: the backend-independent side of the single controller.

A ``WorkerGroup`` holds one handle per rank and turns every ``@register``-ed method of its worker class into a method
of its own that runs dispatch -> execute -> collect (see :mod:`verl.single_controller.base.decorator`). Backends
(Ray) implement how a call reaches the workers: ``_call_workers`` and ``_fetch``.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from verl.single_controller.base.decorator import (
    MAGIC_ATTR,
    PADDING_SIZE_KEY,
    Dispatch,
    Execute,
    dispatch_returns_per_rank,
    get_predefined_dispatch_fn,
    remove_padding_from_output,
)

__all__ = ["ClassWithInitArgs", "ResourcePool", "WorkerError", "WorkerGroup", "MethodSpec"]


class WorkerError(RuntimeError):
    """A worker raised (or died) while running a method; names the rank and method and carries the worker traceback.

    When the worker's exception type can be mixed in, the raised object is also an instance of it, so
    ``except ValueError`` keeps working on the driver.
    """

    def __init__(self,
                 message: str,
                 *,
                 rank: int | None = None,
                 method: str | None = None,
                 worker_name: str | None = None,
                 cause: BaseException | None = None,
                 worker_traceback: str | None = None) -> None:
        Exception.__init__(self, message)
        self.rank = rank
        self.method = method
        self.worker_name = worker_name
        self.cause = cause
        self.worker_traceback = worker_traceback

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __reduce__(self) -> tuple:
        return _rebuild_worker_error, (str(self), self.rank, self.method, self.worker_name, self.worker_traceback)


def _rebuild_worker_error(message: str, rank: int | None, method: str | None, worker_name: str | None,
                          worker_traceback: str | None) -> WorkerError:
    return WorkerError(message, rank=rank, method=method, worker_name=worker_name, worker_traceback=worker_traceback)


def make_worker_error(message: str, cause: BaseException | None, **fields: Any) -> WorkerError:
    """A ``WorkerError`` that is also an instance of ``type(cause)`` when Python allows that mix-in."""
    cls: type[WorkerError] = WorkerError
    if cause is not None and not isinstance(cause, WorkerError) and isinstance(cause, Exception):
        try:
            cls = type(f"WorkerError({type(cause).__name__})", (WorkerError, type(cause)), {})
        except TypeError:  # incompatible layouts (e.g. OSError subclasses), final classes
            cls = WorkerError
    try:
        error = cls(message, cause=cause, **fields)
    except Exception:  # noqa: BLE001 - a mixed-in class with an odd constructor: fall back to the plain type
        error = WorkerError(message, cause=cause, **fields)
    if cause is not None and isinstance(error, type(cause)):
        for key, value in getattr(cause, "__dict__", {}).items():  # attributes the cause's type promises
            error.__dict__.setdefault(key, value)
    return error


class ResourcePool:
    """How many worker processes to start on each node: ``process_on_nodes=[4, 4]`` is 8 workers on 2 nodes.

    Args:
        process_on_nodes: worker processes per node (one per device on GPU clusters).
        max_colocate_count: how many worker groups may share one slot (one device), e.g. actor, critic and reference
            colocated on the same GPUs.
        n_gpus_per_node: devices per node (informative; placement is the backend's job).
    """

    def __init__(self,
                 process_on_nodes: Sequence[int] | None = None,
                 max_colocate_count: int = 10,
                 n_gpus_per_node: int = 8) -> None:
        process_on_nodes = [] if process_on_nodes is None else list(process_on_nodes)
        for i, count in enumerate(process_on_nodes):
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ValueError(f"process_on_nodes[{i}] must be a positive int (processes on node {i}), got "
                                 f"{count!r}")
        if isinstance(max_colocate_count, bool) or not isinstance(max_colocate_count, int) or max_colocate_count < 1:
            raise ValueError(f"max_colocate_count must be a positive int, got {max_colocate_count!r}")
        self._store = process_on_nodes
        self.max_colocate_count = max_colocate_count
        self.n_gpus_per_node = n_gpus_per_node

    def add_node(self, process_count: int) -> None:
        if isinstance(process_count, bool) or not isinstance(process_count, int) or process_count < 1:
            raise ValueError(f"process_count must be a positive int, got {process_count!r}")
        self._store.append(process_count)

    @property
    def world_size(self) -> int:
        """Total number of worker processes."""
        return sum(self._store)

    @property
    def store(self) -> list[int]:
        return self._store

    def __call__(self) -> list[int]:
        return self._store

    def local_world_size_list(self) -> list[int]:
        """For every rank, the number of workers on its node."""
        return [count for count in self._store for _ in range(count)]

    def local_rank_list(self) -> list[int]:
        """For every rank, its rank among the workers of its node."""
        return [local for count in self._store for local in range(count)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(process_on_nodes={self._store}, max_colocate_count={self.max_colocate_count})"


class ClassWithInitArgs:
    """A class and its constructor arguments, to build the instance later (in each worker process)."""

    def __init__(self, cls: type, *args: Any, **kwargs: Any) -> None:
        self.cls = cls
        self.args = args
        self.kwargs = kwargs
        self.fused_worker_used = False

    def __call__(self) -> Any:
        return self.cls(*self.args, **self.kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({getattr(self.cls, '__name__', self.cls)!r})"


class MethodSpec:
    """What the group needs to run one registered method: its dispatch/collect functions and execution mode."""

    def __init__(self, remote_name: str, dispatch_mode: Any, dispatch_fn: Callable, collect_fn: Callable,
                 execute_mode: Execute, blocking: bool) -> None:
        self.remote_name = remote_name
        self.dispatch_mode = dispatch_mode
        self.dispatch_fn = dispatch_fn
        self.collect_fn = collect_fn
        self.execute_mode = execute_mode
        self.blocking = blocking
        self.per_rank = dispatch_returns_per_rank(dispatch_mode)

    @classmethod
    def from_attrs(cls, remote_name: str, attrs: dict) -> MethodSpec | None:
        """Build from the attributes ``@register`` stored; None for methods that cannot be called from the driver."""
        mode = attrs["dispatch_mode"]
        if mode == Dispatch.DIRECT_ROLLOUT_METHOD:
            return None
        fns = mode if isinstance(mode, dict) else get_predefined_dispatch_fn(mode)
        return cls(remote_name, mode, fns["dispatch_fn"], fns["collect_fn"], attrs["execute_mode"], attrs["blocking"])


def _split_per_rank(world_size: int, args: tuple, kwargs: dict, per_rank: bool | None,
                    method: str) -> tuple[list[tuple], list[dict]]:
    """Per-rank ``(args, kwargs)``: split lists of ``world_size`` items (``per_rank``), or give everyone the same."""
    values = list(args) + list(kwargs.values())
    if per_rank is None:  # custom modes and execute_all: split only when every argument is a per-rank list
        per_rank = bool(values) and all(isinstance(v, (list, tuple)) and len(v) == world_size for v in values)
    if not per_rank:
        return [tuple(args)] * world_size, [dict(kwargs)] * world_size
    for v in values:
        if not isinstance(v, (list, tuple)) or len(v) != world_size:
            raise RuntimeError(f"{method}: the dispatch function must return one item per rank ({world_size}) for "
                               f"every argument, got {type(v).__name__}"
                               f"{' of length %d' % len(v) if isinstance(v, (list, tuple)) else ''}")
    return ([tuple(a[r] for a in args) for r in range(world_size)], [{
        k: v[r] for k, v in kwargs.items()
    } for r in range(world_size)])


class WorkerGroup:
    """A set of workers driven as one: every ``@register``-ed method of the worker class becomes a method here.

    Backends implement :meth:`_call_workers` (start ``method`` on the given ranks, return handles) and
    :meth:`_fetch` (wait for the handles, raising :class:`WorkerError` naming the failing rank).
    """

    def __init__(self, resource_pool: ResourcePool | None, **kwargs: Any) -> None:
        self._is_init_with_detached_workers = resource_pool is None
        self._procecss_dispatch_config = resource_pool() if resource_pool is not None else None
        self.resource_pool = resource_pool
        self._workers: list[Any] = []
        self._worker_names: list[str] = []
        self._dispatch_info: dict[str, list] = {}
        self._collect_info: dict[str, list] = {}
        self._method_specs: dict[str, MethodSpec] = {}
        self._master_addr: str | None = None
        self._master_port: str | None = None
        self._checker_thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------- basics ---------
    @property
    def world_size(self) -> int:
        return len(self._workers)

    @property
    def workers(self) -> list:
        return self._workers

    @property
    def worker_names(self) -> list[str]:
        return self._worker_names

    # --------------------------------------------------------------------------------- backend interface --------
    def _call_workers(self, method_name: str, ranks: Sequence[int], args_per_rank: Sequence[tuple],
                      kwargs_per_rank: Sequence[dict]) -> list:
        """Start ``method_name`` on ``ranks`` with their arguments; return one handle per rank without waiting."""
        raise NotImplementedError

    def _fetch(self, handles: list, method_name: str, ranks: Sequence[int]) -> list:
        """Wait for ``handles`` (from ranks ``ranks``) and return their values, raising ``WorkerError`` on failure."""
        raise NotImplementedError

    def _is_worker_alive(self, worker: Any) -> bool:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ execution -------
    def execute_all_async(self, method_name: str, *args: Any, **kwargs: Any) -> list:
        """Start ``method_name`` on every rank; return one handle per rank. Arguments that are all lists of
        ``world_size`` items are split (item ``i`` to rank ``i``); otherwise every rank gets the same arguments."""
        args_r, kwargs_r = _split_per_rank(self.world_size, args, kwargs, None, method_name)
        return self._call_workers(method_name, range(self.world_size), args_r, kwargs_r)

    def execute_all_sync(self, method_name: str, *args: Any, **kwargs: Any) -> list:
        """Like :meth:`execute_all_async` but waits and returns the per-rank values."""
        handles = self.execute_all_async(method_name, *args, **kwargs)
        return self._fetch(handles, method_name, range(self.world_size))

    def execute_all(self, method_name: str, *args: Any, **kwargs: Any) -> list:
        """Start ``method_name`` on every rank (see :meth:`execute_all_async`); returns the handles."""
        return self.execute_all_async(method_name, *args, **kwargs)

    def execute_rank_zero_async(self, method_name: str, *args: Any, **kwargs: Any) -> Any:
        """Start ``method_name`` on rank 0 only; return its handle."""
        return self._call_workers(method_name, [0], [args], [kwargs])[0]

    def execute_rank_zero_sync(self, method_name: str, *args: Any, **kwargs: Any) -> Any:
        """Run ``method_name`` on rank 0 and return its value."""
        return self._fetch([self.execute_rank_zero_async(method_name, *args, **kwargs)], method_name, [0])[0]

    def execute_rank_zero(self, method_name: str, *args: Any, **kwargs: Any) -> Any:
        """Start ``method_name`` on rank 0 only (see :meth:`execute_rank_zero_async`); returns the handle."""
        return self.execute_rank_zero_async(method_name, *args, **kwargs)

    def _run_method(self, spec: MethodSpec, args: tuple, kwargs: dict) -> Any:
        """dispatch -> execute -> (wait) -> collect -> remove padding."""
        args, kwargs = spec.dispatch_fn(self, *args, **kwargs)
        kwargs = dict(kwargs)
        padding = kwargs.pop(PADDING_SIZE_KEY, None)
        args_r, kwargs_r = _split_per_rank(self.world_size, tuple(args), kwargs, spec.per_rank, spec.remote_name)
        if spec.execute_mode == Execute.RANK_ZERO:
            ranks = [0]
            args_r, kwargs_r = args_r[:1], kwargs_r[:1]
        else:
            ranks = list(range(self.world_size))
        handles = self._call_workers(spec.remote_name, ranks, args_r, kwargs_r)
        output = self._fetch(handles, spec.remote_name, ranks) if spec.blocking else handles
        if spec.execute_mode == Execute.RANK_ZERO:
            return output[0]  # one rank ran: its output as is, no joining
        output = spec.collect_fn(self, output)
        if padding is not None:
            output = remove_padding_from_output(output, *padding)
        return output

    def _make_method(self, spec: MethodSpec) -> Callable:

        def method(*args: Any, **kwargs: Any) -> Any:
            return self._run_method(spec, args, kwargs)

        method.__name__ = spec.remote_name
        method.__qualname__ = f"{type(self).__name__}.{spec.remote_name}"
        return method

    def _bind_method(self, name: str, spec: MethodSpec, *, override: bool = False) -> None:
        if not override and name not in self._method_specs and hasattr(self, name):
            raise ValueError(f"worker method {name!r} would hide the worker group's own attribute of that name; "
                             "rename the worker method")
        self._method_specs[name] = spec
        setattr(self, name, self._make_method(spec))

    def _bind_worker_method(self, user_cls: type) -> list[str]:
        """Expose every ``@register``-ed method of ``user_cls`` on this group; returns the bound names."""
        bound = []
        for name in dir(user_cls):
            try:
                attr = getattr(user_cls, name)
            except Exception:  # noqa: BLE001 - descriptors that fail on the class are not registered methods
                continue
            attrs = getattr(attr, MAGIC_ATTR, None)
            if not isinstance(attrs, dict):
                continue
            spec = MethodSpec.from_attrs(name, attrs)
            if spec is None:
                continue
            self._bind_method(name, spec)
            bound.append(name)
        return bound

    # ------------------------------------------------------------------------------- n-d mesh bookkeeping ------
    def _get_dispatch_info(self, mesh_name: str) -> list:
        """Every rank's dp rank in ``mesh_name`` (asked once, then cached)."""
        if mesh_name not in self._dispatch_info:
            query = getattr(self, "_query_dispatch_info", None)
            if query is None:
                raise RuntimeError(f"mesh {mesh_name!r}: the worker class does not derive from verl's Worker, which "
                                   "provides _register_dispatch_collect_info / _query_dispatch_info")
            self._dispatch_info[mesh_name] = list(query(mesh_name))
        return self._dispatch_info[mesh_name]

    def _get_collect_info(self, mesh_name: str) -> list:
        """Every rank's ``is_collect`` flag in ``mesh_name`` (asked once, then cached)."""
        if mesh_name not in self._collect_info:
            query = getattr(self, "_query_collect_info", None)
            if query is None:
                raise RuntimeError(f"mesh {mesh_name!r}: the worker class does not derive from verl's Worker")
            info = list(query(mesh_name))
            missing = [rank for rank, flag in enumerate(info) if flag is None]
            if missing:
                raise RuntimeError(f"mesh {mesh_name!r}: ranks {missing} did not call "
                                   f"self._register_dispatch_collect_info({mesh_name!r}, dp_rank, is_collect)")
            self._collect_info[mesh_name] = info
        return self._collect_info[mesh_name]

    # ------------------------------------------------------------------------------------------ liveness --------
    def start_worker_aliveness_check(self, every_n_seconds: float = 1.0) -> None:
        """Watch the workers from a daemon thread and interrupt the driver (``KeyboardInterrupt``) if one dies."""
        import _thread
        import logging
        import time

        def check() -> None:
            while True:
                for rank, worker in enumerate(self._workers):
                    if not self._is_worker_alive(worker):
                        logging.getLogger(__name__).error("worker rank %d (%s) died; interrupting the driver", rank,
                                                          self._worker_names[rank] if self._worker_names else "?")
                        _thread.interrupt_main()
                        return
                time.sleep(every_n_seconds)

        self._checker_thread = threading.Thread(target=check, daemon=True, name="verl-worker-aliveness")
        self._checker_thread.start()
