"""The DDIM step function: model output + the step's coefficients + a noise -> the next latent.

Follows ``diffusers.DDIMScheduler.step`` (DDIM paper, Song et al. 2020, eq. 12):

    x0_hat    = (x_t - sqrt(1-abar_t) eps_hat) / sqrt(abar_t)            "predicted x_0"
    sigma_t   = eta sqrt((1-abar_prev)/(1-abar_t)) sqrt(1-abar_t/abar_prev)   eq. 16
    mu_t      = sqrt(abar_prev) x0_hat + sqrt(1-abar_prev-sigma_t^2) eps_hat  "direction to x_t"
    x_{t-1}   = mu_t + sigma_t eps_t,  eps_t ~ N(0, I)

With eta = 1 this is DDPM's posterior q(x_{t-1} | x_t, x0_hat) ("fixed_small" variance). The
coefficients of step k come from a ``DDIMSchedule`` (``schedule.py``), whose ``step`` calls this.
"""

from __future__ import annotations

import math

from torch import Tensor

from .step import StepOutput, gaussian_step


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


def ddim_step(model_output: Tensor, sample: Tensor, alpha_t: float, alpha_prev: float, std: float,
              noise: Tensor | None, prediction_type: str = "epsilon",
              clip_sample_range: float | None = None) -> StepOutput:
    """x_{t-1} = mu_t + std * noise, with its mean, std and log-probability."""
    mean = ddim_mean(model_output, sample, alpha_t, alpha_prev, std, prediction_type, clip_sample_range)
    return gaussian_step(mean, std, noise)
