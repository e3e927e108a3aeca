"""``TrainableModel`` for a diffusers ``FluxPipeline`` (FLUX.1-dev with its guidance embedding, FLUX.1-schnell
without one).

The chain keeps latents unpacked, (B, C, H, W), as the VAE makes them (the pipeline draws its noise in that
shape too, then packs it); the denoiser packs them into 2x2 patches, (B, (H/2)(W/2), 4C), with the latent
image ids (0, row, col) and zero text ids, calls the transformer with the time input sigma (the chain's
sigma * 1000 divided back, as the pipeline does), and unpacks the velocity. Packing is a permutation of the
elements, so a flow step on unpacked latents equals the pipeline's on packed ones. The guidance scale goes
into the guidance embedding (dev); FLUX.1 makes no unconditional pass (no CFG), as the pipeline without
``true_cfg_scale``. Sigmas are linspace(1, 1/N, N) with the dynamic shift mu from the number of image tokens.
Conditioning: the pipeline's ``encode_prompt`` (CLIP-L pooled + T5 tokens).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .flow_model import MMDIT_LORA_TARGETS, FlowConditioning, FlowDenoiser, PackedFlowModel


def pack_latents(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, (H/2)(W/2), 4C), as ``FluxPipeline._pack_latents``."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: Tensor, height: int, width: int) -> Tensor:
    """The inverse of ``pack_latents`` for a latent of ``height`` x ``width``."""
    b, _, c4 = x.shape
    c = c4 // 4
    return x.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


def latent_image_ids(height: int, width: int, device, dtype) -> Tensor:
    """((H/2)(W/2), 3) ids (0, row, col) of the packed latent, as ``FluxPipeline._prepare_latent_image_ids``."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device, dtype)


class FluxDenoiser(FlowDenoiser):
    """FLUX.1: packed latents, time input sigma, ``guidance`` = the guidance scale when the transformer has a
    guidance embedding (dev), none otherwise (schnell); no unconditional pass."""

    @property
    def cfg_weight(self) -> None:
        return None

    def _forward(self, x: Tensor, sigma: float, embeds: Tensor, pooled: Tensor | None) -> Tensor:
        dt = self.dtype
        b, _, h, w = x.shape
        t = torch.full((b,), sigma, device=x.device, dtype=dt)
        guidance = torch.full((b,), self.guidance_scale, device=x.device, dtype=torch.float32) \
            if self.transformer.config.guidance_embeds else None
        out = self.transformer(hidden_states=pack_latents(x).to(dt), timestep=t, guidance=guidance,
                               pooled_projections=pooled.to(x.device, dt),
                               encoder_hidden_states=embeds.to(x.device, dt),
                               txt_ids=torch.zeros(embeds.shape[1], 3, device=x.device, dtype=dt),
                               img_ids=latent_image_ids(h, w, x.device, dt), return_dict=False)[0]
        return unpack_latents(out, h, w)


class FluxModel(PackedFlowModel):
    """``FluxPipeline`` (FLUX.1-dev / schnell): see the module docstring. LoRA on the double blocks' image and
    text attention projections and the single blocks' q/k/v (kohya ``ss_base_model_version`` ``flux1``)."""

    base_model_version = "flux1"
    denoiser_cls = FluxDenoiser
    lora_targets = MMDIT_LORA_TARGETS
    pipeline_sigmas = True
    text_encoder_names = ("text_encoder", "text_encoder_2")
    default_max_sequence_length = 512

    def encode_one(self, text: str) -> tuple:
        embeds, pooled, _ = self.pipe.encode_prompt(prompt=text, prompt_2=None, device=self.text_device,
                                                    max_sequence_length=self.max_sequence_length)
        return embeds[0], pooled[0]

    def conditioning(self, texts) -> FlowConditioning:
        cond = self.encode(list(texts))
        return FlowConditioning(torch.stack([c[0] for c in cond]), torch.stack([c[1] for c in cond]))
