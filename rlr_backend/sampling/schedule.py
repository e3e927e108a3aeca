"""Chain kinds: the ``Schedule`` protocol every sampler and estimator term runs on, and the DDIM/DDPM kind.

A schedule is a chain's per-step constants plus its kind's step function: ``schedule.step(k, model_output,
x, noise)`` returns step k's ``StepOutput`` (next latent, mean, std, log-probability). The sampling loop
and every estimator term call it, and nothing else writes a step, so a new kind of chain
is a new schedule class with its step function and test; the samplers, estimators and
trainer are unchanged. ``DDIMSchedule`` is the discrete DDIM/DDPM chain (timesteps, cumulative alphas,
eta); ``FlowSchedule`` (``flow.py``) the flow-matching chain (sigmas, step kind, per-step eta, an SDE window).
A step whose ``stds`` entry is 0 is deterministic: no likelihood ratio is taken there, and an estimator that
would need one refuses the chain (DDPO can skip such steps instead; docs/estimators.md, "Flow-matching chains").

Index conventions used across the project (see docs/estimators.md):

* **sampler order** ``k = 0 .. T-1``: ``k = 0`` is the first (noisiest) step, ``k = T-1`` the
  last step, which produces ``x_0``. Code indexes trajectories this way.
* **paper order** ``t = T .. 1`` (Ren et al. 2025): step ``t`` maps ``x_t -> x_{t-1}``; ``t = 1``
  is the last step. ``t = T - k``. User-facing RLR knobs (``j``, ``ho_range``) use paper order,
  as the paper and its spec do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

from .ddim import ddim_step, predicted_x0_and_eps
from .step import StepOutput

PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "sample")


def paper_to_sampler(t: int, num_steps: int) -> int:
    """Paper step t (T..1, 1 = last) -> sampler index k (0..T-1, T-1 = last)."""
    if not 1 <= t <= num_steps:
        raise ValueError(f"paper step t={t} is outside 1..{num_steps}")
    return num_steps - t


def sampler_to_paper(k: int, num_steps: int) -> int:
    """Sampler index k (0..T-1) -> paper step t (T..1)."""
    if not 0 <= k < num_steps:
        raise ValueError(f"sampler index k={k} is outside 0..{num_steps - 1}")
    return num_steps - k


@runtime_checkable
class Schedule(Protocol):
    """What a sampler and the estimator terms need from a chain kind."""

    #: the model's time input at each step (sampler order), passed to the ``Denoiser``
    timesteps: tuple

    @property
    def num_steps(self) -> int: ...

    @property
    def stds(self) -> Tensor:
        """(T,) float64 standard deviation of each step's Gaussian transition (0: a deterministic step)."""
        ...

    def step(self, k: int, model_output: Tensor, sample: Tensor, noise: Tensor | None) -> StepOutput:
        """Step k from ``sample`` given the model's output there (``noise`` None: the mean only)."""
        ...

    def predicted_x0(self, k: int, model_output: Tensor, sample: Tensor) -> Tensor:
        """The model's estimate of x_0 from ``sample`` at step k (E[x_0 | x_k] for a perfect model)."""
        ...


@dataclass(frozen=True)
class DDIMSchedule:
    """Per-step constants of a DDIM chain with stochasticity ``eta`` (eta = 1 is DDPM's posterior).

    ``alpha_t[k]`` / ``alpha_prev[k]`` are the cumulative products ``abar`` at the step's input and
    output timestep; ``sigma[k] = eta_k * sqrt((1-abar_prev)/(1-abar_t) * (1 - abar_t/abar_prev))``
    (DDIM paper eq. 16). ``etas`` may differ per step (e.g. the official RLR code's eta = 0 on the
    last step).
    """

    timesteps: tuple[int, ...]
    alpha_t: torch.Tensor  # (T,) float64
    alpha_prev: torch.Tensor  # (T,) float64
    etas: tuple[float, ...]
    prediction_type: str = "epsilon"
    clip_sample_range: float | None = None

    def __post_init__(self) -> None:
        n = len(self.timesteps)
        if n < 1:
            raise ValueError("a schedule needs at least one step")
        if self.alpha_t.shape != (n,) or self.alpha_prev.shape != (n,) or len(self.etas) != n:
            raise ValueError("timesteps, alpha_t, alpha_prev and etas must all have one entry per step")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"unknown prediction_type {self.prediction_type!r}; choose one of {list(PREDICTION_TYPES)}"
            )
        if any(e < 0 or not math.isfinite(e) for e in self.etas):
            raise ValueError(f"eta must be finite and >= 0, got {self.etas}")

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def sigma(self) -> torch.Tensor:
        """(T,) float64 standard deviation of each step's Gaussian transition."""
        var = (1 - self.alpha_prev) / (1 - self.alpha_t) * (1 - self.alpha_t / self.alpha_prev)
        return torch.tensor(self.etas, dtype=torch.float64) * var.clamp_min(0).sqrt()

    @property
    def stds(self) -> torch.Tensor:
        """The ``Schedule`` name of ``sigma``."""
        return self.sigma

    def step(self, k: int, model_output: Tensor, sample: Tensor, noise: Tensor | None) -> StepOutput:
        """DDIM step k (``ddim_step`` with this schedule's coefficients)."""
        return ddim_step(model_output, sample, float(self.alpha_t[k]), float(self.alpha_prev[k]), float(self.sigma[k]),
                         noise, self.prediction_type, self.clip_sample_range)

    def predicted_x0(self, k: int, model_output: Tensor, sample: Tensor) -> Tensor:
        return predicted_x0_and_eps(model_output, sample, float(self.alpha_t[k]), self.prediction_type,
                                    self.clip_sample_range)[0]

    def with_eta(self, eta: float | Sequence[float]) -> "DDIMSchedule":
        """The same chain with another eta (a scalar, or one value per step)."""
        etas = (float(eta),) * self.num_steps if isinstance(eta, (int, float)) else tuple(map(float, eta))
        return DDIMSchedule(self.timesteps, self.alpha_t, self.alpha_prev, etas, self.prediction_type,
                            self.clip_sample_range)

    @classmethod
    def from_alphas_cumprod(
        cls,
        alphas_cumprod: torch.Tensor,
        num_steps: int,
        *,
        eta: float | Sequence[float] = 1.0,
        prediction_type: str = "epsilon",
        steps_offset: int = 1,
        final_alpha_cumprod: float | None = None,
        clip_sample_range: float | None = None,
    ) -> "DDIMSchedule":
        """``leading`` spacing as Stable Diffusion's DDIMScheduler: t_k = (N/T)*(T-1-k) + offset."""
        n_train = alphas_cumprod.shape[0]
        if not 1 <= num_steps <= n_train:
            raise ValueError(f"num_steps must be in 1..{n_train}, got {num_steps}")
        ac = alphas_cumprod.to(torch.float64)
        ratio = n_train // num_steps
        ts = [(num_steps - 1 - k) * ratio + steps_offset for k in range(num_steps)]
        final = float(ac[0]) if final_alpha_cumprod is None else float(final_alpha_cumprod)
        prev = [t - ratio for t in ts]
        alpha_t = ac[torch.tensor(ts)]
        alpha_prev = torch.tensor([float(ac[p]) if p >= 0 else final for p in prev], dtype=torch.float64)
        etas = (float(eta),) * num_steps if isinstance(eta, (int, float)) else tuple(map(float, eta))
        return cls(tuple(ts), alpha_t, alpha_prev, etas, prediction_type, clip_sample_range)

    @classmethod
    def from_diffusers(cls, scheduler, num_steps: int, *, eta: float | Sequence[float] = 1.0) -> "DDIMSchedule":
        """Build from a diffusers DDIMScheduler/DDPMScheduler (its config and alphas_cumprod)."""
        cfg = scheduler.config
        spacing = getattr(cfg, "timestep_spacing", "leading")
        if spacing != "leading":
            raise ValueError(f"only 'leading' timestep spacing is supported, the scheduler uses {spacing!r}")
        final = 1.0 if getattr(cfg, "set_alpha_to_one", False) else None
        clip = cfg.clip_sample_range if getattr(cfg, "clip_sample", False) else None
        return cls.from_alphas_cumprod(
            scheduler.alphas_cumprod, num_steps, eta=eta, prediction_type=cfg.prediction_type,
            steps_offset=getattr(cfg, "steps_offset", 0), final_alpha_cumprod=final, clip_sample_range=clip,
        )
