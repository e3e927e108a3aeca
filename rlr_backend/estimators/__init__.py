"""Gradient estimators over a sampled chain: RLR and its baselines (see docs/estimators.md)."""

from .advantages import BASELINES, BaselineState, compute_advantages
from .backprop import FullBPConfig, TruncatedBPConfig, full_bp_estimate, truncated_bp_estimate
from .code_compat import CodeCompatConfig, code_compat_estimate
from .likelihood_ratio import DDPOConfig, ZOConfig, ddpo_estimate, ddpo_update, zo_estimate
from .notes import EstimatorNotes
from .notes import describe as describe_estimator
from .partition import ChainSplit, JSampler, split_chain
from .problem import (BatchShard, ChainProblem, Estimate, Gradients, RecomputationMismatch, RewardOutputError,
                      evaluate_reward)
from .registry import ESTIMATORS, EstimatorSpec, get_estimator
from .rlr import ZO_MODES, RLRConfig, rlr_estimate

__all__ = [
    "BASELINES", "BaselineState", "BatchShard", "ChainProblem", "ChainSplit", "CodeCompatConfig", "DDPOConfig", "ESTIMATORS",
    "Estimate", "EstimatorNotes", "Gradients", "EstimatorSpec", "FullBPConfig", "JSampler", "RLRConfig", "RecomputationMismatch",
    "RewardOutputError", "TruncatedBPConfig", "ZOConfig", "ZO_MODES", "code_compat_estimate", "compute_advantages",
    "ddpo_estimate", "ddpo_update", "describe_estimator", "evaluate_reward", "full_bp_estimate", "get_estimator", "rlr_estimate",
    "split_chain", "truncated_bp_estimate", "zo_estimate",
]
