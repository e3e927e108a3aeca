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
from .notes import describe
from .problem import (ChainProblem, Estimate, backward_if_finite, detach_rows, evaluate_reward, reward_metrics,
                      valid_row_scale)
from .terms import first_order_loss


@dataclass(frozen=True)
class TruncatedBPConfig:
    k: int = 2  # number of last steps backpropagated
    use_checkpoint: bool = False

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"truncated backprop needs k >= 1 steps, got {self.k}")

    def check(self, problem: ChainProblem) -> None:
        if not problem.reward_differentiable:
            raise ValueError("backprop estimators need a differentiable reward; use rlr, ddpo or zo")
        if self.k > problem.num_steps:
            raise ValueError(f"k={self.k} exceeds the {problem.num_steps} sampling steps")


@dataclass(frozen=True)
class FullBPConfig:
    use_checkpoint: bool = False  # recompute activations in backward: memory ~ 1 step, +T forwards

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
    loss = backward_if_finite(first_order_loss(rewards, valid, valid_row_scale(all_rewards)), metrics, "backprop",
                              problem.params)
    metrics.update(reward_metrics(all_rewards))
    return Estimate(loss, metrics, rewards.detach(), traj)


def truncated_bp_estimate(problem: ChainProblem, x_T: Tensor, *, config: TruncatedBPConfig = TruncatedBPConfig(),
                          generator: torch.Generator | None = None, **_: object) -> Estimate:
    config.check(problem)
    describe(config).log()
    return _backprop_last(problem, x_T, config.k, config.use_checkpoint, generator)


def full_bp_estimate(problem: ChainProblem, x_T: Tensor, *, config: FullBPConfig = FullBPConfig(),
                     generator: torch.Generator | None = None, **_: object) -> Estimate:
    config.check(problem)
    return _backprop_last(problem, x_T, problem.num_steps, config.use_checkpoint, generator)
