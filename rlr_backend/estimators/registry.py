"""One table of every estimator: its config class, its function, and the facts a user chooses by.

Every estimator function has the signature of ``EstimatorFn``; the state a run carries across batches
(the baseline's running means, the j sampler's statistics) is passed to each, which reads what it uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from ..choices import ESTIMATOR_NAMES
from .advantages import BaselineState
from .backprop import FullBPConfig, TruncatedBPConfig, full_bp_estimate, truncated_bp_estimate
from .code_compat import CodeCompatConfig, code_compat_estimate
from .config import EstimatorConfig
from .likelihood_ratio import DDPOConfig, ZOConfig, ddpo_estimate, zo_estimate
from .partition import JSampler
from .problem import ChainProblem, Estimate
from .rlr import RLRConfig, rlr_estimate


class EstimatorFn(Protocol):
    def __call__(self, problem: ChainProblem, x_T: Tensor, *, config: EstimatorConfig,
                 generator: torch.Generator | None = None, baseline_state: BaselineState | None = None,
                 j_sampler: JSampler | None = None) -> Estimate:
        """One gradient estimate for the batch from ``x_T``, added to the parameters' ``.grad``."""
        ...


@dataclass(frozen=True)
class EstimatorSpec:
    config_cls: type[EstimatorConfig]
    fn: EstimatorFn
    unbiased: bool
    needs_differentiable_reward: bool
    summary: str


ESTIMATORS: dict[str, EstimatorSpec] = {
    "rlr": EstimatorSpec(RLRConfig, rlr_estimate, True, False,
                         "RLR: first-order last step + half-order sub-chain + zeroth-order rest (paper)"),
    "code_compat": EstimatorSpec(CodeCompatConfig, code_compat_estimate, False, True,
                                 "what the official RLR code computes (biased; for comparison)"),
    "ddpo": EstimatorSpec(DDPOConfig, ddpo_estimate, True, False,
                          "DDPO: PPO-clipped likelihood ratio on every step (unbiased at ratio 1 with sums)"),
    "truncated_bp": EstimatorSpec(TruncatedBPConfig, truncated_bp_estimate, False, True,
                                  "AlignProp/DRaFT-K: backprop through the last K steps (biased)"),
    "full_bp": EstimatorSpec(FullBPConfig, full_bp_estimate, True, True,
                             "backprop through the whole chain (memory grows with T)"),
    "zo": EstimatorSpec(ZOConfig, zo_estimate, True, False,
                        "pure likelihood ratio (REINFORCE) on every step"),
}

assert sorted(ESTIMATORS) == sorted(ESTIMATOR_NAMES), "choices.ESTIMATOR_NAMES and ESTIMATORS disagree"


def get_estimator(name: str) -> EstimatorSpec:
    try:
        return ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown estimator {name!r}; choose one of {sorted(ESTIMATORS)}") from None
