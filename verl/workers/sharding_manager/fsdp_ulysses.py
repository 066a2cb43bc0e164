"""The context in which an FSDP model runs with Ulysses sequence parallelism.

``FSDPUlyssesShardingManager(device_mesh)`` takes the ``(dp, sp)`` mesh of a worker (or None without sequence
parallelism). Inside ``with manager:`` the mesh's ``sp`` group is the current Ulysses group
(:func:`verl.utils.ulysses.set_ulysses_sequence_parallel_group`), which the patched attention and the actor/critic
forward use; on exit the previous group is restored, so that roles fused in one process (an actor with sp=2 and a
critic with sp=1) each see their own.

Data layout: the FSDP workers dispatch with the n-d mesh mode, where every rank of an sp group already receives its dp
group's rows (``dp_rank = rank // sp``) and only sp rank 0 is collected; they do not need the two data methods.
``preprocess_data`` / ``postprocess_data`` serve workers that dispatch one chunk per rank (``DP_COMPUTE_PROTO``):
they all-gather the chunks of the sp group so that its ranks work on the same rows, and keep this rank's chunk of
the result.
"""
from __future__ import annotations

from typing import Any

import torch.distributed as dist

from verl.protocol import DataProto
from verl.utils.ulysses import get_ulysses_sequence_parallel_group, set_ulysses_sequence_parallel_group
from verl.workers.sharding_manager.base import BaseShardingManager

__all__ = ["FSDPUlyssesShardingManager", "create_ulysses_device_mesh"]


def create_ulysses_device_mesh(world_size: int, sp_size: int) -> Any:
    """The ``(dp, sp)`` device mesh of ``world_size`` ranks (None for ``sp_size`` 1). Ranks ``i*sp .. i*sp+sp-1``
    form sp group ``i``, so a rank's dp rank is ``rank // sp``."""
    from torch.distributed.device_mesh import init_device_mesh

    from verl.utils.device import get_device_name

    sp_size = int(sp_size or 1)
    if sp_size < 1 or world_size % sp_size:
        raise ValueError(f"ulysses_sequence_parallel_size={sp_size} must be a positive divisor of the {world_size} "
                         "ranks of the worker group")
    if sp_size == 1:
        return None
    return init_device_mesh(get_device_name(), mesh_shape=(world_size // sp_size, sp_size), mesh_dim_names=("dp", "sp"))


class FSDPUlyssesShardingManager(BaseShardingManager):
    """Sets the Ulysses sp group of ``device_mesh`` (mesh dim ``"sp"``) while the context is active."""

    def __init__(self, device_mesh: Any = None) -> None:
        super().__init__()
        self.device_mesh = device_mesh
        self._saved: list[Any] = []

    @property
    def sp_group(self) -> Any:
        """The process group of this rank's sp ranks (None without sequence parallelism)."""
        return None if self.device_mesh is None else self.device_mesh.get_group("sp")

    @property
    def sp_size(self) -> int:
        return 1 if self.device_mesh is None else self.device_mesh.size(self.device_mesh.mesh_dim_names.index("sp"))

    def __enter__(self) -> "FSDPUlyssesShardingManager":
        if self.device_mesh is not None:
            self._saved.append(get_ulysses_sequence_parallel_group())
            set_ulysses_sequence_parallel_group(self.sp_group)
        return self

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        if self.device_mesh is not None:
            set_ulysses_sequence_parallel_group(self._saved.pop())
        return None

    def preprocess_data(self, data: DataProto) -> DataProto:
        """The rows of the whole sp group, in sp-rank order (every rank of the group gets the same)."""
        if self.device_mesh is None:
            return data
        parts: list[Any] = [None] * self.sp_size
        dist.all_gather_object(parts, data.to("cpu"), group=self.sp_group)
        return DataProto.concat(parts)

    def postprocess_data(self, data: DataProto) -> DataProto:
        """This rank's chunk of the sp group's result (inverse of :meth:`preprocess_data`)."""
        if self.device_mesh is None:
            return data
        return data.chunk(chunks=self.sp_size)[dist.get_rank(self.sp_group)]
