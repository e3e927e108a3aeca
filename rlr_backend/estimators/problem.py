"""What every estimator works on: the chain, the reward, the trainable parameters, and its result."""

from __future__ import annotations

import contextlib
import contextvars
import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..models.denoiser import Denoiser
from ..sampling import DDIMSchedule, PromptSchedule, Trajectory

logger = logging.getLogger(__name__)


class RewardOutputError(ValueError):
    """The reward returned something other than a (B,) tensor."""


class RecomputationMismatch(RuntimeError):
    """A recomputed sub-chain did not reproduce the stored latents (non-determinism or a changed prompt map)."""


@dataclass
class ChainProblem:
    """A sampler, its conditioning, a reward on x_0 and the parameters being trained.

    ``reward`` maps the final latents x_0 (B, ...) to rewards (B,); decoding to pixels is inside it.
    ``params`` are the trainable tensors: gradients are accumulated into their ``.grad`` and
    parameter-space zeroth-order estimators perturb them. ``groups`` (B,) are prompt ids, used by
    per-prompt baselines.
    """

    model: Denoiser
    schedule: DDIMSchedule
    prompts: PromptSchedule
    reward: Callable[[Tensor], Tensor]
    params: Sequence[Tensor]
    reward_differentiable: bool = True
    groups: Tensor | None = None

    @property
    def num_steps(self) -> int:
        return self.schedule.num_steps


@dataclass
class Estimate:
    """Result of one estimator call. Gradients of ``loss`` (the negated reward-gradient estimate)
    have already been accumulated into ``param.grad``; ``loss`` is its detached value for logging."""

    loss: float
    metrics: dict[str, float]
    rewards: Tensor  # (B,) rewards of the sampled batch, NaN where the reward failed
    trajectory: Trajectory
    extra: dict = field(default_factory=dict)


def evaluate_reward(problem: ChainProblem, x0: Tensor) -> tuple[Tensor, Tensor]:
    """Rewards (B,) and a mask of the finite ones. Raises ``RewardOutputError`` on a wrong shape."""
    r = problem.reward(x0)
    if not isinstance(r, Tensor) or r.shape != (x0.shape[0],):
        shape = tuple(r.shape) if isinstance(r, Tensor) else type(r).__name__
        raise RewardOutputError(
            f"the reward must return a tensor of shape ({x0.shape[0]},), one value per image; got {shape}"
        )
    return r, torch.isfinite(r.detach())


_LOSS_SCALE: contextvars.ContextVar[float] = contextvars.ContextVar("rlr_loss_scale", default=1.0)


@contextlib.contextmanager
def loss_scaling(scale: float):
    """Inside the block every gradient an estimator adds is multiplied by ``scale`` (fp16 training: the
    trainer divides it out again, see ``train.memory.DynamicLossScale``). Reported loss values are not."""
    token = _LOSS_SCALE.set(float(scale))
    try:
        yield
    finally:
        _LOSS_SCALE.reset(token)


def backward_if_finite(loss: Tensor, metrics: dict[str, float], name: str) -> float:
    """Backpropagate ``loss`` unless it is NaN/inf; skipped terms are counted in ``metrics``."""
    value = float(loss.detach())
    if not torch.isfinite(loss.detach()):
        metrics["nonfinite_terms"] = metrics.get("nonfinite_terms", 0.0) + 1
        logger.warning("skipping a non-finite %s term (value %s)", name, value)
        return 0.0
    if loss.requires_grad:
        scale = _LOSS_SCALE.get()
        (loss * scale if scale != 1.0 else loss).backward()
    return value


def add_to_grad(params: Sequence[Tensor], updates: Sequence[Tensor], scale: float) -> None:
    """param.grad += scale * update (for estimators that produce a gradient directly)."""
    scale *= _LOSS_SCALE.get()
    for p, u in zip(params, updates):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.add_(u.to(p.grad.dtype), alpha=scale)
