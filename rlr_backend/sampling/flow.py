"""One flow-matching (rectified flow) step with its Gaussian mean, standard deviation and log-probability.

Rectified flow as diffusers' ``FlowMatchEulerDiscreteScheduler`` has it (shared/reference/flow-matching.md §1):
x_sigma = (1 - sigma) x_0 + sigma eps, the model predicts the velocity v = eps - x_0, so

    x0_hat = x - sigma v,     eps_hat = x + (1 - sigma) v,     score = -eps_hat / sigma.

The deterministic sampler is the Euler step of the ODE, x' = x + (sigma' - sigma) v (``ode``). A policy
gradient needs a stochastic step with a Gaussian log-probability; three conversions are in use, each a
step ``x' = mean + std * noise`` (Delta = sigma' - sigma < 0):

=============  ==========================================================================  ======================
kind           mean                                                                         std
=============  ==========================================================================  ======================
``flow_sde``   x + Delta [v + s^2/(2 sigma) eps_hat],  s = eta sqrt(sigma / (1 - sigma~))    s sqrt(-Delta)
               (Flow-GRPO, arXiv 2505.05470; sigma~ = sigma except at sigma = 1, where the
               next sigma is used, avoiding 1/0)
``dance_sde``  x + Delta [v + eta^2/(2 sigma) eps_hat]                                      eta sqrt(-Delta)
               (DanceGRPO, arXiv 2505.07818: a constant noise scale)
``cps``        (1 - sigma') x0_hat + sqrt(sigma'^2 - s^2) eps_hat,  s = sigma' sin(eta pi/2)  s
               (coefficients-preserving sampling, arXiv 2509.05952: the noise coefficients keep
               x' at noise level sigma' exactly, as DDIM does; eta = 0 is the Euler step)
``ode``        x + Delta v                                                                  0
=============  ==========================================================================  ======================

The two SDE drifts are v - (s^2/2) score: the reverse SDE whose marginals are the ODE's (tested on a
Gaussian data distribution where v is known in closed form: both keep the marginals up to the Euler
discretisation; Flow-GRPO's is further off near sigma = 1, where its noise scale grows without bound).
CPS is a different thing: it keeps the noise coefficient of x' at sigma' exactly, but it renoises a
fixed share of the noise at every step whatever the step size, so with the model's x0_hat = E[x_0 | x]
in place of x_0 it loses spread: on that Gaussian test it ends with 60 % of the data variance at
eta = 0.8, at 25 or 100 steps alike. It is what Flow-GRPO's fast configs use; it is offered, measured
and not the default. The log-probability is **summed** over
the non-batch elements (Flow-GRPO averages it, which rescales every likelihood-ratio gradient by
1/D), as the DDIM step's is, and nothing assumes 4-D latents (video latents (B, C, F, H, W) work).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .step import StepOutput, gaussian_step

FLOW_STEP_KINDS: tuple[str, ...] = ("flow_sde", "dance_sde", "cps", "ode")


def flow_mean_std(velocity: Tensor, sample: Tensor, sigma: float, sigma_next: float, *, kind: str = "cps",
                  eta: float = 0.8, sigma_cap: float | None = None) -> tuple[Tensor, float]:
    """(mean, std) of the step sigma -> sigma_next (differentiable in ``velocity`` and ``sample``).

    ``sigma_cap`` is flow_sde's stand-in for sigma in 1 - sigma when sigma = 1 (default: sigma_next)."""
    if kind not in FLOW_STEP_KINDS:
        raise ValueError(f"unknown flow step kind {kind!r}; choose one of {list(FLOW_STEP_KINDS)}")
    if not (0 <= sigma_next < sigma <= 1):
        raise ValueError(f"a flow step goes from sigma to a smaller sigma_next in [0, 1], got {sigma} -> {sigma_next}")
    if not (eta >= 0 and math.isfinite(eta)):
        raise ValueError(f"eta must be a number >= 0, got {eta}")
    delta = sigma_next - sigma
    if kind == "ode" or eta == 0:
        return sample + delta * velocity, 0.0
    eps_hat = sample + (1 - sigma) * velocity
    if kind == "cps":
        s = sigma_next * math.sin(eta * math.pi / 2)
        x0_hat = sample - sigma * velocity
        return (1 - sigma_next) * x0_hat + math.sqrt(max(sigma_next**2 - s**2, 0.0)) * eps_hat, s
    if kind == "flow_sde":
        denom = 1 - sigma if sigma < 1 else 1 - (sigma_next if sigma_cap is None else sigma_cap)
        s = eta * math.sqrt(sigma / denom)
    else:  # dance_sde
        s = eta
    mean = sample + delta * (velocity + s**2 / (2 * sigma) * eps_hat)
    return mean, s * math.sqrt(-delta)


def flow_step(velocity: Tensor, sample: Tensor, sigma: float, sigma_next: float, noise: Tensor | None, *,
              kind: str = "cps", eta: float = 0.8, sigma_cap: float | None = None) -> StepOutput:
    """x' = mean + std * noise, with its mean, std and log-probability (zero when the step is deterministic)."""
    mean, std = flow_mean_std(velocity, sample, sigma, sigma_next, kind=kind, eta=eta, sigma_cap=sigma_cap)
    return gaussian_step(mean, std, noise)


def flow_sigmas(num_steps: int, *, shift: float = 1.0) -> Tensor:
    """(num_steps + 1,) float64: linspace(1, 1/N, N) shifted as SD3 does, sigma <- s sigma / (1 + (s - 1) sigma),
    then 0 appended (diffusers' FlowMatchEulerDiscreteScheduler with a static shift)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not (shift > 0 and math.isfinite(shift)):
        raise ValueError(f"shift must be a positive number, got {shift}")
    s = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    s = shift * s / (1 + (shift - 1) * s)
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)])
