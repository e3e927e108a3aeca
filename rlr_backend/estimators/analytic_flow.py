"""A flow-matching chain whose expected-reward gradient is known in closed form: Gaussian data, exact velocity.

The flow counterpart of ``analytic_chain`` (spec §5), run through the real ``FlowSchedule`` step code, so
the estimators are tested on a flow chain through the same ``ChainProblem`` interface.

Model. The "trained" model is the exact rectified-flow velocity of a Gaussian data law x_0 ~ N(mu, tau^2 I)
with theta = (tau, mu): for x_sigma = (1 - sigma) x_0 + sigma eps,

    v(x, sigma) = E[eps - x_0 | x_sigma = x] = g (x - (1 - sigma) mu) - mu,
    g = (sigma - (1 - sigma) tau^2) / ((1 - sigma)^2 tau^2 + sigma^2),

read from the time input sigma = timestep / FLOW_TIME_SCALE as a real model would. Latents have any
shape (B, *latent_shape) (the default is video-like (B, C, F, H, W)); nothing assumes 4-D.

Closed form. v is affine in x, and so is every kind of flow step's mean: step k is
x' = a_k x + b_k(theta) + std_k eps elementwise, with a_k = mean(1) - mean(0), b_k = mean(0) computed by the
schedule's own step function at x = 0 and x = 1. So every x_k is Gaussian with a diagonal covariance, and with
per-step copies theta_k the mean m and per-element variance s^2 follow m <- a_k m + b_k, s^2 <- a_k^2 s^2 +
std_k^2. With R(x) = -1/2 |x - y|^2,

    J = E[R(x_T)] = -1/2 |m_T - y|^2 - 1/2 sum s_T^2,

and g_k = dJ/dtheta_k is this expression's derivative (autograd on an exact expression, float64): each
step's share of the gradient, so an estimator's expectation is a known sum of shares (full backprop all of
them, truncated backprop the last K, a window-only likelihood ratio the window's). The closed form is
checked against Monte Carlo and finite differences (tests/test_estimators_flow.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..sampling import PromptSchedule
from ..sampling.flow import FLOW_TIME_SCALE, FlowSchedule


def gaussian_velocity(x: Tensor, sigma: float, mu: Tensor, tau: Tensor) -> Tensor:
    """E[eps - x_0 | x_sigma = x] for x_0 ~ N(mu, tau^2 I), x_sigma = (1 - sigma) x_0 + sigma eps (exact)."""
    var = (1 - sigma) ** 2 * tau**2 + sigma**2
    g = (sigma - (1 - sigma) * tau**2) / var
    return g * (x - (1 - sigma) * mu) - mu


class GaussianFlowDenoiser(nn.Module):
    """The velocity of N(mu, tau^2 I) data at the time input sigma * FLOW_TIME_SCALE; theta = (tau, mu)."""

    def __init__(self, latent_shape: tuple[int, ...], tau: float, mu: Tensor):
        super().__init__()
        self.tau = nn.Parameter(torch.tensor(float(tau), dtype=torch.float64))
        self.mu = nn.Parameter(mu.to(torch.float64).reshape(latent_shape).clone())

    def forward(self, x: Tensor, timestep: float, cond: object = None) -> Tensor:
        return gaussian_velocity(x, float(timestep) / FLOW_TIME_SCALE, self.mu, self.tau)


@dataclass
class AnalyticFlowChain:
    """The test problem: a flow schedule, the Gaussian velocity model, the reward target y and the law of x_T.

    Offers what ``analytic_chain.collect_estimates`` reads (``schedule``, ``model``, ``params``, ``reward``,
    ``sample_x_T``, ``prompts``)."""

    schedule: FlowSchedule
    model: GaussianFlowDenoiser
    y: Tensor  # latent_shape
    m_init: Tensor  # latent_shape: the mean of x_T (0 for pure noise)
    s_init: float  # the std of x_T (1 for pure noise)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.y.shape)

    @property
    def num_steps(self) -> int:
        return self.schedule.num_steps

    @property
    def params(self) -> list[Tensor]:
        return [self.model.tau, self.model.mu]

    def reward(self, x: Tensor) -> Tensor:
        return -0.5 * ((x - self.y) ** 2).flatten(1).sum(1)

    def sample_x_T(self, batch: int, generator: torch.Generator) -> Tensor:
        noise = torch.randn(batch, *self.latent_shape, generator=generator, dtype=torch.float64)
        return self.m_init + self.s_init * noise

    def prompts(self) -> PromptSchedule:
        return PromptSchedule.constant(None, self.num_steps)

    def _moments(self, taus: Tensor, mus: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, per-element variance) of x_0 with theta_k = (taus[k], mus[k]) at step k."""
        m = self.m_init.clone()
        s2 = torch.full_like(m, self.s_init**2)
        zero, one = torch.zeros(1, *self.latent_shape, dtype=torch.float64), torch.ones(1, *self.latent_shape,
                                                                                          dtype=torch.float64)
        stds = self.schedule.stds
        for k in range(self.num_steps):
            sigma = float(self.schedule.sigmas[k])

            def mean_at(x: Tensor) -> Tensor:
                return self.schedule.step(k, gaussian_velocity(x, sigma, mus[k], taus[k]), x, None).mean[0]

            b = mean_at(zero)
            a = mean_at(one) - b
            m = a * m + b
            s2 = a**2 * s2 + float(stds[k]) ** 2
        return m, s2

    def _objective(self, taus: Tensor, mus: Tensor) -> Tensor:
        m, s2 = self._moments(taus, mus)
        return -0.5 * ((m - self.y) ** 2).sum() - 0.5 * s2.sum()

    def per_step_gradient(self) -> Tensor:
        """(T, 1 + d) exact shares g_k = dJ/dtheta_k in sampler order, (tau, mu flattened) per row."""
        n = self.num_steps
        taus = self.model.tau.detach().repeat(n).requires_grad_(True)
        mus = self.model.mu.detach().expand(n, *self.latent_shape).clone().requires_grad_(True)
        g_tau, g_mu = torch.autograd.grad(self._objective(taus, mus), [taus, mus])
        return torch.cat([g_tau[:, None], g_mu.reshape(n, -1)], dim=1)

    def expected_reward(self) -> float:
        n = self.num_steps
        with torch.no_grad():
            return float(self._objective(self.model.tau.detach().repeat(n),
                                         self.model.mu.detach().expand(n, *self.latent_shape)))


def make_analytic_flow_chain(num_steps: int = 6, *, kind: str = "flow_sde", eta: float = 0.7, shift: float = 1.0,
                             sde_window: tuple[int, int] | None = None, latent_shape: tuple[int, ...] = (1, 2, 1, 2),
                             seed: int = 0) -> AnalyticFlowChain:
    """A reproducible instance: from pure noise x_T ~ N(0, I) (sigma_0 = 1) on ``flow_sigmas(num_steps, shift)``,
    a random data mean mu, tau = 0.6 and a random reward target y."""
    g = torch.Generator().manual_seed(seed)
    d = math.prod(latent_shape)
    sched = FlowSchedule.create(num_steps, shift=shift, kind=kind, eta=eta, sde_window=sde_window)
    model = GaussianFlowDenoiser(latent_shape, 0.6, 0.5 * torch.randn(d, generator=g, dtype=torch.float64))
    y = torch.randn(d, generator=g, dtype=torch.float64).reshape(latent_shape)
    return AnalyticFlowChain(sched, model, y, torch.zeros(latent_shape, dtype=torch.float64), 1.0)
