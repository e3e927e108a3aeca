"""The terms of the RLR estimator, one function each (Ren et al., arXiv 2502.00639, eq. 6; spec §1.2).

Every term reads one sampled batch (``SampledBatch``: the trajectory, the advantages, the valid rows)
and the steps the chain split gives it, writes its gradient through the batch's ``Gradients`` (so the
reader sees where ``.grad`` changes) and returns its loss value. Recomputed steps go through
``model_step`` with the stored noises and are checked against the sampled latents. Notation, paper
order (step t maps x_t -> x_{t-1}; t = 1 is the last step): A = R - b the advantage, mu_t the step mean,
sigma_t its std, eps_t its noise; "mean_b" averages over the valid rows of the whole batch.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch import Tensor

from ..sampling import StepOutput, Trajectory, model_step, sample_chain
from .perturbation import direction, perturbed
from .problem import ChainProblem, Gradients, check_recomputed_step, detach_rows, evaluate_reward
from .terms import first_order_loss, likelihood_ratio_loss

if TYPE_CHECKING:
    from .rlr import RLRConfig


@dataclass
class SampledBatch:
    """One sampled batch and what every term reads from it."""

    problem: ChainProblem
    config: "RLRConfig"
    x_T: Tensor
    traj: Trajectory
    valid: Tensor  # (B,) this shard's finite rewards
    adv: Tensor  # (B,) this shard's advantages
    all_valid: Tensor  # the whole batch's finite rewards
    row_scale: float  # B / valid rows of the whole batch (``valid_row_scale``)
    grads: Gradients
    metrics: dict[str, float]
    generator: torch.Generator | None = None
    seeds: dict[int, int] = field(default_factory=dict)  # param_1pt: the perturbation seed of each ZO step
    step_adv: dict[int, Tensor] = field(default_factory=dict)  # per-step advantages (``step_baseline``)

    def adv_at(self, k: int) -> Tensor:
        """The advantages of a likelihood ratio at sampler step k: the step's own with ``step_baseline``."""
        return self.step_adv.get(k, self.adv)

    def recompute(self, k: int, x: Tensor, what: str, use_checkpoint: bool = False) -> StepOutput:
        """Step k from ``x`` with its stored noise, checked to reproduce the sampled x_{k+1}."""
        step = model_step(self.problem.model, self.problem.schedule, self.problem.prompts, k, x, self.traj.noises[k],
                          use_checkpoint=use_checkpoint)
        check_recomputed_step(step, self.traj, k, self.metrics, self.config.recompute_atol, what)
        return step

    def count_calls(self, calls: int, with_grad: int) -> None:
        self.metrics["model_calls"] += calls
        self.metrics["model_calls_with_grad"] += with_grad


def first_order_term(s: SampledBatch, steps: Sequence[int], weight: float) -> float:
    """FO, pathwise (DRaFT-K): loss -w mean_b R(x_0(theta)), x_0 recomputed through ``steps`` (the last K)
    from the stored x_K with the sampled noises fixed, so its gradient is w mean_b (dR/dx_0)(dx_0/dtheta).
    Rows whose reward failed are detached (their reward's backward may be NaN)."""
    ckpt = s.config.use_checkpoint
    x = s.traj.latents[steps[0]]
    for k in steps:
        x = s.recompute(k, x, "the first-order term", ckpt).prev_sample
    rewards, _ = evaluate_reward(s.problem, detach_rows(x, s.valid))
    value = s.grads.add_loss(weight * first_order_loss(rewards, s.valid, s.row_scale), "first-order")
    s.count_calls(len(steps) * (2 if ckpt else 1), len(steps))
    return value


def half_order_term(s: SampledBatch, steps: Sequence[int], weight: float) -> tuple[float, list[Tensor | None] | None]:
    """HO over S = {j, ..., j+h-1}: from the stored x_{j+h-1}, recompute S's first h-1 steps with grad
    (pathwise inside S, sampled noises), then the likelihood ratio at its end, step j:
    loss -w mean_b A <mu_j, (x_{j-1} - mu_j)/sigma_j^2>, gradient w mean_b A (dmu_j/dtheta)^T eps_j/sigma_j.
    Returns (its value, the gradient it wrote) -- the j sampler may weigh j by that gradient's norm."""
    ckpt = s.config.use_checkpoint
    x = s.traj.latents[steps[0]]
    for k in steps[:-1]:
        x = s.recompute(k, x, "the half-order sub-chain", ckpt).prev_sample
    k_end = steps[-1]
    step = s.recompute(k_end, x, "the half-order term", ckpt)
    loss = weight * likelihood_ratio_loss(step.mean, s.traj.latents[k_end + 1], step.std, s.adv_at(k_end),
                                          s.row_scale)
    value, grads = s.grads.of_loss(loss, "half-order")
    s.grads.write(value, grads)
    s.count_calls(len(steps) * (2 if ckpt else 1), len(steps))
    return value, grads


def latent_lr_term(s: SampledBatch, steps: Sequence[int], weight: float) -> float:
    """ZO ``latent_lr``: sum over t in C of the per-step likelihood ratio on the latent noise,
    loss -w mean_b A <mu_t, (x_{t-1} - mu_t)/sigma_t^2>, gradient w mean_b A (dmu_t/dtheta)^T eps_t/sigma_t
    (DDPO's REINFORCE term; exactly unbiased; one forward+backward per step, one step in memory)."""
    total = 0.0
    for k in steps:
        step = s.recompute(k, s.traj.latents[k], "a zeroth-order term")
        loss = weight * likelihood_ratio_loss(step.mean, s.traj.latents[k + 1], step.std, s.adv_at(k), s.row_scale)
        total += s.grads.add_loss(loss, "zeroth-order")
    s.count_calls(len(steps), len(steps))
    return total


def param_1pt_term(s: SampledBatch, steps: Sequence[int], weight: float) -> float:
    """ZO ``param_1pt`` (paper-literal, evolution strategies): the sampler ran theta + nu delta_t at each t in
    C (``perturbation_context``); gradient w (mean_b A) sum_t delta_t / nu. No model calls."""
    if not steps:
        return 0.0
    all_adv = s.problem.gather(s.adv)
    coef = float(all_adv[s.all_valid].mean()) if s.all_valid.any() else 0.0
    params = s.grads.params
    for k in steps:  # loss gradient = -(ascent direction)
        s.grads.add_direction(direction(params, s.seeds[k]), -weight * coef / s.config.nu)
    return 0.0


def param_2pt_term(s: SampledBatch, steps: Sequence[int], weight: float) -> float:
    """ZO ``param_2pt``: two extra no-grad chains with theta +- nu delta on C, the same x_T and noises
    (common random numbers); gradient w mean_b (R+ - R-)/(2 nu) delta, averaged over ``zo_directions``."""
    if not steps:
        return 0.0
    cfg, problem, params = s.config, s.problem, s.grads.params
    zo_set = set(steps)
    for _ in range(cfg.zo_directions):
        seed = int(torch.randint(0, 2**62, (1,), generator=s.generator))
        delta = direction(params, seed)
        r_pm = []
        for sign in (1.0, -1.0):
            def ctx(k: int, sgn=sign):
                return perturbed(params, delta, sgn * cfg.nu) if k in zo_set else contextlib.nullcontext()
            with torch.no_grad():
                chain = sample_chain(problem.model, problem.schedule, problem.prompts, s.x_T, noises=s.traj.noises,
                                     step_context=ctx)
                r_pm.append(evaluate_reward(problem, chain.final))
        (r_plus, _), (r_minus, _) = r_pm
        r_plus, r_minus = problem.gather(r_plus), problem.gather(r_minus)
        ok = s.all_valid & torch.isfinite(r_plus) & torch.isfinite(r_minus)
        diff = float(((r_plus - r_minus)[ok]).mean()) if ok.any() else 0.0
        s.grads.add_direction(delta, -weight * diff / (2 * cfg.nu) / cfg.zo_directions)
    s.count_calls(2 * problem.num_steps * cfg.zo_directions, 0)
    return 0.0


#: zo_mode -> the term that estimates the zeroth-order part C
ZO_TERMS: dict[str, Callable[[SampledBatch, Sequence[int], float], float]] = {
    "latent_lr": latent_lr_term, "param_1pt": param_1pt_term, "param_2pt": param_2pt_term}


def perturbation_context(params: Sequence[Tensor], seeds: dict[int, int], nu: float):
    """param_1pt's ``step_context`` for sampling: theta + nu delta_k on the steps that have a seed."""
    def step_context(k: int):
        if k in seeds:
            return perturbed(params, direction(params, seeds[k]), nu)
        return contextlib.nullcontext()
    return step_context


def grad_norm(problem: ChainProblem, grads: Sequence[Tensor | None] | None, params: Sequence[Tensor]) -> float:
    """Norm of a term's gradient; with a split batch each shard's gradient is averaged over the processes
    first, so every process observes the norm of the whole batch's term."""
    parts = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads or [None] * len(params), params)]
    if problem.shard is not None:
        parts = [problem.mean_over_shards(d) for d in parts]
    return math.sqrt(sum(float(d.pow(2).sum()) for d in parts))
