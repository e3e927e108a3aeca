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

``FlowSchedule`` makes a chain of these steps a ``Schedule`` (what the sampler and every estimator run on):
sigmas (``flow_sigmas``, or ``from_diffusers`` for a real model's scheduler), the kind, and a per-step eta whose zeros are ODE steps (an SDE
window, MixGRPO / Flow-GRPO-Fast). The model's time input is sigma * 1000 (``FLOW_TIME_SCALE``; diffusers'
SD3 convention); model adapters convert it for models that take sigma or 1 - sigma. The estimators run on it
unchanged; tests/test_estimators_flow.py checks them against a closed-form flow chain
(``estimators/analytic_flow.py``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from .step import StepOutput, gaussian_step

FLOW_STEP_KINDS: tuple[str, ...] = ("flow_sde", "dance_sde", "cps", "ode")


def flow_noise_scale(sigma: float, sigma_next: float, *, kind: str, eta: float,
                     sigma_cap: float | None = None) -> float:
    """The noise scale s of the step sigma -> sigma_next (its std is ``flow_std``): flow_sde's
    eta sqrt(sigma / (1 - sigma~)), dance_sde's eta, cps's sigma' sin(eta pi/2); 0 for ``ode`` or eta = 0.
    Checks the step's arguments."""
    if kind not in FLOW_STEP_KINDS:
        raise ValueError(f"unknown flow step kind {kind!r}; choose one of {list(FLOW_STEP_KINDS)}")
    if not (0 <= sigma_next < sigma <= 1):
        raise ValueError(f"a flow step goes from sigma to a smaller sigma_next in [0, 1], got {sigma} -> {sigma_next}")
    if not (eta >= 0 and math.isfinite(eta)):
        raise ValueError(f"eta must be a number >= 0, got {eta}")
    if kind == "ode" or eta == 0:
        return 0.0
    if kind == "cps":
        return sigma_next * math.sin(eta * math.pi / 2)
    if kind == "flow_sde":
        denom = 1 - sigma if sigma < 1 else 1 - (sigma_next if sigma_cap is None else sigma_cap)
        return eta * math.sqrt(sigma / denom)
    return eta  # dance_sde


def flow_std(sigma: float, sigma_next: float, *, kind: str, eta: float, sigma_cap: float | None = None) -> float:
    """The standard deviation of the step sigma -> sigma_next (0: a deterministic step)."""
    s = flow_noise_scale(sigma, sigma_next, kind=kind, eta=eta, sigma_cap=sigma_cap)
    return s if kind == "cps" else s * math.sqrt(sigma - sigma_next)


def flow_mean_std(velocity: Tensor, sample: Tensor, sigma: float, sigma_next: float, *, kind: str = "cps",
                  eta: float = 0.8, sigma_cap: float | None = None) -> tuple[Tensor, float]:
    """(mean, std) of the step sigma -> sigma_next (differentiable in ``velocity`` and ``sample``).

    ``sigma_cap`` is flow_sde's stand-in for sigma in 1 - sigma when sigma = 1 (default: sigma_next)."""
    s = flow_noise_scale(sigma, sigma_next, kind=kind, eta=eta, sigma_cap=sigma_cap)
    delta = sigma_next - sigma
    if s == 0:
        return sample + delta * velocity, 0.0
    eps_hat = sample + (1 - sigma) * velocity
    if kind == "cps":
        x0_hat = sample - sigma * velocity
        return (1 - sigma_next) * x0_hat + math.sqrt(max(sigma_next**2 - s**2, 0.0)) * eps_hat, s
    mean = sample + delta * (velocity + s**2 / (2 * sigma) * eps_hat)
    return mean, s * math.sqrt(-delta)


def flow_step(velocity: Tensor, sample: Tensor, sigma: float, sigma_next: float, noise: Tensor | None, *,
              kind: str = "cps", eta: float = 0.8, sigma_cap: float | None = None) -> StepOutput:
    """x' = mean + std * noise, with its mean, std and log-probability (zero when the step is deterministic)."""
    mean, std = flow_mean_std(velocity, sample, sigma, sigma_next, kind=kind, eta=eta, sigma_cap=sigma_cap)
    return gaussian_step(mean, std, noise)


def flow_sigmas(num_steps: int, *, shift: float = 1.0) -> Tensor:
    """(num_steps + 1,) float64: linspace(1, 1/N, N) shifted as SD3 does, sigma <- s sigma / (1 + (s - 1) sigma),
    then 0 appended: diffusers' FlowMatchEulerDiscreteScheduler with a static shift given these sigmas, as the
    FLUX, Qwen-Image and Z-Image pipelines do (tested). SD3's pipeline lets the scheduler space them, which
    differs slightly; ``FlowSchedule.from_diffusers`` reproduces either."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not (shift > 0 and math.isfinite(shift)):
        raise ValueError(f"shift must be a positive number, got {shift}")
    s = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    s = shift * s / (1 + (shift - 1) * s)
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)])


#: the model's time input is sigma * FLOW_TIME_SCALE, as diffusers' FlowMatchEulerDiscreteScheduler passes it
#: to SD3 (its ``timesteps``); adapters of models that take sigma (FLUX, Qwen-Image) or 1 - sigma (Z-Image)
#: convert it (shared/reference/flow-matching.md §1, §3)
FLOW_TIME_SCALE = 1000.0


@dataclass(frozen=True)
class FlowSchedule:
    """A flow-matching chain as a ``Schedule``: sigmas, the step kind and a per-step eta.

    ``sigmas`` (T + 1,) float64 decreases from the first step's noise level to the last one's target
    (usually 0; ``flow_sigmas`` builds the SD3-style shifted grid). Step k goes sigmas[k] -> sigmas[k+1]
    with ``flow_step(kind, eta=etas[k])``. A step with eta 0 is the deterministic Euler (ODE) step: a
    window of SDE steps with ODE steps elsewhere (Flow-GRPO-Fast, MixGRPO) is ``etas`` zero outside the
    window (``with_sde_window``). Such a step has std 0, so no likelihood ratio can be taken there: the
    estimators that need one at a step refuse a chain where it is deterministic (see docs/estimators.md,
    "Flow-matching chains"); backprop runs through it like any step. The model's time input is
    ``timesteps[k] = sigmas[k] * FLOW_TIME_SCALE`` (a float) and its output the velocity v = eps - x_0.
    """

    sigmas: Tensor  # (T + 1,) float64
    kind: str = "flow_sde"
    etas: tuple[float, ...] = ()
    timesteps: tuple[float, ...] = field(init=False)

    def __post_init__(self) -> None:
        if self.kind not in FLOW_STEP_KINDS:
            raise ValueError(f"unknown flow step kind {self.kind!r}; choose one of {list(FLOW_STEP_KINDS)}")
        sig = torch.as_tensor(self.sigmas, dtype=torch.float64)
        if sig.dim() != 1 or sig.numel() < 2:
            raise ValueError(f"sigmas must be a 1-D tensor of T + 1 >= 2 noise levels, got shape {tuple(sig.shape)}")
        if not (bool((sig[1:] < sig[:-1]).all()) and float(sig[0]) <= 1 and float(sig[-1]) >= 0):
            raise ValueError(f"sigmas must decrease strictly inside [0, 1], got {sig.tolist()}")
        n = sig.numel() - 1
        if len(self.etas) != n:
            raise ValueError(f"etas needs one value per step ({n}), got {len(self.etas)}")
        if any(not (e >= 0 and math.isfinite(e)) for e in self.etas):
            raise ValueError(f"eta must be a number >= 0, got {self.etas}")
        object.__setattr__(self, "sigmas", sig)
        object.__setattr__(self, "timesteps", tuple(float(s) * FLOW_TIME_SCALE for s in sig[:-1]))
        stds = [flow_std(float(sig[k]), float(sig[k + 1]), kind=self.kind, eta=self.etas[k]) for k in range(n)]
        object.__setattr__(self, "_stds", torch.tensor(stds, dtype=torch.float64))

    @classmethod
    def create(cls, num_steps: int, *, shift: float = 1.0, kind: str = "flow_sde", eta: float = 0.7,
               sde_window: tuple[int, int] | None = None) -> "FlowSchedule":
        """``num_steps`` steps on ``flow_sigmas(num_steps, shift)`` (1 -> 0) with ``eta`` on every step, or on
        the ``sde_window = (start, size)`` steps only (sampler order; the others are ODE steps)."""
        sched = cls(flow_sigmas(num_steps, shift=shift), kind, (float(eta),) * num_steps)
        return sched if sde_window is None else sched.with_sde_window(*sde_window)

    @classmethod
    def from_diffusers(cls, scheduler, num_steps: int, *, kind: str = "flow_sde", eta: float = 0.7,
                       sde_window: tuple[int, int] | None = None, sigmas: Sequence[float] | None = None,
                       mu: float | None = None) -> "FlowSchedule":
        """The sigmas a diffusers ``FlowMatchEulerDiscreteScheduler`` samples with (its ``set_timesteps(num_steps,
        sigmas=, mu=)`` on a copy, so its shift, dynamic shift ``mu``, terminal stretch and Karras/exponential/beta
        options apply; FLUX, Qwen-Image and Z-Image pipelines pass ``sigmas = linspace(1, 1/N, N)``, SD3's
        leaves them None), with this project's step ``kind`` and ``eta``."""
        if getattr(scheduler.config, "invert_sigmas", False):
            raise ValueError("the scheduler inverts its sigmas (Mochi); only chains from noise (sigma = 1) to data "
                             "are supported")
        sched = copy.deepcopy(scheduler)
        sched.set_timesteps(None if sigmas is not None else num_steps, sigmas=sigmas, mu=mu)
        sig = sched.sigmas.detach().to("cpu", torch.float64)
        if sig.numel() != num_steps + 1:
            raise ValueError(f"the scheduler gave {sig.numel() - 1} steps, not num_steps={num_steps}")
        out = cls(sig, kind, (float(eta),) * num_steps)
        return out if sde_window is None else out.with_sde_window(*sde_window)

    @property
    def num_steps(self) -> int:
        return len(self.etas)

    @property
    def stds(self) -> Tensor:
        """(T,) float64 standard deviation of each step (0: a deterministic step)."""
        return self._stds

    @property
    def sde_steps(self) -> tuple[int, ...]:
        """Sampler indices of the stochastic steps (std > 0)."""
        return tuple(k for k in range(self.num_steps) if self._stds[k] > 0)

    def step(self, k: int, model_output: Tensor, sample: Tensor, noise: Tensor | None) -> StepOutput:
        """Flow step k from ``sample`` given the model's velocity there (``noise`` None: the mean only)."""
        return flow_step(model_output, sample, float(self.sigmas[k]), float(self.sigmas[k + 1]), noise,
                         kind=self.kind, eta=self.etas[k])

    def predicted_x0(self, k: int, model_output: Tensor, sample: Tensor) -> Tensor:
        """x0_hat = x - sigma v."""
        return sample - float(self.sigmas[k]) * model_output

    def with_eta(self, eta: float | Sequence[float]) -> "FlowSchedule":
        """The same chain with another eta (a scalar, or one value per step; 0 makes a step an ODE step)."""
        etas = (float(eta),) * self.num_steps if isinstance(eta, (int, float)) else tuple(map(float, eta))
        return FlowSchedule(self.sigmas, self.kind, etas)

    def with_sde_window(self, start: int, size: int, eta: float | None = None) -> "FlowSchedule":
        """SDE steps with ``eta`` on sampler steps start .. start+size-1, ODE steps elsewhere: MixGRPO's window,
        moved between updates by calling this again. ``eta`` None: this schedule's largest eta (the one it was
        created with)."""
        if not (size >= 1 and 0 <= start and start + size <= self.num_steps):
            raise ValueError(f"an SDE window of {size} step(s) from step {start} does not fit a chain of "
                             f"{self.num_steps} steps (sampler order, 0 = the first step)")
        eta = max(self.etas) if eta is None else float(eta)
        if not eta > 0:
            raise ValueError("an SDE window needs eta > 0 (this schedule has none to keep: pass eta=)")
        return self.with_eta([eta if start <= k < start + size else 0.0 for k in range(self.num_steps)])
