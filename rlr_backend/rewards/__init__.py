"""Rewards: one interface (images in [0, 1] + prompts -> (B,)), a registry, rule and learned rewards."""

from .base import CallableReward, Reward, WeightedSum
from .registry import REWARD_HELP, REWARDS, make_reward
from .rules import Brightness, Contrast, Darkness, JpegSize, Saturation, TargetColor

__all__ = ["Brightness", "CallableReward", "Contrast", "Darkness", "JpegSize", "REWARDS", "REWARD_HELP", "Reward",
           "Saturation", "TargetColor", "WeightedSum", "make_reward"]
