"""A guard against reward hacking: the KL divergence of the trained model's chain to the base model's.

Both samplers are Gaussian steps with the same sigma_k, so along a sampled trajectory

    KL(p_theta(.|x_k) || p_base(.|x_k)) = |mu_theta(x_k) - mu_base(x_k)|^2 / (2 sigma_k^2)      (per step, summed
                                                                                                over elements)

and the chain's KL is the expectation of its sum over k. ``kl_to_base`` estimates that sum from
``len(steps)`` steps drawn uniformly without replacement, scaled by T / len(steps) (an unbiased estimate
for any number of steps), and backpropagates ``weight`` times it into ``.grad``. The base model's mean
is the same model with the LoRA set to 0 (no second copy of the weights). The trajectory is the one the
estimator sampled (its latents are detached), so the gradient is the pathwise gradient of the KL at
fixed states, the usual regulariser of DPOK / Flow-GRPO.

Cost per step: one no-grad forward (base), one forward and one backward (LoRA).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..sampling import Trajectory, step_mean
from .perturbation import zeroed
from .problem import ChainProblem, backward_if_finite


def kl_to_base(problem: ChainProblem, traj: Trajectory, steps: Sequence[int], weight: float,
               metrics: dict[str, float]) -> float:
    """Backpropagate weight * (T/m) * mean_b sum_{k in steps} KL_k; return the chain KL estimate (T/m) * sum."""
    n, params = problem.num_steps, list(problem.params)
    scale = n / len(steps)
    total = 0.0
    for k in steps:
        sigma = float(problem.schedule.sigma[k])
        if sigma <= 0:
            raise ValueError(f"the KL guard needs sigma > 0, but sampler step {k} is deterministic; set eta > 0")
        x = traj.latents[k]
        with torch.no_grad(), zeroed(params):
            base, _ = step_mean(problem.model, problem.schedule, problem.prompts, k, x)
        mean, _ = step_mean(problem.model, problem.schedule, problem.prompts, k, x)
        kl = ((mean - base) ** 2).flatten(1).sum(1) / (2 * sigma**2)
        backward_if_finite(weight * scale * kl.mean(), metrics, "kl")
        total += scale * float(kl.detach().mean())
    metrics["model_calls"] = metrics.get("model_calls", 0.0) + 2 * len(steps)
    metrics["model_calls_with_grad"] = metrics.get("model_calls_with_grad", 0.0) + len(steps)
    return total
