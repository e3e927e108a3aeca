"""The Recursive Likelihood Ratio estimator (Ren et al., arXiv 2502.00639, eq. 6; spec §1.2).

    grad J  ~=  FO(step 1)  +  HO(S = {j..j+h-1})  +  ZO(C = {2..T} \\ S)          (paper order)

* FO: backprop dR/dx_0 through the last step only (x_1 detached, its noise fixed). DRaFT-1.
* HO: from the stored x_{j+h-1} (detached) recompute the sub-chain with grad using the stored
  noises, then
  A * (d mu_j / d theta)^T eps_j / sigma_j: pathwise inside S, likelihood ratio at its end.
* ZO, three realisations:
  ``latent_lr``  A (d mu_t/d theta)^T eps_t/sigma_t for each t in C; exactly unbiased; one extra
                 forward+backward per step, one step in memory at a time.
  ``param_1pt``  the sampler runs theta + nu delta_t on C; (mean_b A) sum_t delta_t / nu (paper
                 literal, evolution strategies); unbiased for the perturbed sampler (O(nu^2) bias);
                 no extra model calls; very high variance. Needs an EMA or no baseline (a
                 leave-one-out baseline makes mean_b A identically 0 when delta is batch-shared).
  ``param_2pt``  two extra no-grad chains with theta +/- nu delta on C, same x_T and noises (common
                 random numbers); mean_b (R+ - R-)/(2 nu) delta; +2T forwards; O(nu^2) bias.

Every recomputed step (FO, HO, latent ZO) is checked to reproduce the sampled step (``check_recomputed_step``):
a likelihood ratio at a mean that does not would score the wrong noise. All terms have weight 1 by default; unequal ``weights`` break unbiasedness (they rescale shares of
the gradient). Cost per update: T no-grad forwards (sampling) + 1 forward/backward with the reward
and decoder backward (FO) + h forward/backward holding h steps of activations (HO) + the ZO cost.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..choices import ZO_MODES
from ..sampling import sample_chain, step_mean
from .advantages import BASELINES, BaselineState
from .notes import describe
from .partition import J_DISTRIBUTIONS, JSampler, check_h, split_chain
from .perturbation import direction, perturbed
from .problem import (ChainProblem, Estimate, add_to_grad, backward_if_finite, batch_advantages,
                      check_recomputed_step, detach_rows, evaluate_reward, reward_metrics, valid_row_scale)
from .terms import first_order_loss, likelihood_ratio_loss

logger = logging.getLogger(__name__)

ZOMode = Literal["latent_lr", "param_1pt", "param_2pt"]


@dataclass(frozen=True)
class RLRConfig:
    """Knobs of the RLR estimator. ``j`` values are in paper order (t = 1 is the last step)."""

    h: int = 2  # half-order sub-chain length (paper recommends 2)
    fo_steps: int = 1  # first-order (backprop) over the last K steps; the paper uses 1
    zo_mode: str = "latent_lr"  # one of ZO_MODES
    nu: float = 1e-3  # parameter perturbation scale for param_1pt / param_2pt
    zo_directions: int = 1  # param_2pt: random directions averaged per update (each costs 2T forwards)
    j_dist: str = "uniform"  # 'uniform' | 'range' | 'softmax_gradnorm'
    j_range: tuple[int, int] | None = None  # (a, b) for j_dist='range' (DCoT focus)
    baseline: str = "loo"  # advantage baseline, see advantages.BASELINES
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # FO, HO, ZO; unequal weights are biased
    adv_clip: float | None = None  # clip |A|; biased when it bites
    recompute_atol: float = 1e-4  # tolerance of the recomputation check of every recomputed step (relative to max |x| + 1)
    use_checkpoint: bool = False  # recompute each FO/HO step's activations in backward: ~1 step held, +1 forward each

    def __post_init__(self) -> None:
        check_h(self.h, self.h + self.fo_steps, self.fo_steps)
        if self.zo_mode not in ZO_MODES:
            raise ValueError(f"unknown zo_mode {self.zo_mode!r}; choose one of {list(ZO_MODES)}")
        if self.baseline not in BASELINES:
            raise ValueError(f"unknown baseline {self.baseline!r}; choose one of {list(BASELINES)}")
        if self.zo_mode == "param_1pt" and self.baseline not in ("ema", "none"):
            raise ValueError(
                "zo_mode='param_1pt' shares one perturbation across the batch, so a batch baseline "
                f"({self.baseline!r}) makes its term zero; use baseline='ema' (or 'none')"
            )
        if not (self.nu > 0 and math.isfinite(self.nu)):
            raise ValueError(f"nu must be a positive number, got {self.nu}")
        if self.zo_directions < 1:
            raise ValueError("zo_directions must be >= 1")
        if len(self.weights) != 3 or any(w < 0 for w in self.weights):
            raise ValueError("weights must be three non-negative numbers (FO, HO, ZO)")
        if self.j_dist not in J_DISTRIBUTIONS:
            raise ValueError(f"unknown j_dist {self.j_dist!r}; choose one of {list(J_DISTRIBUTIONS)}")
        if self.j_dist == "range" and self.j_range is None:
            raise ValueError("j_dist='range' needs j_range=(a, b) (paper order, 1 = last step)")

    def j_sampler(self) -> JSampler:
        return JSampler(self.j_dist, self.j_range)

    def check(self, problem: ChainProblem) -> None:
        """Raise if this config cannot run on the problem's chain (call once, before training)."""
        n = problem.num_steps
        self.j_sampler().support(n, self.h, self.fo_steps if problem.reward_differentiable else 1)
        sig = problem.schedule.sigma
        # every step but the last may carry a likelihood ratio (HO end or latent ZO)
        need = range(n) if not problem.reward_differentiable else range(n - 1)
        bad = [k for k in need if sig[k] <= 0]
        if bad:
            raise ValueError(
                f"RLR's likelihood-ratio terms need a stochastic sampler, but sigma = 0 at sampler steps {bad[:5]}"
                "...; set eta > 0 (e.g. eta=1.0)"
            )


def rlr_estimate(problem: ChainProblem, x_T: Tensor, *, config: RLRConfig = RLRConfig(),
                 generator: torch.Generator | None = None, j: int | None = None,
                 j_sampler: JSampler | None = None, baseline_state: BaselineState | None = None) -> Estimate:
    """One RLR gradient estimate for the batch started at ``x_T``; accumulates into ``.grad``."""
    config.check(problem)
    describe(config, problem.reward_differentiable).log()  # biasing options, a dropped first-order part: once
    n, params = problem.num_steps, list(problem.params)
    sampler = j_sampler or config.j_sampler()
    fo_steps = config.fo_steps if problem.reward_differentiable else 1
    if j is None:
        j = sampler.draw(n, config.h, generator, fo_steps)
    split = split_chain(n, config.h, j, reward_differentiable=problem.reward_differentiable, fo_steps=fo_steps)
    w_fo, w_ho, w_zo = config.weights
    metrics: dict[str, float] = {"j": float(j), "model_calls": float(n), "model_calls_with_grad": 0.0}

    # 1. sampling pass without grad (param_1pt perturbs theta on the ZO steps)
    step_context, seeds = None, {}
    if config.zo_mode == "param_1pt" and split.zo:
        seeds = {k: int(torch.randint(0, 2**62, (1,), generator=generator)) for k in split.zo}

        def step_context(k: int):
            if k in seeds:
                return perturbed(params, direction(params, seeds[k]), config.nu)
            return contextlib.nullcontext()

    with torch.no_grad():
        traj = sample_chain(problem.model, problem.schedule, problem.prompts, x_T, generator=generator,
                            step_context=step_context, noise_shard=problem.noise_shard)
        rewards, valid = evaluate_reward(problem, traj.final)
    # batch statistics over the whole batch (gathered from every process when it is split)
    adv, all_rewards = batch_advantages(problem, rewards, config.baseline, state=baseline_state, clip=config.adv_clip)
    all_valid = torch.isfinite(all_rewards.detach())
    metrics["nonfinite_rewards"] = float((~all_valid).sum())
    row_scale = valid_row_scale(all_rewards)  # one normalisation for every term: the mean over the valid rows
    lat, sched, prompts, model = traj.latents, problem.schedule, problem.prompts, problem.model
    total = 0.0

    # 2. FO on the last step(s): DRaFT-K through the reward (and decoder), from the stored latents
    if split.fo and w_fo:  # a zero-weight term is skipped, not computed
        x = lat[split.fo[0]]
        for k in split.fo:
            mean, sigma = step_mean(model, sched, prompts, k, x, use_checkpoint=config.use_checkpoint)
            check_recomputed_step(mean, sigma, traj, k, metrics, config.recompute_atol, "the first-order term")
            x = mean + sigma * traj.noises[k] if sigma > 0 else mean
        r_fo, _ = evaluate_reward(problem, detach_rows(x, valid))
        total += backward_if_finite(w_fo * first_order_loss(r_fo, valid, row_scale), metrics, "first-order", params)
        metrics["model_calls"] += len(split.fo) * (2 if config.use_checkpoint else 1)
        metrics["model_calls_with_grad"] += len(split.fo)

    # 3. HO over S: recompute the sub-chain with grad from its stored start
    before = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params] \
        if sampler.kind == "softmax_gradnorm" else None
    x = lat[split.ho[0]]
    for k in split.ho[:-1] if w_ho else ():
        mean, sigma = step_mean(model, sched, prompts, k, x, use_checkpoint=config.use_checkpoint)
        check_recomputed_step(mean, sigma, traj, k, metrics, config.recompute_atol, "the half-order sub-chain")
        x = mean + sigma * traj.noises[k]
    k_end = split.ho[-1]
    if w_ho:
        mean, sigma = step_mean(model, sched, prompts, k_end, x, use_checkpoint=config.use_checkpoint)
        check_recomputed_step(mean, sigma, traj, k_end, metrics, config.recompute_atol, "the half-order term")
        total += backward_if_finite(w_ho * likelihood_ratio_loss(mean, lat[k_end + 1], sigma, adv, row_scale), metrics,
                                    "half-order", params)
        metrics["model_calls"] += config.h * (2 if config.use_checkpoint else 1)
        metrics["model_calls_with_grad"] += config.h
    if before is not None:
        norm = _ho_grad_norm(problem, params, before)
        sampler.observe(j, norm)
        metrics["ho_grad_norm"] = norm

    # 4. ZO over C
    if not w_zo:
        pass
    elif config.zo_mode == "latent_lr":
        for k in split.zo:
            mean, sigma = step_mean(model, sched, prompts, k, lat[k])
            check_recomputed_step(mean, sigma, traj, k, metrics, config.recompute_atol, "a zeroth-order term")
            total += backward_if_finite(w_zo * likelihood_ratio_loss(mean, lat[k + 1], sigma, adv, row_scale), metrics,
                                        "zeroth-order", params)
        metrics["model_calls"] += len(split.zo)
        metrics["model_calls_with_grad"] += len(split.zo)
    elif config.zo_mode == "param_1pt" and split.zo:
        all_adv = problem.gather(adv)
        coef = float(all_adv[all_valid].mean()) if all_valid.any() else 0.0
        for k in split.zo:  # loss gradient = -(ascent direction)
            add_to_grad(params, direction(params, seeds[k]), -w_zo * coef / config.nu)
    elif config.zo_mode == "param_2pt" and split.zo:
        zo_set = set(split.zo)
        for _ in range(config.zo_directions):
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            delta = direction(params, seed)
            r_pm = []
            for sign in (1.0, -1.0):
                def ctx(k: int, s=sign):
                    return perturbed(params, delta, s * config.nu) if k in zo_set else contextlib.nullcontext()
                with torch.no_grad():
                    chain = sample_chain(model, sched, prompts, x_T, noises=traj.noises, step_context=ctx)
                    r_pm.append(evaluate_reward(problem, chain.final))
            (r_plus, _), (r_minus, _) = r_pm
            r_plus, r_minus = problem.gather(r_plus), problem.gather(r_minus)
            ok = all_valid & torch.isfinite(r_plus) & torch.isfinite(r_minus)
            diff = float(((r_plus - r_minus)[ok]).mean()) if ok.any() else 0.0
            add_to_grad(params, delta, -w_zo * diff / (2 * config.nu) / config.zo_directions)
        metrics["model_calls"] += 2 * n * config.zo_directions

    metrics.update(reward_metrics(all_rewards),
                   steps_in_memory=1.0 if config.use_checkpoint else float(max(config.h, len(split.fo))))
    return Estimate(total, metrics, rewards.detach(), traj, {"split": split})


def _ho_grad_norm(problem: ChainProblem, params: list[Tensor], before: list[Tensor]) -> float:
    """Norm of the half-order term's gradient (the change of ``.grad`` since ``before``).

    With a split batch each shard's change is averaged over the processes first, so every process
    observes the norm of the whole batch's term and its j distribution stays the same.
    """
    deltas = [(p.grad if p.grad is not None else 0) - b for p, b in zip(params, before)]
    if problem.shard is not None:
        deltas = [problem.mean_over_shards(d) for d in deltas]
    return math.sqrt(sum(float(d.pow(2).sum()) for d in deltas))
