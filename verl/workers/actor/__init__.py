"""PPO actors: compute log-probs of responses and update the policy from advantages."""
from .base import BasePPOActor
from .dp_actor import DataParallelPPOActor

__all__ = ["BasePPOActor", "DataParallelPPOActor"]
