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
def _changed(params: Sequence[Tensor], change) -> Iterator[None]:
    """Apply ``change(param, i)`` in place to every parameter, then restore the exact original values."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for i, p in enumerate(params):
            change(p, i)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


def perturbed(params: Sequence[Tensor], delta: Sequence[Tensor], scale: float):
    """Temporarily set theta <- theta + scale * delta; restores the exact original values."""
    return _changed(params, lambda p, i: p.add_(delta[i], alpha=scale))


def zeroed(params: Sequence[Tensor]):
    """Temporarily set every parameter to 0 (a LoRA whose factors are 0 is the base model); restores them."""
    return _changed(params, lambda p, i: p.zero_())
