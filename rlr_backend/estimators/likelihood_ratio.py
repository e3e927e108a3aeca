"""Score-function baselines: DDPO (PPO-clipped, per-step) and pure likelihood ratio (``zo``).

* ``ddpo`` (Black et al. 2023, kvablack/ddpo-pytorch): per step k, recompute log p_theta(x_{k+1}|x_k)
  on the stored latents, ratio r = exp(logp - logp_old), loss mean_b max(-A r, -A clip(r, 1+-eps)).
  ddpo-pytorch defaults: advantages normalised per prompt, |A| clipped at 5, clip 1e-4, the loss
  averaged over timesteps (it accumulates gradients over them) and log-probs averaged over elements.
  Here log-probs are summed unless ``logprob_reduction='mean'``. On the first update r = 1 and, with
  a leave-one-out baseline, summed steps and summed log-probs, it is the unbiased REINFORCE estimator.
  Cost: T no-grad forwards + T forward/backward, one step in memory at a time.
* ``zo``: REINFORCE on every step, A (dmu_t/dtheta)^T eps_t/sigma_t summed over t (unbiased).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..sampling import Trajectory, model_step, sample_chain
from .advantages import BASELINES, BaselineState
from .config import EstimatorConfig, baseline_biases
from .notes import describe
from .partition import JSampler
from .problem import (ChainProblem, Estimate, batch_advantages, check_recomputed_step, evaluate_reward, reward_metrics,
                      valid_row_scale)
from .terms import likelihood_ratio_loss, ppo_loss


def _check_stochastic(problem: ChainProblem, steps, name: str) -> None:
    stds = problem.schedule.stds
    bad = [k for k in steps if stds[k] <= 0]
    if bad:
        raise ValueError(f"{name} needs sigma > 0 at every trained step, but sigma = 0 at steps {bad[:5]}; "
                         "set eta > 0")


@dataclass(frozen=True)
class DDPOConfig(EstimatorConfig):
    name = "ddpo"
    clip_range: float = 1e-4
    adv_clip: float | None = 5.0
    baseline: str = "per_prompt_norm"
    step_reduction: str = "mean"  # 'mean' (ddpo-pytorch) or 'sum' (the unbiased REINFORCE scale)
    logprob_reduction: str = "sum"  # 'sum' or 'mean' (ddpo-pytorch / trl: 1/D smaller gradients)

    def __post_init__(self) -> None:
        if self.clip_range <= 0:
            raise ValueError("clip_range must be > 0")
        if self.baseline not in BASELINES:
            raise ValueError(f"unknown baseline {self.baseline!r}; choose one of {list(BASELINES)}")
        if self.step_reduction not in ("mean", "sum") or self.logprob_reduction not in ("mean", "sum"):
            raise ValueError("step_reduction and logprob_reduction must be 'mean' or 'sum'")

    def check(self, problem: ChainProblem) -> None:
        _check_stochastic(problem, range(problem.num_steps), "ddpo")

    def biases(self, reward_differentiable: bool) -> list[str]:
        return baseline_biases(self.baseline, self.adv_clip)


def ddpo_update(problem: ChainProblem, traj: Trajectory, advantages: Tensor, config: DDPOConfig,
                metrics: dict[str, float], scale: float = 1.0, check: bool = True) -> float:
    """PPO pass over the steps of a stored trajectory (callable again for extra inner epochs: pass
    ``check=False`` once the parameters moved, since the recomputed means then differ by design).
    ``scale``: B / valid rows of the whole batch (``valid_row_scale``), so the loss is a mean over valid rows."""
    n, grads = problem.num_steps, problem.gradients(metrics)
    d = traj.latents[0][0].numel()
    step_scale = 1.0 / n if config.step_reduction == "mean" else 1.0
    kl = clipfrac = 0.0
    for k in range(n):
        step = model_step(problem.model, problem.schedule, problem.prompts, k, traj.latents[k], traj.noises[k])
        if check:
            check_recomputed_step(step, traj, k, metrics, what="a DDPO term")
        logp = step.log_prob_of(traj.latents[k + 1])
        old = traj.log_probs[:, k]
        if config.logprob_reduction == "mean":
            logp, old = logp / d, old / d
        loss, stats = ppo_loss(logp, old, advantages, config.clip_range, scale)
        grads.add_loss(step_scale * loss, "ppo")
        kl += stats["approx_kl"] / n
        clipfrac += stats["clipfrac"] / n
    metrics.update(approx_kl=kl, clipfrac=clipfrac)
    metrics["model_calls"] = metrics.get("model_calls", 0.0) + n
    metrics["model_calls_with_grad"] = metrics.get("model_calls_with_grad", 0.0) + n
    return grads.total


def _sample_and_advantages(problem: ChainProblem, x_T: Tensor, generator: torch.Generator | None, baseline: str,
                           state: BaselineState | None, adv_clip: float | None
                           ) -> tuple[Trajectory, Tensor, Tensor, float, dict[str, float]]:
    """Sample the (shard of the) batch without grad; advantages, the valid-row scale and reward metrics
    over the whole batch."""
    with torch.no_grad():
        traj = sample_chain(problem.model, problem.schedule, problem.prompts, x_T, generator=generator,
                            noise_shard=problem.noise_shard)
        rewards, _ = evaluate_reward(problem, traj.final)
    adv, all_rewards = batch_advantages(problem, rewards, baseline, state=state, clip=adv_clip)
    metrics = {**reward_metrics(all_rewards), "model_calls": float(problem.num_steps), "steps_in_memory": 1.0}
    return traj, rewards, adv, valid_row_scale(all_rewards), metrics


def ddpo_estimate(problem: ChainProblem, x_T: Tensor, *, config: DDPOConfig = DDPOConfig(),
                  generator: torch.Generator | None = None, baseline_state: BaselineState | None = None,
                  j_sampler: JSampler | None = None) -> Estimate:
    """One PPO pass over a freshly sampled batch (no j: ``j_sampler`` is unused)."""
    config.check(problem)
    describe(config).log()
    traj, rewards, adv, scale, metrics = _sample_and_advantages(problem, x_T, generator, config.baseline,
                                                                baseline_state, config.adv_clip)
    loss = ddpo_update(problem, traj, adv, config, metrics, scale)
    return Estimate(loss, metrics, rewards.detach(), traj, {"advantages": adv})


@dataclass(frozen=True)
class ZOConfig(EstimatorConfig):
    name = "zo"
    baseline: str = "loo"

    def __post_init__(self) -> None:
        if self.baseline not in BASELINES:
            raise ValueError(f"unknown baseline {self.baseline!r}; choose one of {list(BASELINES)}")

    def check(self, problem: ChainProblem) -> None:
        _check_stochastic(problem, range(problem.num_steps), "zo")

    def biases(self, reward_differentiable: bool) -> list[str]:
        return baseline_biases(self.baseline, None)


def zo_estimate(problem: ChainProblem, x_T: Tensor, *, config: ZOConfig = ZOConfig(),
                generator: torch.Generator | None = None, baseline_state: BaselineState | None = None,
                j_sampler: JSampler | None = None) -> Estimate:
    """Pure likelihood ratio on every step (no reward gradient needed; no j: ``j_sampler`` is unused)."""
    config.check(problem)
    describe(config).log()
    traj, rewards, adv, scale, metrics = _sample_and_advantages(problem, x_T, generator, config.baseline,
                                                                baseline_state, None)
    grads = problem.gradients(metrics)
    for k in range(problem.num_steps):
        step = model_step(problem.model, problem.schedule, problem.prompts, k, traj.latents[k], traj.noises[k])
        check_recomputed_step(step, traj, k, metrics, what="a likelihood-ratio term")
        grads.add_loss(likelihood_ratio_loss(step.mean, traj.latents[k + 1], step.std, adv, scale), "lr")
    metrics["model_calls"] += problem.num_steps
    metrics["model_calls_with_grad"] = float(problem.num_steps)
    return Estimate(grads.total, metrics, rewards.detach(), traj)
