"""``Worker``: the base class of every process a worker group drives (one per device, inside a Ray actor).

The worker group starts each worker with its place in the group in the environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), so a worker can call
``torch.distributed.init_process_group(backend=get_nccl_backend())`` with the default ``env://`` method. The values
are read in ``__new__``, so they are there even when a subclass forgets ``super().__init__()``.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

from verl.single_controller.base.decorator import Dispatch, Execute, register

__all__ = ["DistGlobalInfo", "DistRankInfo", "Worker", "find_free_port", "get_node_ip"]


@dataclass
class DistRankInfo:
    """Ranks of a worker along the parallel dimensions of a Megatron-style mesh."""

    tp_rank: int
    dp_rank: int
    pp_rank: int
    cp_rank: int


@dataclass
class DistGlobalInfo:
    """Sizes of the parallel dimensions of a Megatron-style mesh."""

    tp_size: int
    dp_size: int
    pp_size: int
    cp_size: int


def find_free_port(host: str = "") -> int:
    """A TCP port that is free on this machine now (the OS picks it), for ``MASTER_PORT``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def get_node_ip() -> str:
    """The IP address other nodes reach this one at (Ray's view when Ray runs, else a best guess)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - fall back to the socket trick below
        pass
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("10.255.255.255", 1))
            return sock.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def _env_int(key: str, default: int) -> int:
    raw = os.environ.get(key)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {key}={raw!r} must be an integer (the worker group sets it; unset it "
                         "or fix its value)") from None


class Worker:
    """Base class of the code that runs on every rank of a worker group.

    Subclass it, decorate methods with :func:`~verl.single_controller.base.decorator.register`, and build a worker
    group from it (``RayWorkerGroup(pool, RayClassWithInitArgs(MyWorker, ...))``).

    ``fused_worker_dict`` maps role names to the sibling workers that share this process when several roles are
    fused with ``create_colocated_worker_cls`` (empty otherwise).
    """

    fused_worker_dict: dict[str, Worker]

    def __new__(cls, *args: Any, **kwargs: Any) -> Worker:
        instance = super().__new__(cls)
        instance._configure_from_env()
        return instance

    def __init__(self, cuda_visible_devices: str | None = None) -> None:
        if cuda_visible_devices is not None:
            from verl.utils.device import get_visible_devices_keyword

            os.environ[get_visible_devices_keyword()] = str(cuda_visible_devices)

    def _configure_from_env(self) -> None:
        self._rank = _env_int("RANK", 0)
        self._world_size = _env_int("WORLD_SIZE", 1)
        self._local_rank = _env_int("LOCAL_RANK", 0)
        self._local_world_size = _env_int("LOCAL_WORLD_SIZE", _env_int("RAY_LOCAL_WORLD_SIZE", 1))
        self._master_addr = os.environ.get("MASTER_ADDR")
        self._master_port = os.environ.get("MASTER_PORT")
        if not 0 <= self._rank < self._world_size:
            raise ValueError(
                f"RANK={self._rank} is outside 0..WORLD_SIZE-1 (WORLD_SIZE={self._world_size}); the worker "
                "group sets both, fix or unset them")
        self._dispatch_dp_rank: dict[str, int] = {}
        self._collect_dp_rank: dict[str, bool] = {}
        self.fused_worker_dict = {}

    # ------------------------------------------------------------------------------------------- identity --------
    @property
    def rank(self) -> int:
        """This worker's rank in its group (0 .. world_size - 1)."""
        return self._rank

    @property
    def world_size(self) -> int:
        """Number of workers in the group."""
        return self._world_size

    @property
    def local_rank(self) -> int:
        """Rank among the group's workers on this node."""
        return self._local_rank

    @property
    def local_world_size(self) -> int:
        """Number of the group's workers on this node."""
        return self._local_world_size

    def get_master_addr_port(self) -> tuple[str | None, str | None]:
        """``(MASTER_ADDR, MASTER_PORT)`` the group chose for ``torch.distributed`` rendezvous."""
        return self._master_addr, self._master_port

    def get_cuda_visible_devices(self) -> str:
        """The accelerators this process sees (``CUDA_VISIBLE_DEVICES``; ``"not set"`` when unset)."""
        from verl.utils.device import get_visible_devices_keyword

        return os.environ.get(get_visible_devices_keyword(), "not set")

    def get_node_ip_and_pid(self) -> tuple[str, int]:
        """Where this worker runs (for logs and placement checks)."""
        return get_node_ip(), os.getpid()

    # ------------------------------------------------------------------------------- n-d mesh dispatch -------
    def _register_dispatch_collect_info(self, mesh_name: str, dp_rank: int, is_collect: bool) -> None:
        """Declare this worker's data-parallel rank in mesh ``mesh_name`` and whether its output is collected.

        Methods registered with ``make_nd_compute_dataproto_dispatch_fn(mesh_name)`` send every worker the data shard
        of its dp rank and keep the outputs of the ``is_collect`` workers (one per dp rank).
        """
        if not isinstance(mesh_name, str) or not mesh_name:
            raise ValueError(f"mesh_name must be a non-empty string, got {mesh_name!r}")
        if isinstance(dp_rank, bool) or not isinstance(dp_rank, int) or dp_rank < 0:
            raise ValueError(f"dp_rank must be a non-negative int, got {dp_rank!r}")
        if mesh_name in self._dispatch_dp_rank and (self._dispatch_dp_rank[mesh_name],
                                                    self._collect_dp_rank[mesh_name]) != (dp_rank, bool(is_collect)):
            raise ValueError(f"mesh {mesh_name!r} is already registered on rank {self.rank} with dp_rank="
                             f"{self._dispatch_dp_rank[mesh_name]}, is_collect={self._collect_dp_rank[mesh_name]}")
        self._dispatch_dp_rank[mesh_name] = dp_rank
        self._collect_dp_rank[mesh_name] = bool(is_collect)

    def _find_mesh_owner(self, mesh_name: str) -> Worker | None:
        """This worker, or the fused sibling that declared ``mesh_name`` (a fused process answers for its roles)."""
        if mesh_name in self._dispatch_dp_rank:
            return self
        owners = [w for w in self.fused_worker_dict.values() if w is not self and mesh_name in w._dispatch_dp_rank]
        if len(owners) > 1:
            infos = {(w._dispatch_dp_rank[mesh_name], w._collect_dp_rank[mesh_name]) for w in owners}
            if len(infos) > 1:
                raise ValueError(f"several fused roles declared mesh {mesh_name!r} with different ranks {infos}; give "
                                 "each role its own mesh name")
        return owners[0] if owners else None

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def _query_dispatch_info(self, mesh_name: str) -> int | None:
        owner = self._find_mesh_owner(mesh_name)
        return None if owner is None else owner._dispatch_dp_rank[mesh_name]

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def _query_collect_info(self, mesh_name: str) -> bool | None:
        owner = self._find_mesh_owner(mesh_name)
        return None if owner is None else owner._collect_dp_rank[mesh_name]

    # ------------------------------------------------------------------------------- generic execution -------
    @register(dispatch_mode=Dispatch.DP_COMPUTE_PROTO_WITH_FUNC)
    def execute_with_func_generator(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a driver-supplied ``func(worker, *shards)`` on this rank's shard of the data."""
        return func(self, *args, **kwargs)

    @register(dispatch_mode=Dispatch.ALL_TO_ALL, execute_mode=Execute.RANK_ZERO)
    def execute_func_rank_zero(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a driver-supplied ``func(*args, **kwargs)`` on rank 0 only."""
        return func(*args, **kwargs)
