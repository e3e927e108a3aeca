"""What every estimator works on: the chain, the reward, the trainable parameters, and its result."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..sampling import Denoiser, PromptSchedule, Schedule, StepOutput, Trajectory
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
    ``params`` are the trainable tensors: estimators add their gradients to their ``.grad`` (through
    ``Gradients``) and parameter-space zeroth-order estimators perturb them. ``groups`` (B,) are prompt
    ids, used by per-prompt baselines. ``shard`` (None: the whole batch is here) says which rows of a
    batch split across processes this one holds; ``x_T``, ``groups`` and the reward then cover those rows
    only. ``loss_scale`` multiplies every gradient written (fp16 training; the trainer divides it out
    again, see ``train.memory.DynamicLossScale``); reported loss values are not scaled.
    """

    model: Denoiser
    schedule: Schedule
    prompts: PromptSchedule
    reward: Callable[[Tensor], Tensor]
    params: Sequence[Tensor]
    reward_differentiable: bool = True
    groups: Tensor | None = None
    shard: BatchShard | None = None
    loss_scale: float = 1.0

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

    def gradients(self, metrics: dict[str, float]) -> "Gradients":
        """Where an estimate on this problem writes its gradients (counting dropped terms in ``metrics``)."""
        return Gradients(self.params, metrics, self.loss_scale)


@dataclass
class Estimate:
    """Result of one estimator call. Gradients of ``loss`` (the negated reward-gradient estimate)
    have been added to ``param.grad`` (by its ``Gradients``); ``loss`` is its value for logging."""

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
    r = r.to(x0.device)  # a reward scored elsewhere (ComfyUI's VAE on the CPU): masks and losses follow the latents
    return r, torch.isfinite(r.detach())


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


def check_recomputed_step(step: StepOutput, traj: Trajectory, k: int, metrics: dict[str, float],
                          rtol: float = RECOMPUTE_RTOL, what: str = "a likelihood-ratio term") -> None:
    """Raise ``RecomputationMismatch`` unless step k, recomputed with its stored noise eps_k, reproduces the
    sampled step: its ``prev_sample`` must be the stored x_{k+1}. A likelihood ratio taken at a mean that
    does not would score the wrong noise. The largest error seen goes to ``metrics["recompute_max_err"]``."""
    target = traj.latents[k + 1]
    err = float((step.prev_sample.detach() - target).abs().max())
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


class Gradients:
    """Where an estimator writes its gradients: each term's gradient is added to ``params``' ``.grad`` as the
    term is computed, in the order the terms run (micro-batches and terms sum into one ``.grad``), multiplied
    by ``scale`` (the problem's fp16 loss scale). ``total`` is the sum of the written terms' loss values.

    A term whose loss or gradient is NaN/inf is dropped and counted in ``metrics`` twice: in
    ``nonfinite_terms`` (all kinds) and in ``dropped_<name>_term`` (the trainer logs each kind once). The
    gradient is checked because a finite loss can still have a non-finite gradient (a reward whose backward
    pass overflows on some rows). Under fp16 loss scaling (``scale`` != 1) a non-finite gradient is counted
    but still written, so the loss scaler sees the overflow, skips the update and lowers its scale.
    """

    def __init__(self, params: Sequence[Tensor], metrics: dict[str, float], scale: float = 1.0):
        self.params, self.metrics, self.scale = list(params), metrics, float(scale)
        self.total = 0.0

    def of_loss(self, loss: Tensor, name: str) -> tuple[float, list[Tensor | None] | None]:
        """(the loss value, d(scale * loss)/d params: None for a parameter it does not reach), or (0, None)
        when the term is dropped (non-finite loss or gradient). Writes nothing."""
        value = float(loss.detach())
        key = "dropped_" + name.replace("-", "_").replace(" ", "_") + "_term"
        if not torch.isfinite(loss.detach()):
            self._count(key)
            logger.debug("skipping a non-finite %s term (value %s)", name, value)
            return 0.0, None
        if not loss.requires_grad:
            return value, None
        scaled = loss * self.scale if self.scale != 1.0 else loss
        trained = [p for p in self.params if p.requires_grad]
        it = iter(torch.autograd.grad(scaled, trained, allow_unused=True))
        grads = [next(it) if p.requires_grad else None for p in self.params]
        present = [g for g in grads if g is not None]
        if present and not bool(torch.stack([torch.isfinite(g).all() for g in present]).all()):
            self.metrics["nonfinite_terms"] = self.metrics.get("nonfinite_terms", 0.0) + 1
            if self.scale == 1.0:
                self.metrics[key] = self.metrics.get(key, 0.0) + 1
                logger.debug("dropping the %s term: its loss is finite (%s) but its gradient is not", name, value)
                return 0.0, None
            logger.warning("the %s term's gradient overflowed under fp16 loss scale %g; the update will be skipped",
                           name, self.scale)
        return value, grads

    def add(self, grads: Sequence[Tensor | None] | None) -> None:
        """param.grad += grad, for every parameter the gradient reaches."""
        for p, g in zip(self.params, grads or ()):
            if g is not None:
                if p.grad is None:
                    p.grad = g.detach()
                else:
                    p.grad.add_(g)

    def write(self, value: float, grads: Sequence[Tensor | None] | None) -> float:
        """Add a term's gradient (from ``of_loss``) and its value to the total; returns the value."""
        self.add(grads)
        self.total += value
        return value

    def add_loss(self, loss: Tensor, name: str) -> float:
        """Write the gradient of the term ``loss`` (``name`` labels it in the metrics); returns its value."""
        return self.write(*self.of_loss(loss, name))

    def add_direction(self, updates: Sequence[Tensor], coef: float) -> None:
        """param.grad += scale * coef * update (a term that yields its gradient directly: parameter-space ZO)."""
        coef *= self.scale
        for p, u in zip(self.params, updates):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.add_(u.to(p.grad.dtype), alpha=coef)

    def _count(self, key: str) -> None:
        self.metrics["nonfinite_terms"] = self.metrics.get("nonfinite_terms", 0.0) + 1
        self.metrics[key] = self.metrics.get(key, 0.0) + 1
