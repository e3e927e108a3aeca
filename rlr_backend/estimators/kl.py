"""A guard against reward hacking: the KL divergence of the trained model's chain to the base model's.

Both samplers are Gaussian steps with the same sigma_k, so along a sampled trajectory

    KL(p_theta(.|x_k) || p_base(.|x_k)) = |mu_theta(x_k) - mu_base(x_k)|^2 / (2 sigma_k^2)      (per step, summed
                                                                                                over elements)

and the chain's KL is the expectation of its sum over k. Because sigma_k shrinks towards the end of the
chain, the last steps carry most of it (the per-step KL scales like 1 / sigma_k^2), so ``kl_to_base``
draws ``m`` steps with probability p_k proportional to 1 / sigma_k^2 (with replacement) and averages
KL_k / p_k: an unbiased estimate of the whole chain's KL for any m, with far less noise than uniform
draws (uniform 2-step draws spread over 3 orders of magnitude on the default model). It backpropagates
``weight`` times that estimate into the trainable parameters. The base model's mean is the same model
with the LoRA set to 0 (no second copy of the weights). The trajectory is the one the estimator sampled
(its latents are detached), so the gradient is the pathwise gradient of the KL at fixed states, the usual
regulariser of DPOK / Flow-GRPO.

Deterministic steps (std 0: a flow chain's ODE steps outside its SDE window, ``cps``'s last step) have no
Gaussian transition, so no KL: the guard covers the stochastic steps only (p_k = 0 at the others), as
Flow-GRPO's KL covers its SDE window. A chain with no stochastic step at all is refused.

Cost per step: one no-grad forward (base), one forward and one backward (LoRA).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..sampling import Trajectory, model_step
from .perturbation import zeroed
from .problem import ChainProblem


def step_probabilities(sigma: Sequence[float]) -> torch.Tensor:
    """p_k proportional to 1 / sigma_k^2 over the chain's stochastic steps, 0 at deterministic ones (sigma 0)."""
    sig = torch.as_tensor(list(sigma), dtype=torch.float64)
    if not bool((sig > 0).any()):
        raise ValueError("the KL guard needs a stochastic step, but every sampler step is deterministic; "
                         "set eta > 0 (flow models: flow_eta > 0 and an SDE window of size >= 1)")
    w = torch.where(sig > 0, sig.clamp_min(1e-300).pow(-2), torch.zeros_like(sig))
    return w / w.sum()


def draw_steps(sigma: Sequence[float], m: int, generator: torch.Generator | None) -> list[int]:
    """``m`` steps drawn with probability ``step_probabilities(sigma)``, with replacement."""
    return torch.multinomial(step_probabilities(sigma), m, replacement=True, generator=generator).tolist()


def kl_to_base(problem: ChainProblem, traj: Trajectory, steps: Sequence[int], weight: float,
               metrics: dict[str, float]) -> float:
    """Backpropagate weight * (1/m) sum_i mean_b KL_{k_i} / p_{k_i} over the drawn ``steps`` (from
    ``draw_steps``); return that estimate of the chain's KL."""
    params, grads = list(problem.params), problem.gradients(metrics)
    stds = problem.schedule.stds
    probs = step_probabilities(stds)
    total = 0.0
    for k in steps:
        sigma = float(stds[k])
        scale = 1.0 / (len(steps) * float(probs[k]))
        x = traj.latents[k]
        with torch.no_grad(), zeroed(params):
            base = model_step(problem.model, problem.schedule, problem.prompts, k, x, None).mean
        mean = model_step(problem.model, problem.schedule, problem.prompts, k, x, None).mean
        kl = ((mean - base) ** 2).flatten(1).sum(1) / (2 * sigma**2)
        grads.add_loss(weight * scale * kl.mean(), "kl")
        total += scale * float(kl.detach().mean())
    metrics["model_calls"] = metrics.get("model_calls", 0.0) + 2 * len(steps)
    metrics["model_calls_with_grad"] = metrics.get("model_calls_with_grad", 0.0) + len(steps)
    return total
