"""A Gaussian sampler step, whatever the chain kind: x' = mean + std * noise, with its log-probability.

Every chain kind (DDIM/DDPM in ``ddim.py``, flow matching in ``flow.py``) computes a step's mean and
standard deviation from the model output and its coefficients, then hands them to ``gaussian_step``:
the one place in the project where a step is written. The log-probability is **summed** over all
non-batch elements (trl and ddpo-pytorch take the mean, which scales every likelihood-ratio gradient by
1/D).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def gaussian_log_prob(x: Tensor, mean: Tensor, std: float) -> Tensor:
    """log N(x; mean, std^2 I) summed over non-batch dims -> (B,). Returns zeros when std == 0."""
    if std <= 0:
        return torch.zeros(x.shape[0], dtype=mean.dtype, device=mean.device)
    d = x[0].numel()
    sq = ((x.detach() - mean) ** 2).flatten(1).sum(1)
    return -sq / (2 * std**2) - d * (math.log(std) + 0.5 * math.log(2 * math.pi))


@dataclass
class StepOutput:
    """One step x -> x' of a chain: x' = mean + std * noise (x' = mean when std == 0 or without noise)."""

    prev_sample: Tensor  # x', carries the graph when the mean does
    mean: Tensor  # carries the graph when the model output does
    std: float

    @property
    def log_prob(self) -> Tensor:
        """(B,) log p(prev_sample | x), summed over elements; 0 where std == 0."""
        return self.log_prob_of(self.prev_sample)

    def log_prob_of(self, x_next: Tensor) -> Tensor:
        """(B,) log-density of another x' under this step (e.g. the stored sample the step is recomputed for)."""
        return gaussian_log_prob(x_next, self.mean, self.std)


def gaussian_step(mean: Tensor, std: float, noise: Tensor | None) -> StepOutput:
    """x' = mean + std * noise: the step itself (``noise`` None: the mean only)."""
    prev = mean if std == 0 or noise is None else mean + std * noise
    return StepOutput(prev, mean, std)
