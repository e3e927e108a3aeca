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
from .advantages import BaselineState, compute_advantages

logger = logging.getLogger(__name__)


class RewardOutputError(ValueError):
    """The reward returned something other than a (B,) tensor."""


class RecomputationMismatch(RuntimeError):
    """A recomputed sub-chain did not reproduce the stored latents (non-determinism or a changed prompt map)."""


@dataclass(frozen=True)
class BatchShard:
    """This process's rows ``start .. start+size`` of a batch of ``total`` samples split across processes.

    ``gather`` concatenates a per-sample tensor (size, ...) of every process, in process order, into
    (total, ...); ``mean`` averages a tensor elementwise over the processes. The trainer supplies
    them (``rlr_backend.train.distributed``); the estimators call them, in the same order on every
    process, so that batch statistics (baselines, reward means, zeroth-order coefficients) are those
    of the whole batch and a data-parallel run computes what one process would.
    """

    start: int
    size: int
    total: int
    gather: Callable[[Tensor], Tensor]
    mean: Callable[[Tensor], Tensor]

    def __post_init__(self) -> None:
        if not (self.size >= 1 and 0 <= self.start and self.start + self.size <= self.total):
            raise ValueError(f"a shard of rows {self.start}..{self.start + self.size} does not fit a batch of {self.total}")

    @property
    def rows(self) -> slice:
        """This shard's rows of a whole-batch tensor."""
        return slice(self.start, self.start + self.size)


@dataclass
class ChainProblem:
    """A sampler, its conditioning, a reward on x_0 and the parameters being trained.

    ``reward`` maps the final latents x_0 (B, ...) to rewards (B,); decoding to pixels is inside it.
    ``params`` are the trainable tensors: gradients are accumulated into their ``.grad`` and
    parameter-space zeroth-order estimators perturb them. ``groups`` (B,) are prompt ids, used by
    per-prompt baselines. ``shard`` (None: the whole batch is here) says which rows of a batch split
    across processes this one holds; ``x_T``, ``groups`` and the reward then cover those rows only.
    """

    model: Denoiser
    schedule: DDIMSchedule
    prompts: PromptSchedule
    reward: Callable[[Tensor], Tensor]
    params: Sequence[Tensor]
    reward_differentiable: bool = True
    groups: Tensor | None = None
    shard: BatchShard | None = None

    @property
    def num_steps(self) -> int:
        return self.schedule.num_steps

    @property
    def noise_shard(self) -> tuple[int, int] | None:
        """``sample_chain``'s (start, full_batch), or None for an unsplit batch."""
        return None if self.shard is None else (self.shard.start, self.shard.total)

    def gather(self, per_sample: Tensor) -> Tensor:
        """The whole batch's values of a per-sample tensor (itself when the batch is not split)."""
        return per_sample if self.shard is None else self.shard.gather(per_sample)

    def local(self, whole_batch: Tensor) -> Tensor:
        """This process's rows of a whole-batch tensor (itself when the batch is not split)."""
        return whole_batch if self.shard is None else whole_batch[self.shard.rows]

    def mean_over_shards(self, value: Tensor) -> Tensor:
        """The mean over processes of a tensor computed from this shard (itself when not split)."""
        return value if self.shard is None else self.shard.mean(value)


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


def batch_advantages(problem: ChainProblem, rewards: Tensor, kind: str, *, state: BaselineState | None = None,
                     clip: float | None = None) -> tuple[Tensor, Tensor]:
    """(advantages of this shard's samples, rewards of the whole batch).

    The baseline is computed on the whole batch's rewards and prompt ids (gathered from every
    process when the batch is split), so leave-one-out, batch and per-prompt statistics and the
    carried ``state`` are the same on every process and equal to an unsplit run's.
    """
    all_rewards = problem.gather(rewards)
    groups = problem.gather(problem.groups) if problem.groups is not None else None
    adv = compute_advantages(all_rewards, kind, groups=groups, state=state, clip=clip)
    return problem.local(adv), all_rewards


#: default tolerance of ``check_recomputed_step``, relative to max |x| + 1
RECOMPUTE_RTOL = 1e-4


def check_recomputed_step(mean: Tensor, sigma: float, traj: Trajectory, k: int, metrics: dict[str, float],
                          rtol: float = RECOMPUTE_RTOL, what: str = "a likelihood-ratio term") -> None:
    """Raise ``RecomputationMismatch`` unless a recomputed step mean reproduces the sampled step:
    mean + sigma * eps_k must give the stored x_{k+1}. A likelihood ratio taken at a mean that does not
    would score the wrong noise. Costs a few elementwise operations; the largest error seen goes to
    ``metrics["recompute_max_err"]``."""
    target = traj.latents[k + 1]
    err = float((mean.detach() + sigma * traj.noises[k] - target).abs().max())
    metrics["recompute_max_err"] = max(metrics.get("recompute_max_err", 0.0), err)
    tol = rtol * (float(target.abs().max()) + 1.0)
    if not err <= tol:
        raise RecomputationMismatch(
            f"recomputing sampler step {k} for {what} gave latents {err:.3g} away from the sampled ones "
            f"(tolerance {tol:.3g}): the model or the prompt schedule is not deterministic between sampling and "
            "recomputation (dropout on? a different prompt per step?)"
        )


def valid_row_scale(all_rewards: Tensor) -> float:
    """B / (number of finite rewards) of the whole batch: the ``scale`` that turns a term's mean over the
    rows (failed rows adding 0) into the mean over the valid rows. Every term of every estimator uses it,
    so the terms keep their relative weights when some rewards are NaN; with a batch split across
    processes, each shard's mean over its rows times this scale averages to the whole batch's valid mean."""
    n = int(torch.isfinite(all_rewards.detach()).sum())
    return all_rewards.numel() / n if n else 0.0


def reward_metrics(rewards: Tensor) -> dict[str, float]:
    """Mean, std and number of non-finite values of a batch's rewards (pass the whole batch's)."""
    r = rewards.detach()
    valid = torch.isfinite(r)
    return {"nonfinite_rewards": float((~valid).sum()),
            "reward_mean": float(r[valid].mean()) if valid.any() else float("nan"),
            "reward_std": float(r[valid].std()) if valid.sum() > 1 else 0.0}


def detach_rows(x: Tensor, keep: Tensor) -> Tensor:
    """``x`` with the graph kept only on rows where ``keep`` (B,) is True: a reward's backward pass through
    a row whose reward failed (NaN, often with a NaN derivative) then cannot reach the parameters."""
    return torch.where(keep.view(-1, *[1] * (x.dim() - 1)), x, x.detach())


def _count_dropped(metrics: dict[str, float], name: str) -> None:
    """Count a dropped term twice: in ``nonfinite_terms`` (all kinds) and in ``dropped_<name>_term``
    (the trainer logs each kind once per run)."""
    metrics["nonfinite_terms"] = metrics.get("nonfinite_terms", 0.0) + 1
    key = "dropped_" + name.replace("-", "_").replace(" ", "_") + "_term"
    metrics[key] = metrics.get(key, 0.0) + 1


def backward_if_finite(loss: Tensor, metrics: dict[str, float], name: str,
                       params: Sequence[Tensor] | None = None) -> float:
    """Add the gradient of ``loss`` to ``params``' ``.grad`` unless the loss or that gradient is NaN/inf.

    A skipped term is counted (:func:`_count_dropped`). The gradient is checked because a finite loss
    can still have a non-finite gradient (a reward whose backward pass overflows on some rows). Under
    fp16 loss scaling (``loss_scaling``) a non-finite gradient is counted in ``nonfinite_terms`` but
    still written, so the loss scaler sees the overflow, skips the update and lowers its scale. Without
    ``params`` the loss is back-propagated into every leaf and only its value is checked.
    """
    value = float(loss.detach())
    if not torch.isfinite(loss.detach()):
        _count_dropped(metrics, name)
        logger.debug("skipping a non-finite %s term (value %s)", name, value)
        return 0.0
    if not loss.requires_grad:
        return value
    scale = _LOSS_SCALE.get()
    scaled = loss * scale if scale != 1.0 else loss
    if params is None:
        scaled.backward()
        return value
    params = [p for p in params if p.requires_grad]
    grads = torch.autograd.grad(scaled, params, allow_unused=True)
    present = [g for g in grads if g is not None]
    if present and not bool(torch.stack([torch.isfinite(g).all() for g in present]).all()):
        if scale == 1.0:
            _count_dropped(metrics, name)
            logger.debug("dropping the %s term: its loss is finite (%s) but its gradient is not", name, value)
            return 0.0
        metrics["nonfinite_terms"] = metrics.get("nonfinite_terms", 0.0) + 1
        logger.warning("the %s term's gradient overflowed under fp16 loss scale %g; the update will be skipped",
                       name, scale)
    for p, g in zip(params, grads):
        if g is not None:
            if p.grad is None:
                p.grad = g.detach()
            else:
                p.grad.add_(g)
    return value


def add_to_grad(params: Sequence[Tensor], updates: Sequence[Tensor], scale: float) -> None:
    """param.grad += scale * update (for estimators that produce a gradient directly)."""
    scale *= _LOSS_SCALE.get()
    for p, u in zip(params, updates):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.add_(u.to(p.grad.dtype), alpha=scale)
