"""Import path of the HF rollout in upstream verl (``verl.workers.rollout.hf_rollout.HFRollout``); the code lives
in :mod:`verl.workers.rollout.hf`."""
from verl.workers.rollout.hf.hf_rollout import HFRollout

__all__ = ["HFRollout"]
