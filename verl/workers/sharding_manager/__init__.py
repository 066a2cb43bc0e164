"""Hybrid-engine sharding managers: context managers that load the training weights into the rollout engine before
generation and free the engine's memory after it (see :class:`BaseShardingManager`)."""
from verl.workers.sharding_manager.base import BaseShardingManager
from verl.workers.sharding_manager.fsdp_hf import FSDPHFShardingManager
from verl.workers.sharding_manager.fsdp_ulysses import FSDPUlyssesShardingManager

__all__ = ["BaseShardingManager", "FSDPHFShardingManager", "FSDPUlyssesShardingManager"]
