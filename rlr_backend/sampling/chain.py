"""The sampling loop over a Denoiser: records everything an estimator needs to recompute a step.

``model_step`` is a step with its model call: the model's output at step k, then the schedule kind's
step function (``Schedule.step``). ``sample_chain`` runs x_T -> x_0 through it and returns a
``Trajectory`` (latents at every step, the Gaussian noises that were added, log-probabilities); every
estimator term recomputes steps through ``model_step`` with the stored noises. The caller decides per step whether the
model call keeps its graph (``grad_steps``; everything else runs under ``no_grad`` and so cuts the
graph), may wrap steps in a context (``step_context``, used to perturb parameters for zeroth-order
estimators) and may replay given noises (``noises``: common random numbers, exact recomputation).
A process that samples one shard of a batch split across processes (``noise_shard``) draws each
step's noise for the whole batch and keeps its own rows, so the shards together equal the unsplit batch.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, ContextManager

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint as _checkpoint

from .denoiser import Denoiser
from .prompt_schedule import PromptSchedule
from .schedule import Schedule
from .step import StepOutput

logger = logging.getLogger(__name__)


@dataclass
class Trajectory:
    """One sampled batch. ``latents[k]`` is the input of sampler step k, ``latents[T]`` is x_0.

    ``latents`` and ``noises`` are detached; ``final`` is x_0 with its graph when grad steps ran.
    """

    latents: list[Tensor]  # T+1 tensors (B, ...)
    noises: list[Tensor]  # T tensors; eps_k, the standard-normal draw of step k (zeros when std == 0)
    log_probs: Tensor  # (B, T) log p(latents[k+1] | latents[k]) at sampling time
    schedule: Schedule
    prompts: PromptSchedule
    final: Tensor  # x_0, with graph if any grad step ran
    x0_hats: list[Tensor] = field(default_factory=list)  # the model's x_0 estimate at step k's input (keep_x0_hats)

    @property
    def num_steps(self) -> int:
        return self.schedule.num_steps


def model_output(model: Denoiser, schedule: Schedule, prompts: PromptSchedule, k: int, x: Tensor,
                 *, use_checkpoint: bool = False) -> Tensor:
    """The model's output at sampler step k (that step's time and conditioning); with ``use_checkpoint``
    (and autograd on) its activations are recomputed in backward instead of kept."""
    t, cond = schedule.timesteps[k], prompts.cond_at(k)

    def run(x_in: Tensor) -> Tensor:
        return model(x_in, t, cond)

    if use_checkpoint and torch.is_grad_enabled():
        return _checkpoint(run, x, use_reentrant=False)
    return run(x)


def model_step(model: Denoiser, schedule: Schedule, prompts: PromptSchedule, k: int, x: Tensor,
               noise: Tensor | None, *, use_checkpoint: bool = False) -> StepOutput:
    """Sampler step k from input x: the model call, then the schedule's step function with ``noise``
    (None: the mean only). Estimator terms recompute a sampled step with its stored noise."""
    return schedule.step(k, model_output(model, schedule, prompts, k, x, use_checkpoint=use_checkpoint), x, noise)


def sample_chain(
    model: Denoiser,
    schedule: Schedule,
    prompts: PromptSchedule,
    x_T: Tensor,
    *,
    generator: torch.Generator | None = None,
    noises: list[Tensor] | None = None,
    grad_steps: Collection[int] = (),
    step_context: Callable[[int], ContextManager] | None = None,
    use_checkpoint: bool = False,
    callback: Callable[[dict[str, Any]], None] | None = None,
    noise_shard: tuple[int, int] | None = None,
    keep_x0_hats: bool = False,
) -> Trajectory:
    """Sample x_0 from x_T. ``noises`` (T tensors) replays given noises instead of drawing new ones.

    A step k in ``grad_steps`` runs with autograd on; its input keeps the graph of earlier grad steps,
    so ``grad_steps = range(T-K, T)`` is truncated backprop over the last K steps and ``range(T)``
    full backprop. ``use_checkpoint`` recomputes each grad step's activations in backward.
    ``noise_shard = (start, full_batch)``: ``x_T`` holds rows ``start .. start+B`` of a batch of
    ``full_batch``; each step draws (full_batch, ...) noise from ``generator`` and keeps those rows,
    so every process of a data-parallel run consumes the generator identically (None: draw (B, ...)).
    ``keep_x0_hats``: record the model's x_0 estimate at every step's input (the step baseline reads them;
    as much memory again as ``latents``, so off unless asked for).
    """
    if prompts.num_steps != schedule.num_steps:
        raise ValueError(f"prompt schedule has {prompts.num_steps} steps, the sampler {schedule.num_steps}")
    if noises is not None and len(noises) != schedule.num_steps:
        raise ValueError(f"need {schedule.num_steps} noises, got {len(noises)}")
    if noise_shard is not None:
        check_noise_shard(noise_shard, x_T.shape[0])
    n = schedule.num_steps
    grad_set = set(grad_steps)
    x = x_T.detach()
    latents, eps_list, logps, x0_hats = [x], [], [], []
    stds = schedule.stds
    for k in range(n):
        std = float(stds[k])
        ctx = step_context(k) if step_context is not None else contextlib.nullcontext()
        with ctx, torch.set_grad_enabled(k in grad_set):
            out = model_output(model, schedule, prompts, k, x, use_checkpoint=use_checkpoint)
            if std > 0:
                eps = noises[k] if noises is not None else draw_noise(x, out, generator, noise_shard)
            else:
                eps = torch.zeros(x.shape, dtype=step_dtype(x, out), device=x.device)
            step = schedule.step(k, out, x, eps)
            if keep_x0_hats:
                x0_hats.append(schedule.predicted_x0(k, out.detach(), x.detach()))
        logps.append(step.log_prob.detach())
        eps_list.append(eps.detach())
        latents.append(step.prev_sample.detach())
        if callback is not None:
            callback({"i": k, "x": step.prev_sample.detach(), "sigma": std, "t": schedule.timesteps[k]})
        x = step.prev_sample
    return Trajectory(latents, eps_list, torch.stack(logps, dim=1), schedule, prompts, x, x0_hats)


def check_noise_shard(noise_shard: tuple[int, int], rows: int) -> None:
    """Raise unless rows ``start .. start+rows`` lie inside a batch of ``full_batch``."""
    start, full_batch = noise_shard
    if not (0 <= start and start + rows <= full_batch):
        raise ValueError(f"noise_shard {tuple(noise_shard)} cannot hold a shard of {rows} rows: "
                         f"need 0 <= start and start + {rows} <= full_batch")


def step_dtype(x: Tensor, model_output: Tensor) -> torch.dtype:
    """The dtype of a step computed from ``x`` and the model's output (the noise is drawn in it)."""
    return torch.promote_types(x.dtype, model_output.dtype)


def draw_noise(x: Tensor, model_output: Tensor, generator: torch.Generator | None,
               noise_shard: tuple[int, int] | None = None) -> Tensor:
    """Standard-normal noise for the step from ``x``: x's shape, the step's dtype; with a shard, this shard's
    rows of a full-batch draw. Drawn on the generator's device and moved to x's: a CPU generator gives the
    same noise whether the model runs on the CPU or a GPU."""
    dtype = step_dtype(x, model_output)
    device = generator.device if generator is not None else x.device
    if noise_shard is None:
        return torch.randn(x.shape, generator=generator, device=device, dtype=dtype).to(x.device)
    start, full_batch = noise_shard
    full = torch.randn((full_batch, *x.shape[1:]), generator=generator, device=device, dtype=dtype)
    return full[start:start + x.shape[0]].to(x.device)
