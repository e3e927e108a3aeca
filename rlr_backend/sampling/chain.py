"""The sampling loop over a Denoiser: records everything an estimator needs to recompute a step.

``sample_chain`` runs x_T -> x_0 and returns a ``Trajectory`` (latents at every step, the Gaussian
noises that were added, log-probabilities and step std). The caller decides per step whether the
model call keeps its graph (``grad_steps``; everything else runs under ``no_grad`` and so cuts the
graph), may wrap steps in a context (``step_context``, used to perturb parameters for zeroth-order
estimators) and may replay given noises (``noises``: common random numbers, exact recomputation).
A process that samples one shard of a batch split across processes (``noise_shard``) draws each
step's noise for the whole batch and keeps its own rows, so the shards together equal the unsplit batch.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Collection, ContextManager

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint as _checkpoint

from ..models.denoiser import Denoiser
from .ddim import ddim_mean, gaussian_log_prob
from .prompt_schedule import PromptSchedule
from .schedule import DDIMSchedule

logger = logging.getLogger(__name__)


@dataclass
class Trajectory:
    """One sampled batch. ``latents[k]`` is the input of sampler step k, ``latents[T]`` is x_0.

    ``latents`` and ``noises`` are detached; ``final`` is x_0 with its graph when grad steps ran.
    """

    latents: list[Tensor]  # T+1 tensors (B, ...)
    noises: list[Tensor]  # T tensors; eps_k, the standard-normal draw of step k (zeros when std == 0)
    log_probs: Tensor  # (B, T) log p(latents[k+1] | latents[k]) at sampling time
    schedule: DDIMSchedule
    prompts: PromptSchedule
    final: Tensor  # x_0, with graph if any grad step ran

    @property
    def num_steps(self) -> int:
        return self.schedule.num_steps


def step_mean(model: Denoiser, schedule: DDIMSchedule, prompts: PromptSchedule, k: int, x: Tensor,
              *, use_checkpoint: bool = False) -> tuple[Tensor, float]:
    """(mu_k, sigma_k) of sampler step k from input x: the one place a model call becomes a DDIM mean."""
    sigma = float(schedule.sigma[k])
    a_t, a_prev = float(schedule.alpha_t[k]), float(schedule.alpha_prev[k])
    t, cond = schedule.timesteps[k], prompts.cond_at(k)

    def run(x_in: Tensor) -> Tensor:
        out = model(x_in, t, cond)
        return ddim_mean(out, x_in, a_t, a_prev, sigma, schedule.prediction_type, schedule.clip_sample_range)

    if use_checkpoint and torch.is_grad_enabled():
        return _checkpoint(run, x, use_reentrant=False), sigma
    return run(x), sigma


def sample_chain(
    model: Denoiser,
    schedule: DDIMSchedule,
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
) -> Trajectory:
    """Sample x_0 from x_T. ``noises`` (T tensors) replays given noises instead of drawing new ones.

    A step k in ``grad_steps`` runs with autograd on; its input keeps the graph of earlier grad steps,
    so ``grad_steps = range(T-K, T)`` is truncated backprop over the last K steps and ``range(T)``
    full backprop. ``use_checkpoint`` recomputes each grad step's activations in backward.
    ``noise_shard = (start, full_batch)``: ``x_T`` holds rows ``start .. start+B`` of a batch of
    ``full_batch``; each step draws (full_batch, ...) noise from ``generator`` and keeps those rows,
    so every process of a data-parallel run consumes the generator identically (None: draw (B, ...)).
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
    latents, eps_list, logps = [x], [], []
    for k in range(n):
        ctx = step_context(k) if step_context is not None else contextlib.nullcontext()
        with ctx, torch.set_grad_enabled(k in grad_set):
            mean, sigma = step_mean(model, schedule, prompts, k, x, use_checkpoint=use_checkpoint)
            if sigma > 0:
                eps = noises[k] if noises is not None else draw_noise(mean, generator, noise_shard)
            else:
                eps = torch.zeros_like(mean)
            x_next = mean + sigma * eps if sigma > 0 else mean
        logps.append(gaussian_log_prob(x_next, mean, sigma).detach())
        eps_list.append(eps.detach())
        latents.append(x_next.detach())
        if callback is not None:
            callback({"i": k, "x": x_next.detach(), "sigma": sigma, "t": schedule.timesteps[k]})
        x = x_next
    return Trajectory(latents, eps_list, torch.stack(logps, dim=1), schedule, prompts, x)


def check_noise_shard(noise_shard: tuple[int, int], rows: int) -> None:
    """Raise unless rows ``start .. start+rows`` lie inside a batch of ``full_batch``."""
    start, full_batch = noise_shard
    if not (0 <= start and start + rows <= full_batch):
        raise ValueError(f"noise_shard {tuple(noise_shard)} cannot hold a shard of {rows} rows: "
                         f"need 0 <= start and start + {rows} <= full_batch")


def draw_noise(like: Tensor, generator: torch.Generator | None,
               noise_shard: tuple[int, int] | None = None) -> Tensor:
    """Standard-normal noise shaped like ``like``; with a shard, this shard's rows of a full-batch draw.
    Drawn on the generator's device and moved to ``like``'s: a CPU generator gives the same noise
    whether the model runs on the CPU or a GPU."""
    device = generator.device if generator is not None else like.device
    if noise_shard is None:
        return torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype).to(like.device)
    start, full_batch = noise_shard
    full = torch.randn((full_batch, *like.shape[1:]), generator=generator, device=device, dtype=like.dtype)
    return full[start:start + like.shape[0]].to(like.device)
