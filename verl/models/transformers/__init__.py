"""Patches of Hugging Face ``transformers`` models (Ulysses sequence parallelism); see :mod:`.monkey_patch`."""
from verl.models.transformers.monkey_patch import apply_monkey_patch

__all__ = ["apply_monkey_patch"]
