"""Where the reward gradient lives along the chain: each step's share of the full-backprop gradient.

The pathwise (full backprop) gradient of R(x_0) is a sum over sampler steps of the contribution of
theta's use at that step,

    g_k = (dR/dx_{k+1})^T  d mu_k(x_k; theta) / d theta      (x_k and the noise eps_k held fixed),

and every backprop estimator is a partial sum of these shares: full backprop all of them, truncated
backprop (AlignProp/DRaFT-K) the last K, RLR's first-order term its last ``fo_steps``. The shares are
computed here by an adjoint pass that recomputes one step at a time (no graph of the whole chain is
kept, so memory stays flat in T): sample without grad, take a = dR/dx_0 through the decoder and the
reward, then for k = T-1 .. 0 recompute mu_k from the stored x_k and backpropagate a through it,
which gives g_k and the next a = dR/dx_k. Cost: T no-grad forwards + T forward/backward passes, the
same as checkpointed full backprop.

``per_step_gradients`` is what the truncation-bias map (benchmarks/bias_map.py) and ``rlr-advise``
measure; its sum equals ``full_bp_estimate`` on the same noises (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..sampling import model_step, sample_chain
from .problem import ChainProblem, evaluate_reward


@dataclass
class StepShares:
    """Per-step gradient shares of one batch (ascent directions of the batch-mean reward)."""

    shares: Tensor  # (T, D): row k is g_k for sampler step k (0 = noisiest), parameters flattened
    rewards: Tensor  # (B,) rewards of the batch (NaN where the reward failed)

    def full(self) -> Tensor:
        """Full backprop's gradient (D,)."""
        return self.shares.sum(0)

    def last(self, k: int) -> Tensor:
        """Truncated backprop through the last ``k`` sampler steps (D,)."""
        return self.shares[-k:].sum(0)

    def step_norms(self) -> Tensor:
        """(T,) norm of each step's share."""
        return self.shares.norm(dim=1)


def flat(tensors) -> Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def per_step_gradients(problem: ChainProblem, x_T: Tensor, *, generator: torch.Generator | None = None) -> StepShares:
    """The T per-step shares of the full-backprop gradient of the mean reward, for the batch from ``x_T``."""
    if not problem.reward_differentiable:
        raise ValueError("per-step gradient shares need a differentiable reward (they are backprop's)")
    params = list(problem.params)
    n = problem.num_steps
    with torch.no_grad():
        traj = sample_chain(problem.model, problem.schedule, problem.prompts, x_T, generator=generator)
    x0 = traj.latents[n].detach().requires_grad_()
    rewards, valid = evaluate_reward(problem, x0)
    count = max(int(valid.sum()), 1)
    objective = torch.where(valid, rewards, torch.zeros_like(rewards)).sum() / count
    (adj,) = torch.autograd.grad(objective, x0) if objective.requires_grad else (torch.zeros_like(x0),)
    shares = torch.zeros(n, sum(p.numel() for p in params), dtype=params[0].dtype)
    for k in reversed(range(n)):
        x = traj.latents[k].detach().requires_grad_()
        with torch.enable_grad():
            mean = model_step(problem.model, problem.schedule, problem.prompts, k, x, None).mean
            grads = torch.autograd.grad(mean, [x, *params], grad_outputs=adj, allow_unused=True)
        adj = grads[0]
        shares[k] = flat(g if g is not None else torch.zeros_like(p) for g, p in zip(grads[1:], params))
    return StepShares(shares, rewards.detach())


def cosine(a: Tensor, b: Tensor) -> float:
    denom = float(a.norm() * b.norm())
    return float(a @ b) / denom if denom > 0 else float("nan")


def _jackknife(a: Tensor, b: Tensor, stat) -> tuple[float, float]:
    """stat(mean a_i, mean b_i) over paired rows (n, D), and its jackknife standard error."""
    n = a.shape[0]
    value = stat(a.mean(0), b.mean(0))
    if n < 3:
        return value, float("nan")
    sa, sb = a.sum(0), b.sum(0)
    loo = torch.tensor([stat((sa - a[i]) / (n - 1), (sb - b[i]) / (n - 1)) for i in range(n)], dtype=torch.float64)
    return value, float(((n - 1) / n * ((loo - loo.mean()) ** 2).sum()).sqrt())


def cosine_with_se(a: Tensor, b: Tensor) -> tuple[float, float]:
    """cos(mean a_i, mean b_i) of paired per-batch gradients (n, D), with a jackknife standard error."""
    return _jackknife(a, b, cosine)


def norm_ratio_with_se(a: Tensor, b: Tensor) -> tuple[float, float]:
    """|mean a_i| / |mean b_i| of paired per-batch gradients (n, D), with a jackknife standard error."""
    return _jackknife(a, b, lambda x, y: float(x.norm() / y.norm()) if float(y.norm()) > 0 else float("nan"))


def projection_with_se(a: Tensor, b: Tensor) -> tuple[float, float]:
    """(mean a_i . mean b_i) / |mean b_i|^2: the share of b's mean gradient that a's mean recovers along b's
    direction (1 for an unbiased estimator of b, whatever its noise), with a jackknife standard error."""
    return _jackknife(a, b, lambda x, y: float(x @ y) / float(y @ y) if float(y @ y) > 0 else float("nan"))
