"""The small protocol every sampler and estimator runs on.

A ``Denoiser`` maps a noisy batch ``x`` (B, ...) at a step's time input (``Schedule.timesteps``: DDIM's integer
timestep, a flow chain's float sigma * 1000) to the model output the schedule's step function takes (DDIM:
the noise, v or x_0 its ``prediction_type`` names; flow matching: the velocity eps - x_0). Conditioning (text embeddings, guidance) is
opaque to samplers: they pass the object a ``PromptSchedule`` returns for the step, unchanged.
Adapters in ``rlr_backend.models`` (and the ComfyUI pack) wrap real models; samplers never import them.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor


def classifier_free_guidance(uncond: Tensor, cond: Tensor, scale: float) -> Tensor:
    """eps_u + w (eps_c - eps_u) (Ho & Salimans 2022): the guided output every adapter returns."""
    return uncond + scale * (cond - uncond)


def norm_rescaled_guidance(uncond: Tensor, cond: Tensor, scale: float, dim: int = -1) -> Tensor:
    """Qwen-Image's true CFG (``QwenImagePipeline.__call__``): comb = eps_u + w (eps_c - eps_u), then rescaled to
    the conditional output's norm along ``dim`` (per token of the packed latents there): comb ||eps_c|| / ||comb||."""
    comb = classifier_free_guidance(uncond, cond, scale)
    return comb * (torch.norm(cond, dim=dim, keepdim=True) / torch.norm(comb, dim=dim, keepdim=True))


@runtime_checkable
class Denoiser(Protocol):
    def __call__(self, x: Tensor, timestep: int | float, cond: Any) -> Tensor:
        """Model output for the batch ``x`` (B, ...) at ``timestep`` (the schedule's time input) with ``cond``."""
        ...
