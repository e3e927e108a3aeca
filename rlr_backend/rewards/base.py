"""The one reward interface, and combinators over it.

A reward takes images as float (B, 3, H, W) in [0, 1] and their prompts, and returns a (B,) tensor
(higher is better). ``differentiable`` says whether gradients flow from the value to the images;
first-order estimators need it, likelihood-ratio ones do not.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class Reward(Protocol):
    differentiable: bool
    name: str

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor: ...


class CallableReward:
    """Wrap a user's Python function ``fn(images, prompts) -> (B,) tensor`` as a reward."""

    def __init__(self, fn: Callable[[Tensor, Sequence[str]], Tensor], *, differentiable: bool = False,
                 name: str | None = None):
        if not callable(fn):
            raise TypeError(f"a custom reward must be callable, got {type(fn).__name__}")
        self.fn, self.differentiable = fn, bool(differentiable)
        self.name = name or getattr(fn, "__name__", "custom")

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.fn(images, prompts)


class WeightedSum:
    """sum_i w_i R_i; differentiable only if every part is."""

    def __init__(self, parts: Sequence[tuple[Reward, float]]):
        if not parts:
            raise ValueError("a weighted reward needs at least one part")
        self.parts = list(parts)
        self.differentiable = all(r.differentiable for r, _ in self.parts)
        self.name = "+".join(f"{w:g}*{r.name}" for r, w in self.parts)

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        total = None
        for reward, weight in self.parts:
            value = weight * reward(images, prompts)
            total = value if total is None else total + value
        return total


def check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"rewards take images of shape (B, 3, H, W) in [0, 1], got {shape}")


def to_uint8(images: Tensor) -> torch.Tensor:
    return (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
