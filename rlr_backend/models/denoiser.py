"""The small protocol every sampler and estimator runs on.

A ``Denoiser`` maps a noisy batch ``x`` at a discrete training timestep to the model output the
schedule's ``prediction_type`` names (noise, v or x_0). Conditioning (text embeddings, guidance) is
opaque to samplers: they pass the object a ``PromptSchedule`` returns for the step, unchanged.
Adapters wrap real models (``DiffusersUNetDenoiser``; the analytic test chain; ComfyUI's MODEL).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class Denoiser(Protocol):
    def __call__(self, x: Tensor, timestep: int, cond: Any) -> Tensor:
        """Model output for the batch ``x`` (B, ...) at integer ``timestep`` with conditioning ``cond``."""
        ...
