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

Deterministic steps (std 0: a flow chain's ODE steps outside its SDE window, cps's last step, eta = 0) carry
no likelihood ratio. ``RLRConfig.check`` requires std > 0 exactly where a ratio is taken for some j in the j
distribution's support (``partition.likelihood_ratio_steps``: the HO end step, and every ZO step with
``latent_lr``) and refuses the chain otherwise, naming the steps and the j values that would work; pathwise
steps (FO, the rest of S) and parameter-space ZO steps may be deterministic, and the estimate stays unbiased.

Every recomputed step (FO, HO, latent ZO) is checked to reproduce the sampled step (``check_recomputed_step``):
a likelihood ratio at a mean that does not would score the wrong noise. All terms have weight 1 by default; unequal ``weights`` break unbiasedness (they rescale shares of
the gradient). Cost per update: T no-grad forwards (sampling) + 1 forward/backward with the reward
and decoder backward (FO) + h forward/backward holding h steps of activations (HO) + the ZO cost.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..choices import ZO_MODES
from ..sampling import paper_to_sampler, sample_chain
from .advantages import BASELINES, BaselineState
from .config import EstimatorConfig, baseline_biases
from .notes import describe
from .partition import J_DISTRIBUTIONS, JSampler, check_h, likelihood_ratio_steps, split_chain
from .problem import ChainProblem, Estimate, batch_advantages, evaluate_reward, reward_metrics, valid_row_scale
from .rlr_terms import ZO_TERMS, SampledBatch, first_order_term, grad_norm, half_order_term, perturbation_context
from .step_baseline import STEP_BASELINE_KINDS, step_advantages

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RLRConfig(EstimatorConfig):
    """Knobs of the RLR estimator. ``j`` values are in paper order (t = 1 is the last step)."""

    name = "rlr"
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
    step_baseline: bool = False  # subtract R(x0_hat(x_k)) at each likelihood-ratio step k (``step_baseline``)

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
        if self.step_baseline and self.baseline not in STEP_BASELINE_KINDS:
            raise ValueError(f"step_baseline needs baseline in {list(STEP_BASELINE_KINDS)}, got {self.baseline!r}")
        if self.j_dist == "range" and self.j_range is None:
            raise ValueError("j_dist='range' needs j_range=(a, b) (paper order, 1 = last step)")

    @classmethod
    def from_settings(cls, s) -> "RLRConfig":
        """param_1pt shares one perturbation across the batch, so it takes the EMA baseline (see __post_init__)."""
        return cls(h=s.h, fo_steps=s.fo_steps, zo_mode=s.zo_mode, nu=s.nu,
                   baseline="ema" if s.zo_mode == "param_1pt" else "loo",
                   j_dist="range" if s.ho_range else "uniform", j_range=s.ho_range,
                   use_checkpoint=s.gradient_checkpointing,
                   step_baseline=s.step_baseline and s.zo_mode != "param_1pt")

    def j_sampler(self) -> JSampler:
        return JSampler(self.j_dist, self.j_range)

    def biases(self, reward_differentiable: bool) -> list[str]:
        out = baseline_biases(self.baseline, self.adv_clip)
        if self.weights != (1.0, 1.0, 1.0):
            out.append(f"unequal term weights {tuple(self.weights)} (FO, HO, ZO)")
        if self.zo_mode in ("param_1pt", "param_2pt"):
            out.append(f"zo_mode={self.zo_mode}: finite differences in parameter space, O(nu^2) bias (nu={self.nu:g})")
        return out

    def overrides(self, reward_differentiable: bool) -> list[str]:
        if not reward_differentiable and self.fo_steps > 1:
            return [f"the reward is not differentiable, so there is no first-order term: fo_steps={self.fo_steps} is "
                    "ignored and the last steps are estimated by likelihood ratios"]
        return []

    def check(self, problem: ChainProblem) -> None:
        """Raise if this config cannot run on the problem's chain (call once, before training)."""
        n = problem.num_steps
        fo_steps = self.fo_steps if problem.reward_differentiable else 1
        js = self.j_sampler().support(n, self.h, fo_steps)
        stds = problem.schedule.stds
        latent = self.zo_mode == "latent_lr"
        need = likelihood_ratio_steps(n, self.h, js, latent_zo=latent,
                                      reward_differentiable=problem.reward_differentiable, fo_steps=fo_steps)
        bad = sorted(k for k in need if stds[k] <= 0)
        if bad:
            where = "the half-order term's last step for each j" + (
                ", and every zeroth-order step with zo_mode='latent_lr'" if latent else "")
            ok_js = [j for j in js if stds[paper_to_sampler(j, n)] > 0]
            hint = ""
            if ok_js:
                hint = (f"; or keep the likelihood ratios on stochastic steps: a j_range inside the j values {ok_js} "
                        "(paper order)" + (" with zo_mode='param_2pt'" if latent else ""))
            raise ValueError(
                f"RLR takes a likelihood ratio at sampler steps {bad[:5]}{'...' if len(bad) > 5 else ''} ({where}), "
                "but they are deterministic (std 0: eta = 0 there, an ODE step outside the SDE window, or cps's "
                f"step to sigma = 0); set eta > 0 on them (e.g. eta=1.0){hint}"
            )


def rlr_estimate(problem: ChainProblem, x_T: Tensor, *, config: RLRConfig = RLRConfig(),
                 generator: torch.Generator | None = None, baseline_state: BaselineState | None = None,
                 j_sampler: JSampler | None = None, j: int | None = None) -> Estimate:
    """One RLR gradient estimate for the batch started at ``x_T``: FO + HO + ZO, each term adding its
    gradient to ``.grad`` (``rlr_terms``). ``j`` fixes the half-order start (paper order) instead of drawing it."""
    config.check(problem)
    describe(config, problem.reward_differentiable).log()  # biasing options, a dropped first-order part: once
    n, params = problem.num_steps, list(problem.params)
    sampler = j_sampler or config.j_sampler()
    fo_steps = config.fo_steps if problem.reward_differentiable else 1
    j = sampler.draw(n, config.h, generator, fo_steps) if j is None else j
    split = split_chain(n, config.h, j, reward_differentiable=problem.reward_differentiable, fo_steps=fo_steps)
    w_fo, w_ho, w_zo = config.weights
    metrics: dict[str, float] = {"j": float(j), "model_calls": float(n), "model_calls_with_grad": 0.0}
    # 1. the sampling pass, without grad (param_1pt perturbs theta on the ZO steps)
    seeds = {k: int(torch.randint(0, 2**62, (1,), generator=generator)) for k in split.zo} \
        if config.zo_mode == "param_1pt" and split.zo else {}
    with torch.no_grad():
        traj = sample_chain(problem.model, problem.schedule, problem.prompts, x_T, generator=generator,
                            step_context=perturbation_context(params, seeds, config.nu) if seeds else None,
                            noise_shard=problem.noise_shard, keep_x0_hats=config.step_baseline)
        rewards, valid = evaluate_reward(problem, traj.final)
    # batch statistics over the whole batch (gathered from every process when it is split)
    adv, all_rewards = batch_advantages(problem, rewards, config.baseline, state=baseline_state, clip=config.adv_clip)
    all_valid = torch.isfinite(all_rewards.detach())
    metrics["nonfinite_rewards"] = float((~all_valid).sum())
    grads = problem.gradients(metrics)
    batch = SampledBatch(problem, config, x_T, traj, valid, adv, all_valid, valid_row_scale(all_rewards), grads,
                         metrics, generator, seeds)
    if config.step_baseline:  # the likelihood-ratio steps: HO's end, and C with latent_lr
        ratio_steps = ([split.ho[-1]] if w_ho else []) + (list(split.zo) if w_zo and config.zo_mode == "latent_lr" else [])
        batch.step_adv, failed = step_advantages(problem, traj, rewards, ratio_steps, config.baseline, config.adv_clip)
        metrics["step_baseline_rewards"] = float(len(batch.step_adv))
        metrics["step_baseline_nonfinite"] = float(failed)
    # 2. the terms, in this order; a zero-weight term is skipped, not computed
    if split.fo and w_fo:
        first_order_term(batch, split.fo, w_fo)
    ho_grads = half_order_term(batch, split.ho, w_ho)[1] if w_ho else None
    if sampler.kind == "softmax_gradnorm":
        metrics["ho_grad_norm"] = norm = grad_norm(problem, ho_grads, params)
        sampler.observe(j, norm)
    if w_zo:
        ZO_TERMS[config.zo_mode](batch, split.zo, w_zo)
    metrics.update(reward_metrics(all_rewards),
                   steps_in_memory=1.0 if config.use_checkpoint else float(max(config.h, len(split.fo))))
    return Estimate(grads.total, metrics, rewards.detach(), traj, {"split": split})
