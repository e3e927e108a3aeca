"""Parameter-space perturbations for zeroth-order estimators, regenerated from seeds.

The direction for a seed is drawn from its own ``torch.Generator`` (never the global RNG, which
would also move sampling noise), so storing one integer per step is enough to rebuild it (MeZO).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import Tensor


def direction(params: Sequence[Tensor], seed: int) -> list[Tensor]:
    """A standard-normal direction with one tensor per parameter, reproducible from ``seed``."""
    gen = torch.Generator(device=params[0].device).manual_seed(int(seed))
    return [torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype) for p in params]


@contextlib.contextmanager
def perturbed(params: Sequence[Tensor], delta: Sequence[Tensor], scale: float) -> Iterator[None]:
    """Temporarily set theta <- theta + scale * delta; restores the exact original values."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, d in zip(params, delta):
            p.add_(d, alpha=scale)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


@contextlib.contextmanager
def zeroed(params: Sequence[Tensor]) -> Iterator[None]:
    """Temporarily set every parameter to 0 (a LoRA whose factors are 0 is the base model); restores them."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.zero_()
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
