"""What the official RLR code (RTkenny/RLR-Optimizer, aff15b1 "Option 1") computes. For comparison only.

* Sampling with ``eta`` on every step except the last, which is deterministic (eta = 0).
* FO: DRaFT-1 through the last step, weight ``fo_coeff`` = 0.05.
* "HO": ``chain_len`` independent single-step PPO-clipped likelihood-ratio terms at steps drawn
  uniformly from all T steps (with replacement), log-probs averaged over elements (trl), rewards
  normalised by the batch mean and std, clip 1e-4, weight ``ho_coeff`` (0.001 in the aesthetic script).
  A draw that hits the deterministic last step gives a NaN log-ratio; the code then drops the whole
  HO sum for that batch (counted here as ``dropped_ho``).
* No zeroth-order complement, so the estimate is **biased** (the paper's own "w/o ZO" ablation).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..sampling import DDIMSchedule, model_step, sample_chain
from .advantages import BaselineState
from .config import EstimatorConfig
from .notes import describe
from .partition import JSampler
from .problem import (ChainProblem, Estimate, batch_advantages, check_recomputed_step, detach_rows, evaluate_reward,
                      reward_metrics, valid_row_scale)
from .terms import first_order_loss, ppo_loss


@dataclass(frozen=True)
class CodeCompatConfig(EstimatorConfig):
    name = "code_compat"
    chain_len: int = 2
    fo_coeff: float = 0.05
    ho_coeff: float = 0.001
    clip_range: float = 1e-4
    last_step_deterministic: bool = True

    @classmethod
    def from_settings(cls, s) -> "CodeCompatConfig":
        return cls(chain_len=s.chain_len)

    def biases(self, reward_differentiable: bool) -> list[str]:
        return ["the official code's estimate: no zeroth-order part, batch-normalised PPO-clipped terms with fixed "
                "weights"]

    def check(self, problem: ChainProblem) -> None:
        if not isinstance(problem.schedule, DDIMSchedule):
            raise ValueError("code_compat reproduces the official code's DDIM chain; it needs a DDIMSchedule, got "
                             f"{type(problem.schedule).__name__}")
        if not problem.reward_differentiable:
            raise ValueError("code_compat needs a differentiable reward (its FO term backpropagates it)")
        if self.chain_len < 0:
            raise ValueError("chain_len must be >= 0")


def code_compat_estimate(problem: ChainProblem, x_T: Tensor, *, config: CodeCompatConfig = CodeCompatConfig(),
                         generator: torch.Generator | None = None, baseline_state: BaselineState | None = None,
                         j_sampler: JSampler | None = None) -> Estimate:
    """The official code's estimate (its batch-normalised rewards need no carried baseline; no j: those
    arguments are unused)."""
    config.check(problem)
    describe(config).log()
    n = problem.num_steps
    sched = problem.schedule
    if config.last_step_deterministic:
        sched = sched.with_eta([*sched.etas[:-1], 0.0])
    prob = replace(problem, schedule=sched)
    with torch.no_grad():
        traj = sample_chain(prob.model, sched, prob.prompts, x_T, generator=generator, noise_shard=prob.noise_shard)
        rewards, valid = evaluate_reward(prob, traj.final)
    # the steps of the chain_len single-step PPO terms, drawn uniformly; a draw of the deterministic last step
    # gives the official code a NaN log-prob and it drops the whole HO sum. Drawn before any model call (the
    # generator is consumed as the official loop consumes it), so a dropped sum costs no forward.
    ho_steps: list[int] | None = []
    for _ in range(config.chain_len):
        k = int(torch.randint(0, n, (1,), generator=generator))
        if float(sched.sigma[k]) <= 0:
            ho_steps = None
            break
        ho_steps.append(k)
    ho_steps = ho_steps or []
    # calls that ran: sampling, the FO step, each kept PPO step; all of them held in one graph for one backward
    metrics = {"dropped_ho": float(len(ho_steps) < config.chain_len),
               "model_calls": float(n + 1 + len(ho_steps)), "model_calls_with_grad": float(1 + len(ho_steps)),
               "steps_in_memory": float(1 + len(ho_steps))}
    # FO through the last step
    k = n - 1
    step = model_step(prob.model, sched, prob.prompts, k, traj.latents[k], traj.noises[k])
    check_recomputed_step(step, traj, k, metrics, what="the first-order term")
    r_fo, _ = evaluate_reward(prob, detach_rows(step.prev_sample, valid))
    adv, all_rewards = batch_advantages(prob, rewards, "batch_norm")  # normalised by the whole batch's mean, std
    row_scale = valid_row_scale(all_rewards)
    loss = config.fo_coeff * first_order_loss(r_fo, valid, row_scale)
    # the single-step PPO terms
    d = traj.latents[0][0].numel()
    for k in ho_steps:
        step = model_step(prob.model, sched, prob.prompts, k, traj.latents[k], traj.noises[k])
        check_recomputed_step(step, traj, k, metrics, what="a PPO term")
        logp = step.log_prob_of(traj.latents[k + 1]) / d
        term, _ = ppo_loss(logp, traj.log_probs[:, k] / d, adv, config.clip_range, row_scale)
        loss = loss + config.ho_coeff * term
    grads = prob.gradients(metrics)
    grads.add_loss(loss, "code_compat")
    metrics.update(reward_metrics(all_rewards))
    return Estimate(grads.total, metrics, rewards.detach(), traj)
