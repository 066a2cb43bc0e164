"""Placeholder for Megatron checkpoints: this verl has no Megatron backend yet."""
from __future__ import annotations

import torch

from verl.model_merger.base_model_merger import BaseModelMerger


class MegatronModelMerger(BaseModelMerger):

    def merge_state_dict(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"--backend megatron is not implemented yet (checkpoint {self.config.local_dir}); "
                                  "this verl trains with FSDP only: use --backend fsdp on an FSDP checkpoint")
