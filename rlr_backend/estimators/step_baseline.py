"""A per-step baseline for the likelihood-ratio terms: the reward of the model's own x_0 estimate at the
step's input.

A likelihood-ratio term at step k weighs the score of that step's noise, (d mu_k / d theta)^T eps_k / sigma_k,
by an advantage A. Any baseline that depends only on what was drawn before eps_k (the step's input x_k, the
other samples of the batch) keeps the term unbiased, since E[eps_k | x_k] = 0. The reward of the model's
estimate x0_hat(x_k) is such a baseline, and it tracks the final reward closely: most of a sample's reward is
decided by the noise drawn *before* step k, which the score of eps_k cannot explain and a batch baseline
cannot remove. So the advantage at step k is

    A_k = (R - R(x0_hat(x_k))) - leave-one-out mean of the others' (R - R(x0_hat(x_k)))

(the batch's baseline kind over the residuals). The sampler records x0_hat at every step, so the baseline
costs no model call: one decode + reward of the batch per likelihood-ratio step, without grad. A row whose
baseline reward is not finite keeps b = 0 (still unbiased); a row whose reward is not finite keeps A = 0.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..sampling import Trajectory
from .problem import ChainProblem, batch_advantages, evaluate_reward

#: the baseline kinds the residuals can take (no state carried across batches, no normalisation)
STEP_BASELINE_KINDS: tuple[str, ...] = ("loo", "none")


def step_advantages(problem: ChainProblem, traj: Trajectory, rewards: Tensor, steps: Sequence[int], kind: str,
                    clip: float | None = None) -> tuple[dict[int, Tensor], int]:
    """({step k: this shard's advantages A_k}, number of rows whose baseline reward was not finite)."""
    if len(traj.x0_hats) != traj.num_steps:
        raise ValueError("the trajectory has no x_0 estimates (sample it with sample_chain)")
    out: dict[int, Tensor] = {}
    failed = 0
    with torch.no_grad():
        for k in sorted(set(steps)):
            b, ok = evaluate_reward(problem, traj.x0_hats[k])
            failed += int((~ok).sum())
            residual = rewards.detach() - torch.where(ok, b.detach(), torch.zeros_like(b)).to(rewards.dtype)
            out[k] = batch_advantages(problem, residual, kind, clip=clip)[0]
    return out, failed
