"""A linear-Gaussian diffusion chain with a quadratic reward: the exact gradient is known.

Spec §5 (shared/reference/rlr-spec.md). The chain is a real DDIM sampler driven by a linear
``Denoiser``; the estimators run on it unchanged, so the tests check the production code paths.

Model. Latents x in R^d, trainable theta = (u, v) with u a scalar and v in R^d. At sampler step k
the denoiser predicts eps_hat = (p_k + q_k u) x + r_k v + e_k, so the DDIM mean is affine in x:

    mu_k = A_k x + B_k eps_hat = a_k(u) x + beta_k v + c_k,
    A_k = sqrt(abar_prev/abar_t),  B_k = sqrt(1-abar_prev-sigma_k^2) - sqrt(abar_prev (1-abar_t)/abar_t),
    a_k(u) = alpha_k + kappa_k u,  alpha_k = A_k + B_k p_k,  kappa_k = B_k q_k,  beta_k = B_k r_k,  c_k = B_k e_k.

We choose (alpha, kappa, beta, c) and solve for (p, q, r, e), so the chain has well-scaled gains.
x_{k+1} = mu_k + sigma_k eps_k and x at k = 0 is N(m_init, s_init^2 I).

Closed form. Every x_k is Gaussian with isotropic variance, so with per-step copies theta_k
(m, s^2) follow   m <- a_k(u_k) m + beta_k v_k + c_k,   s^2 <- a_k(u_k)^2 s^2 + sigma_k^2,
and with R(x) = -1/2 |x - y|^2:

    J = E[R(x_T)] = -1/2 |m_T - y|^2 - (d/2) s_T^2.

The per-step shares g_k = dJ/dtheta_k are obtained by differentiating this closed form (autograd on
an exact expression, in float64); the full gradient is their sum. Any estimator's expectation is a
known sum of shares: full backprop sum_k g_k, truncated backprop (K) the last K shares, RLR all of
them for every j. ``analytic_flow`` is the flow-matching counterpart; ``collect_estimates`` and ``z_scores``
serve both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from ..sampling import DDIMSchedule, PromptSchedule
from .problem import ChainProblem


class LinearDenoiser(nn.Module):
    """eps_hat = (p_k + q_k u) x + r_k v + e_k for the step k whose timestep is given."""

    def __init__(self, schedule: DDIMSchedule, p: Tensor, q: Tensor, r: Tensor, e: Tensor, d: int):
        super().__init__()
        self.u = nn.Parameter(torch.tensor(0.1, dtype=torch.float64))
        self.v = nn.Parameter(torch.zeros(d, dtype=torch.float64))
        self.step_of = {t: k for k, t in enumerate(schedule.timesteps)}
        for name, val in dict(p=p, q=q, r=r, e=e).items():
            self.register_buffer(name, val.to(torch.float64))

    def forward(self, x: Tensor, timestep: int, cond: object = None) -> Tensor:
        k = self.step_of[int(timestep)]
        return (self.p[k] + self.q[k] * self.u) * x + self.r[k] * self.v + self.e[k]


@dataclass
class AnalyticChain:
    """The test problem: a schedule, a LinearDenoiser, the reward target y and the initial law."""

    schedule: DDIMSchedule
    model: LinearDenoiser
    y: Tensor
    m_init: Tensor
    s_init: float
    alpha: Tensor
    kappa: Tensor
    beta: Tensor
    c: Tensor

    @property
    def d(self) -> int:
        return self.y.numel()

    @property
    def num_steps(self) -> int:
        return self.schedule.num_steps

    @property
    def params(self) -> list[Tensor]:
        return [self.model.u, self.model.v]

    def reward(self, x: Tensor) -> Tensor:
        return -0.5 * ((x - self.y) ** 2).sum(1)

    def sample_x_T(self, batch: int, generator: torch.Generator) -> Tensor:
        return self.m_init + self.s_init * torch.randn(batch, self.d, generator=generator, dtype=torch.float64)

    def prompts(self) -> PromptSchedule:
        return PromptSchedule.constant(None, self.num_steps)

    def per_step_gradient(self) -> Tensor:
        """(T, 1 + d) exact shares g_k = dJ/dtheta_k in sampler order (k = T-1 is the last step)."""
        n = self.num_steps
        u = self.model.u.detach().repeat(n).requires_grad_(True)
        v = self.model.v.detach().repeat(n, 1).requires_grad_(True)
        sig = self.schedule.sigma
        m, s2 = self.m_init.clone(), torch.tensor(self.s_init**2, dtype=torch.float64)
        for k in range(n):
            a = self.alpha[k] + self.kappa[k] * u[k]
            m = a * m + self.beta[k] * v[k] + self.c[k]
            s2 = a**2 * s2 + sig[k] ** 2
        j = -0.5 * ((m - self.y) ** 2).sum() - 0.5 * self.d * s2
        gu, gv = torch.autograd.grad(j, [u, v])
        return torch.cat([gu[:, None], gv], dim=1)

    def expected_reward(self) -> float:
        n, sig = self.num_steps, self.schedule.sigma
        m, s2 = self.m_init.clone(), self.s_init**2
        with torch.no_grad():
            for k in range(n):
                a = self.alpha[k] + self.kappa[k] * self.model.u
                m = a * m + self.beta[k] * self.model.v + self.c[k]
                s2 = a**2 * s2 + sig[k] ** 2
            return float(-0.5 * ((m - self.y) ** 2).sum() - 0.5 * self.d * s2)


def make_analytic_chain(d: int = 3, num_steps: int = 8, eta: float = 1.0, seed: int = 0) -> AnalyticChain:
    """A reproducible instance. The DDIM schedule's sigma grows with t (noisier early steps), as in SD."""
    g = torch.Generator().manual_seed(seed)

    def unif(lo: float, hi: float, size) -> Tensor:
        return lo + (hi - lo) * torch.rand(size, generator=g, dtype=torch.float64)

    # a short noise schedule whose last step still adds noise (sigma ~ 0.2), so every step can carry
    # a likelihood ratio; sigma grows towards the noisy end as in Stable Diffusion's schedule
    abar = torch.linspace(0.8, 0.05, 1000, dtype=torch.float64)
    sched = DDIMSchedule.from_alphas_cumprod(abar, num_steps, eta=eta, steps_offset=0, final_alpha_cumprod=0.95)
    a_t, a_p, sig = sched.alpha_t, sched.alpha_prev, sched.sigma
    A = (a_p / a_t).sqrt()
    B = (1 - a_p - sig**2).clamp_min(0).sqrt() - (a_p * (1 - a_t) / a_t).sqrt()
    alpha, kappa, beta = unif(0.8, 1.0, num_steps), unif(0.2, 0.5, num_steps), unif(0.1, 0.3, num_steps)
    c = 0.3 * torch.randn(num_steps, d, generator=g, dtype=torch.float64)
    model = LinearDenoiser(sched, (alpha - A) / B, kappa / B, beta / B, c / B[:, None], d)
    with torch.no_grad():
        model.v.copy_(0.5 * torch.randn(d, generator=g, dtype=torch.float64))
    m_init = torch.randn(d, generator=g, dtype=torch.float64)
    y = torch.randn(d, generator=g, dtype=torch.float64)
    return AnalyticChain(sched, model, y, m_init, 1.0, alpha, kappa, beta, c)


def collect_estimates(chain, estimate: Callable[..., object], *, n_calls: int, batch: int,
                      seed: int, reward_offset: float = 0.0, reward: Callable[[Tensor], Tensor] | None = None,
                      **kwargs) -> Tensor:
    """(n_calls, number of parameters) gradient-ascent estimates: -(.grad) after each estimator call, the
    parameters flattened in ``chain.params`` order. ``chain`` is an ``AnalyticChain`` or any test chain with
    its ``model``, ``schedule``, ``prompts()``, ``reward``, ``params`` and ``sample_x_T`` (``analytic_flow``).

    ``reward_offset`` is subtracted from the reward (a constant baseline, for estimators without one);
    ``reward`` replaces the chain's own (e.g. one that fails on some rows).
    """
    base = reward or chain.reward
    problem = ChainProblem(chain.model, chain.schedule, chain.prompts(), lambda x: base(x) - reward_offset,
                           chain.params)
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n_calls, sum(p.numel() for p in chain.params), dtype=torch.float64)
    for i in range(n_calls):
        for p in chain.params:
            p.grad = None
        estimate(problem, chain.sample_x_T(batch, g), generator=g, **kwargs)
        out[i] = -torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                             for p in chain.params])
    return out


def z_scores(estimates: Tensor, target: Tensor) -> Tensor:
    """Per-coordinate |mean - target| / standard error."""
    se = estimates.std(0) / math.sqrt(estimates.shape[0])
    return (estimates.mean(0) - target).abs() / se
