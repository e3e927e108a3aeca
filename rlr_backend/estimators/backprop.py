"""Backprop baselines: truncated (AlignProp / DRaFT-K) and full backpropagation through the chain.

* ``truncated_bp`` (K): grad dR/dx_0 through the last K steps, earlier steps detached.
  Biased: it drops the share of every earlier step (Prop. 6.1). K forward/backward with the
  reward and decoder backward; K steps of activations held at once.
* ``full_bp``: K = T. Unbiased; T steps of activations in memory (optionally recomputed in
  backward with gradient checkpointing: ~1 step held, one extra forward per step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..sampling import sample_chain
from .advantages import BaselineState
from .config import EstimatorConfig
from .notes import describe
from .partition import JSampler
from .problem import ChainProblem, Estimate, detach_rows, evaluate_reward, reward_metrics, valid_row_scale
from .terms import first_order_loss


@dataclass(frozen=True)
class TruncatedBPConfig(EstimatorConfig):
    name = "truncated_bp"
    k: int = 2  # number of last steps backpropagated
    use_checkpoint: bool = False

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"truncated backprop needs k >= 1 steps, got {self.k}")

    @classmethod
    def from_settings(cls, s) -> "TruncatedBPConfig":
        return cls(k=s.truncation, use_checkpoint=s.gradient_checkpointing)

    def biases(self, reward_differentiable: bool) -> list[str]:
        return [f"truncated backprop through the last {self.k} step(s) drops the earlier steps' share"]

    def check(self, problem: ChainProblem) -> None:
        if not problem.reward_differentiable:
            raise ValueError("backprop estimators need a differentiable reward; use rlr, ddpo or zo")
        if self.k > problem.num_steps:
            raise ValueError(f"k={self.k} exceeds the {problem.num_steps} sampling steps")


@dataclass(frozen=True)
class FullBPConfig(EstimatorConfig):
    name = "full_bp"
    use_checkpoint: bool = False  # recompute activations in backward: memory ~ 1 step, +T forwards

    @classmethod
    def from_settings(cls, s) -> "FullBPConfig":
        return cls(use_checkpoint=s.gradient_checkpointing)

    def check(self, problem: ChainProblem) -> None:
        TruncatedBPConfig(1).check(problem)


def _backprop_last(problem: ChainProblem, x_T: Tensor, k: int, use_checkpoint: bool,
                   generator: torch.Generator | None) -> Estimate:
    n = problem.num_steps
    traj = sample_chain(problem.model, problem.schedule, problem.prompts, x_T, generator=generator,
                        grad_steps=range(n - k, n), use_checkpoint=use_checkpoint, noise_shard=problem.noise_shard)
    rewards, valid = evaluate_reward(problem, traj.final)
    if not bool(valid.all()):  # again with the failed rows detached: their reward's backward may be NaN too
        rewards = evaluate_reward(problem, detach_rows(traj.final, valid))[0]
    all_rewards = problem.gather(rewards.detach())
    metrics = {"model_calls": float(n + (k if use_checkpoint else 0)),
               "model_calls_with_grad": float(k), "steps_in_memory": float(1 if use_checkpoint else k)}
    grads = problem.gradients(metrics)
    grads.add_loss(first_order_loss(rewards, valid, valid_row_scale(all_rewards)), "backprop")
    metrics.update(reward_metrics(all_rewards))
    return Estimate(grads.total, metrics, rewards.detach(), traj)


def truncated_bp_estimate(problem: ChainProblem, x_T: Tensor, *, config: TruncatedBPConfig = TruncatedBPConfig(),
                          generator: torch.Generator | None = None, baseline_state: BaselineState | None = None,
                          j_sampler: JSampler | None = None) -> Estimate:
    """Backprop through the last ``config.k`` steps (no baseline, no j: those arguments are unused)."""
    config.check(problem)
    describe(config).log()
    return _backprop_last(problem, x_T, config.k, config.use_checkpoint, generator)


def full_bp_estimate(problem: ChainProblem, x_T: Tensor, *, config: FullBPConfig = FullBPConfig(),
                     generator: torch.Generator | None = None, baseline_state: BaselineState | None = None,
                     j_sampler: JSampler | None = None) -> Estimate:
    """Backprop through every step (no baseline, no j: those arguments are unused)."""
    config.check(problem)
    return _backprop_last(problem, x_T, problem.num_steps, config.use_checkpoint, generator)
