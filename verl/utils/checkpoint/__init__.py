"""Checkpoint managers (sharded FSDP2 state, optimizer, lr scheduler, RNG) and the helpers the trainer uses to find
and record the latest complete checkpoint. See :mod:`.checkpoint_manager` for the on-disk layout."""
from verl.utils.checkpoint.checkpoint_manager import (CHECKPOINT_CONTENTS, TRACKER_FILENAME, BaseCheckpointManager,
                                                      CheckpointSaveError, atomic_torch_save, atomic_write_text,
                                                      find_latest_ckpt_path, get_checkpoint_tracker_filename,
                                                      read_latest_checkpointed_iteration, should_save_ckpt_esi,
                                                      write_latest_checkpointed_iteration)
from verl.utils.checkpoint.fsdp_checkpoint_manager import FSDPCheckpointManager

__all__ = [
    "CHECKPOINT_CONTENTS",
    "TRACKER_FILENAME",
    "BaseCheckpointManager",
    "CheckpointSaveError",
    "FSDPCheckpointManager",
    "atomic_torch_save",
    "atomic_write_text",
    "find_latest_ckpt_path",
    "get_checkpoint_tracker_filename",
    "read_latest_checkpointed_iteration",
    "should_save_ckpt_esi",
    "write_latest_checkpointed_iteration",
]
