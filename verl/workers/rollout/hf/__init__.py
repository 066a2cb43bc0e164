"""The Hugging Face ``generate`` rollout backend (``actor_rollout_ref.rollout.name=hf``)."""
from verl.workers.rollout.hf.hf_rollout import HFRollout, SamplingSettings

__all__ = ["HFRollout", "SamplingSettings"]
