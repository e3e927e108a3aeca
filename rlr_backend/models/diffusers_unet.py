"""Denoiser adapter for diffusers' UNet2DConditionModel (SD1.x / SD2.x) with classifier-free guidance."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..sampling import classifier_free_guidance


@dataclass(frozen=True)
class TextConditioning:
    """Text embeddings for one batch: ``embeds`` (B, L, D); ``uncond`` the negative/empty prompt's
    embeddings (B, L, D) used by classifier-free guidance, or None for no guidance."""

    embeds: Tensor
    uncond: Tensor | None = None

    def __post_init__(self) -> None:
        if self.embeds.dim() != 3:
            raise ValueError(f"text embeddings must be (batch, tokens, dim), got shape {tuple(self.embeds.shape)}")
        if self.uncond is not None and self.uncond.shape != self.embeds.shape:
            raise ValueError(f"negative embeddings {tuple(self.uncond.shape)} must match {tuple(self.embeds.shape)}")


class DiffusersUNetDenoiser:
    """eps_hat = eps_u + w (eps_c - eps_u), one batched UNet call of size 2B (as diffusers' pipelines).

    ``prediction_type`` is the scheduler's; the schedule applies it, the adapter only returns the
    UNet output. Inputs are cast to the UNet's dtype and device (text embeddings are cached on the CPU)
    and the output back to float32.
    """

    def __init__(self, unet: torch.nn.Module, guidance_scale: float = 1.0):
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        self.unet = unet
        self.guidance_scale = float(guidance_scale)

    def __call__(self, x: Tensor, timestep: int, cond: TextConditioning) -> Tensor:
        dtype = next(self.unet.parameters()).dtype
        t = torch.full((x.shape[0],), int(timestep), device=x.device, dtype=torch.long)
        guided = cond.uncond is not None and self.guidance_scale != 1.0
        if not guided:
            return self.unet(x.to(dtype), t, encoder_hidden_states=cond.embeds.to(x.device, dtype)).sample.float()
        out = self.unet(torch.cat([x, x]).to(dtype), torch.cat([t, t]),
                        encoder_hidden_states=torch.cat([cond.uncond, cond.embeds]).to(x.device, dtype)).sample.float()
        uncond, text = out.chunk(2)
        return classifier_free_guidance(uncond, text, self.guidance_scale)
