"""The per-step surrogate losses every estimator is built from. Pure tensor functions.

Each returns a scalar whose gradient is minus a batch-mean estimate of a share of grad E[R]. The mean
is over the rows of the batch (a row whose reward failed adds 0) times ``scale``; estimators pass
``scale`` = B / (number of valid rows) (``problem.valid_row_scale``), so every term is the same mean
over the valid rows and the terms keep their relative weights when some rewards are NaN:

* ``first_order_loss``: pathwise (reparameterised) term, -mean R(x_0(theta)).
* ``likelihood_ratio_loss``: score-function term for one Gaussian step,
  -mean_b A_b <mu_theta, (x_prev - mu)/sigma^2>, whose gradient is -mean A (dmu/dtheta)^T eps/sigma.
  It is also the half-order term when ``mean`` carries the graph of a recomputed sub-chain.
* ``ppo_loss``: DDPO's clipped surrogate on log-probability ratios.
"""

from __future__ import annotations

import torch
from torch import Tensor


def first_order_loss(rewards: Tensor, valid: Tensor | None = None, scale: float = 1.0) -> Tensor:
    """-scale * mean_b of differentiable rewards (B,), rows outside ``valid`` counted as 0."""
    if valid is not None:
        rewards = torch.where(valid, rewards, torch.zeros_like(rewards))
    return -scale * rewards.mean()


def likelihood_ratio_loss(mean: Tensor, x_prev: Tensor, std: float, advantages: Tensor, scale: float = 1.0) -> Tensor:
    """-scale * mean_b A_b * sum_elements(mean * (x_prev - mean.detach()) / std^2); needs std > 0."""
    if std <= 0:
        raise ValueError("a likelihood-ratio term needs a stochastic step (sigma > 0); use eta > 0")
    score = (x_prev.detach() - mean.detach()) / std**2
    per_sample = (score * mean).flatten(1).sum(1)
    return -scale * (advantages.detach().to(per_sample.dtype) * per_sample).mean()


def ppo_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float,
             scale: float = 1.0) -> tuple[Tensor, dict]:
    """ddpo-pytorch's surrogate: scale * mean(max(-A r, -A clip(r, 1-eps, 1+eps))), r = exp(logp - logp_old).

    The log-ratio is clamped to +-20 as in the official RLR code, so a numerically absurd ratio
    cannot overflow. Returns the loss and (approx_kl, clipfrac).
    """
    log_ratio = (log_prob - old_log_prob.detach()).clamp(-20, 20)
    ratio = torch.exp(log_ratio)
    adv = advantages.detach().to(ratio.dtype)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = scale * torch.maximum(unclipped, clipped).mean()
    stats = {
        "approx_kl": float(0.5 * (log_ratio.detach() ** 2).mean()),
        "clipfrac": float(((ratio.detach() - 1).abs() > clip_range).float().mean()),
    }
    return loss, stats
