"""Rewards: one interface (images in [0, 1] + prompts -> (B,)), a registry, rule and learned rewards.

Model rewards (aesthetic, clip_score, pickscore, hpsv2, image_reward) load local weights; see
:mod:`rlr_backend.rewards.models`.
"""

from .base import CallableReward, Reward, WeightedSum
from .models import REWARD_MODELS_ENV, MissingRewardWeights, find_reward_models
from .registry import REWARD_HELP, REWARDS, make_reward
from .rules import Brightness, Contrast, Darkness, JpegSize, Saturation, TargetColor

__all__ = ["Brightness", "CallableReward", "Contrast", "Darkness", "JpegSize", "MissingRewardWeights", "REWARDS",
           "REWARD_HELP", "REWARD_MODELS_ENV", "Reward", "Saturation", "TargetColor", "WeightedSum",
           "find_reward_models", "make_reward"]
