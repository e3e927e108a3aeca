"""One DDIM step with its Gaussian mean, standard deviation and log-probability.

Follows ``diffusers.DDIMScheduler.step`` (DDIM paper, Song et al. 2020, eq. 12):

    x0_hat    = (x_t - sqrt(1-abar_t) eps_hat) / sqrt(abar_t)            "predicted x_0"
    sigma_t   = eta sqrt((1-abar_prev)/(1-abar_t)) sqrt(1-abar_t/abar_prev)   eq. 16
    mu_t      = sqrt(abar_prev) x0_hat + sqrt(1-abar_prev-sigma_t^2) eps_hat  "direction to x_t"
    x_{t-1}   = mu_t + sigma_t eps_t,  eps_t ~ N(0, I)

With eta = 1 this is DDPM's posterior q(x_{t-1} | x_t, x0_hat) ("fixed_small" variance).
The log-probability is **summed** over all non-batch elements (trl and ddpo-pytorch take the mean,
which scales every likelihood-ratio gradient by 1/D).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class StepOutput:
    prev_sample: Tensor  # x_{t-1}
    mean: Tensor  # mu_t, carries the graph when the model output does
    std: float  # sigma_t
    log_prob: Tensor  # (B,) log p(x_{t-1} | x_t), summed over elements; 0 where std == 0


def predicted_x0_and_eps(model_output: Tensor, sample: Tensor, alpha_t: float, prediction_type: str,
                         clip_sample_range: float | None = None) -> tuple[Tensor, Tensor]:
    """(x0_hat, eps_hat) from the model output for epsilon-, v- or sample-prediction."""
    a, b = math.sqrt(alpha_t), math.sqrt(1 - alpha_t)
    if prediction_type == "epsilon":
        x0, eps = (sample - b * model_output) / a, model_output
    elif prediction_type == "v_prediction":
        x0, eps = a * sample - b * model_output, a * model_output + b * sample
    elif prediction_type == "sample":
        x0, eps = model_output, (sample - a * model_output) / b
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}")
    if clip_sample_range is not None:
        x0 = x0.clamp(-clip_sample_range, clip_sample_range)
    return x0, eps


def ddim_mean(model_output: Tensor, sample: Tensor, alpha_t: float, alpha_prev: float, std: float,
              prediction_type: str = "epsilon", clip_sample_range: float | None = None) -> Tensor:
    """mu_t: the deterministic part of the DDIM step (differentiable in model_output and sample)."""
    x0, eps = predicted_x0_and_eps(model_output, sample, alpha_t, prediction_type, clip_sample_range)
    return math.sqrt(alpha_prev) * x0 + math.sqrt(max(1 - alpha_prev - std**2, 0.0)) * eps


def gaussian_log_prob(x: Tensor, mean: Tensor, std: float) -> Tensor:
    """log N(x; mean, std^2 I) summed over non-batch dims -> (B,). Returns zeros when std == 0."""
    if std <= 0:
        return torch.zeros(x.shape[0], dtype=mean.dtype, device=mean.device)
    d = x[0].numel()
    sq = ((x.detach() - mean) ** 2).flatten(1).sum(1)
    return -sq / (2 * std**2) - d * (math.log(std) + 0.5 * math.log(2 * math.pi))


def ddim_step(model_output: Tensor, sample: Tensor, alpha_t: float, alpha_prev: float, std: float,
              noise: Tensor | None, prediction_type: str = "epsilon",
              clip_sample_range: float | None = None) -> StepOutput:
    """x_{t-1} = mu_t + std * noise, with its mean and log-probability."""
    mean = ddim_mean(model_output, sample, alpha_t, alpha_prev, std, prediction_type, clip_sample_range)
    prev = mean if std == 0 or noise is None else mean + std * noise
    return StepOutput(prev, mean, std, gaussian_log_prob(prev, mean, std))
