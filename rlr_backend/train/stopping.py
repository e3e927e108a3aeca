"""Stopping a run within one denoising step: the trainer's ``should_stop`` checked at every model call.

``StopCheckingDenoiser`` wraps the trainer's denoiser. Before each call (sampling, the estimator's
passes with gradient, evaluation) it asks ``should_stop()``; when gradients flow through the call's
output, a hook asks again when backward reaches that step. A True answer raises ``StopRequested``,
which the trainer catches: the update in progress is abandoned (no optimizer step), and the LoRA of
the last finished update is written as usual.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor


class StopRequested(Exception):
    """``should_stop()`` said True in the middle of a phase (raised from a model call or its backward)."""


class StopCheckingDenoiser:
    """A Denoiser that raises ``StopRequested`` at the first model call (or backward through one) after
    ``should_stop()`` turns True. Other attributes are the wrapped denoiser's."""

    def __init__(self, denoiser: Callable[..., Tensor], should_stop: Callable[[], bool]):
        self.inner, self.should_stop = denoiser, should_stop

    def check(self, grad: Tensor | None = None) -> None:
        if self.should_stop():
            raise StopRequested()

    def __call__(self, x: Tensor, timestep: int, cond: Any) -> Tensor:
        self.check()
        out = self.inner(x, timestep, cond)
        if out.requires_grad:
            out.register_hook(self.check)  # once per step during backward; returns None: gradient unchanged
        return out

    def __getattr__(self, name: str):
        if name == "inner":  # not set yet (copy, unpickling)
            raise AttributeError(name)
        return getattr(self.inner, name)
