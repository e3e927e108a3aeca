"""Score-function baselines: DDPO (PPO-clipped, per-step) and pure likelihood ratio (``zo``).

* ``ddpo`` (Black et al. 2023, kvablack/ddpo-pytorch): per step k, recompute log p_theta(x_{k+1}|x_k)
  on the stored latents, ratio r = exp(logp - logp_old), loss mean_b max(-A r, -A clip(r, 1+-eps)).
  ddpo-pytorch defaults: advantages normalised per prompt, |A| clipped at 5, clip 1e-4, the loss
  averaged over timesteps (it accumulates gradients over them) and log-probs averaged over elements.
  Here log-probs are summed unless ``logprob_reduction='mean'``. On the first update r = 1 and, with
  a leave-one-out baseline, summed steps and summed log-probs, it is the unbiased REINFORCE estimator.
  Cost: T no-grad forwards + T forward/backward, one step in memory at a time.
  A deterministic step (std 0: eta = 0, a flow chain's ODE step outside its SDE window, cps's last step)
  has no likelihood ratio: DDPO refuses the chain, unless ``skip_deterministic`` trains the stochastic
  steps only (MixGRPO / Flow-GRPO-Fast window training; biased, the other steps' shares are dropped).
* ``zo``: REINFORCE on every step, A (dmu_t/dtheta)^T eps_t/sigma_t summed over t (unbiased); refuses a chain
  with a deterministic step. ``step_baseline``: A_t is step t's own (``step_baseline.step_advantages``), as in
  RLR's likelihood-ratio terms; still unbiased, one decode + reward per step.
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
from .step_baseline import STEP_BASELINE_KINDS, step_advantages
from .terms import likelihood_ratio_loss, ppo_loss


def _check_stochastic(problem: ChainProblem, steps, name: str, hint: str = "") -> None:
    stds = problem.schedule.stds
    bad = [k for k in steps if stds[k] <= 0]
    if bad:
        raise ValueError(f"{name} takes a likelihood ratio at every trained step, but sampler steps {bad[:5]}"
                         f"{'...' if len(bad) > 5 else ''} are deterministic (std 0: eta = 0 there, an ODE step "
                         f"outside the SDE window, or cps's step to sigma = 0); set eta > 0{hint}")


@dataclass(frozen=True)
class DDPOConfig(EstimatorConfig):
    name = "ddpo"
    clip_range: float = 1e-4
    adv_clip: float | None = 5.0
    baseline: str = "per_prompt_norm"
    step_reduction: str = "mean"  # 'mean' (ddpo-pytorch) or 'sum' (the unbiased REINFORCE scale)
    logprob_reduction: str = "sum"  # 'sum' or 'mean' (ddpo-pytorch / trl: 1/D smaller gradients)
    # train the stochastic steps only (a flow chain's SDE window, MixGRPO / Flow-GRPO-Fast; cps's last step):
    # the deterministic steps' shares of the gradient are dropped, so it is biased where the chain has any
    skip_deterministic: bool = False

    def __post_init__(self) -> None:
        if self.clip_range <= 0:
            raise ValueError("clip_range must be > 0")
        if self.baseline not in BASELINES:
            raise ValueError(f"unknown baseline {self.baseline!r}; choose one of {list(BASELINES)}")
        if self.step_reduction not in ("mean", "sum") or self.logprob_reduction not in ("mean", "sum"):
            raise ValueError("step_reduction and logprob_reduction must be 'mean' or 'sum'")

    @classmethod
    def from_settings(cls, settings) -> "DDPOConfig":
        return cls(skip_deterministic=bool(getattr(settings, "skip_deterministic", False)))

    def check(self, problem: ChainProblem) -> None:
        if not self.skip_deterministic:
            _check_stochastic(problem, range(problem.num_steps), "ddpo",
                              ", or skip_deterministic (--skip-deterministic) to train the stochastic steps only (biased: the "
                              "deterministic steps' shares are dropped)")
        elif not trained_steps(problem, self):
            raise ValueError("ddpo with skip_deterministic=True needs at least one stochastic step, but every step "
                             "of the chain is deterministic; set eta > 0")

    def biases(self, reward_differentiable: bool) -> list[str]:
        out = baseline_biases(self.baseline, self.adv_clip)
        if self.skip_deterministic:
            out.append("skip_deterministic: the deterministic (ODE) steps of the chain, if any, are not trained and "
                       "their shares of the gradient are dropped (window training)")
        return out


def trained_steps(problem: ChainProblem, config: DDPOConfig) -> list[int]:
    """The sampler steps DDPO takes a likelihood ratio at: every step, or the stochastic ones with
    ``skip_deterministic``."""
    if not config.skip_deterministic:
        return list(range(problem.num_steps))
    stds = problem.schedule.stds
    return [k for k in range(problem.num_steps) if stds[k] > 0]


def ddpo_update(problem: ChainProblem, traj: Trajectory, advantages: Tensor, config: DDPOConfig,
                metrics: dict[str, float], scale: float = 1.0, check: bool = True) -> float:
    """PPO pass over the steps of a stored trajectory (callable again for extra inner epochs: pass
    ``check=False`` once the parameters moved, since the recomputed means then differ by design).
    ``scale``: B / valid rows of the whole batch (``valid_row_scale``), so the loss is a mean over valid rows."""
    steps, grads = trained_steps(problem, config), problem.gradients(metrics)
    n = len(steps)
    d = traj.latents[0][0].numel()
    step_scale = 1.0 / n if config.step_reduction == "mean" else 1.0
    kl = clipfrac = 0.0
    for k in steps:
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
                           state: BaselineState | None, adv_clip: float | None, keep_x0_hats: bool = False
                           ) -> tuple[Trajectory, Tensor, Tensor, float, dict[str, float]]:
    """Sample the (shard of the) batch without grad; advantages, the valid-row scale and reward metrics
    over the whole batch."""
    with torch.no_grad():
        traj = sample_chain(problem.model, problem.schedule, problem.prompts, x_T, generator=generator,
                            noise_shard=problem.noise_shard, keep_x0_hats=keep_x0_hats)
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
    step_baseline: bool = False  # subtract R(x0_hat(x_t)) at each step t, as RLR does (``step_baseline``)

    def __post_init__(self) -> None:
        if self.baseline not in BASELINES:
            raise ValueError(f"unknown baseline {self.baseline!r}; choose one of {list(BASELINES)}")
        if self.step_baseline and self.baseline not in STEP_BASELINE_KINDS:
            raise ValueError(f"step_baseline needs baseline in {list(STEP_BASELINE_KINDS)}, got {self.baseline!r}")

    @classmethod
    def from_settings(cls, settings) -> "ZOConfig":
        return cls(step_baseline=settings.step_baseline)

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
                                                                baseline_state, None, config.step_baseline)
    step_adv: dict[int, Tensor] = {}
    if config.step_baseline:
        step_adv, failed = step_advantages(problem, traj, rewards, range(problem.num_steps), config.baseline)
        metrics.update(step_baseline_rewards=float(len(step_adv)), step_baseline_nonfinite=float(failed))
    grads = problem.gradients(metrics)
    for k in range(problem.num_steps):
        step = model_step(problem.model, problem.schedule, problem.prompts, k, traj.latents[k], traj.noises[k])
        check_recomputed_step(step, traj, k, metrics, what="a likelihood-ratio term")
        grads.add_loss(likelihood_ratio_loss(step.mean, traj.latents[k + 1], step.std, step_adv.get(k, adv), scale),
                       "lr")
    metrics["model_calls"] += problem.num_steps
    metrics["model_calls_with_grad"] = float(problem.num_steps)
    return Estimate(grads.total, metrics, rewards.detach(), traj)
