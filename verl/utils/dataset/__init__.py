"""Datasets that feed training: RL prompts, SFT conversations, samplers and the parquet schema they share.

The dataset classes are imported lazily, so the preprocessing scripts (which only need ``schema`` and ``tasks``)
start without importing torch.
"""
import importlib
from typing import Any

_EXPORTS = {
    "RLHFDataset": "verl.utils.dataset.rl_dataset",
    "collate_fn": "verl.utils.dataset.rl_dataset",
    "get_dataset_class": "verl.utils.dataset.rl_dataset",
    "SFTDataset": "verl.utils.dataset.sft_dataset",
    "MultiTurnSFTDataset": "verl.utils.dataset.multiturn_sft_dataset",
    "create_rl_sampler": "verl.utils.dataset.sampler",
    "AbstractSampler": "verl.utils.dataset.sampler",
    "AbstractCurriculumSampler": "verl.utils.dataset.sampler",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'verl.utils.dataset' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
