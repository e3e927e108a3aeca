"""The per-step surrogate losses every estimator is built from. Pure tensor functions.

Each returns a scalar whose gradient is minus a batch-mean estimate of a share of grad E[R]:

* ``first_order_loss``: pathwise (reparameterised) term, -mean R(x_0(theta)).
* ``likelihood_ratio_loss``: score-function term for one Gaussian step,
  -mean_b A_b <mu_theta, (x_prev - mu)/sigma^2>, whose gradient is -mean A (dmu/dtheta)^T eps/sigma.
  It is also the half-order term when ``mean`` carries the graph of a recomputed sub-chain.
* ``ppo_loss``: DDPO's clipped surrogate on log-probability ratios.
"""

from __future__ import annotations

import torch
from torch import Tensor


def first_order_loss(rewards: Tensor, valid: Tensor | None = None) -> Tensor:
    """-mean over valid samples of differentiable rewards (B,)."""
    if valid is None:
        return -rewards.mean()
    n = max(int(valid.sum()), 1)
    return -torch.where(valid, rewards, torch.zeros_like(rewards)).sum() / n


def likelihood_ratio_loss(mean: Tensor, x_prev: Tensor, std: float, advantages: Tensor) -> Tensor:
    """-mean_b A_b * sum_elements(mean * (x_prev - mean.detach()) / std^2); needs std > 0."""
    if std <= 0:
        raise ValueError("a likelihood-ratio term needs a stochastic step (sigma > 0); use eta > 0")
    score = (x_prev.detach() - mean.detach()) / std**2
    per_sample = (score * mean).flatten(1).sum(1)
    return -(advantages.detach().to(per_sample.dtype) * per_sample).mean()


def ppo_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float) -> tuple[Tensor, dict]:
    """ddpo-pytorch's surrogate: mean(max(-A r, -A clip(r, 1-eps, 1+eps))), r = exp(logp - logp_old).

    The log-ratio is clamped to +-20 as in the official RLR code, so a numerically absurd ratio
    cannot overflow. Returns the loss and (approx_kl, clipfrac).
    """
    log_ratio = (log_prob - old_log_prob.detach()).clamp(-20, 20)
    ratio = torch.exp(log_ratio)
    adv = advantages.detach().to(ratio.dtype)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    stats = {
        "approx_kl": float(0.5 * (log_ratio.detach() ** 2).mean()),
        "clipfrac": float(((ratio.detach() - 1).abs() > clip_range).float().mean()),
    }
    return loss, stats
