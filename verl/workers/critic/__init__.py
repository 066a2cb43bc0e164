"""PPO critics: estimate values of response positions and regress them onto returns."""
from .base import BasePPOCritic
from .dp_critic import DataParallelPPOCritic

__all__ = ["BasePPOCritic", "DataParallelPPOCritic"]
