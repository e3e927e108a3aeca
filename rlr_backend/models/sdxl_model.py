"""``TrainableModel`` for a diffusers StableDiffusionXLPipeline: two text encoders, pooled text
embeddings and size/crop "time ids" as extra UNet conditioning.

Follows ``StableDiffusionXLPipeline.encode_prompt`` (diffusers 0.42) without clip-skip: per text
encoder the penultimate hidden state, concatenated along the feature axis (768 + 1280 = 2048 for SDXL
base); the pooled embedding is ``text_encoder_2``'s projected output; ``time_ids`` are
``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)`` = ``(H, W, 0, 0, H, W)``. The negative
(unconditional) branch uses zeros when the pipeline says ``force_zeros_for_empty_prompt`` (SDXL base
does), as diffusers does for an empty negative prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ..sampling import classifier_free_guidance
from .diffusers_model import DiffusersModel


@dataclass(frozen=True)
class SDXLConditioning:
    """One batch of SDXL conditioning: ``embeds`` (B, L, D), ``pooled`` (B, P), ``time_ids`` (B, 6);
    ``uncond`` / ``uncond_pooled`` for classifier-free guidance (both or neither)."""

    embeds: Tensor
    pooled: Tensor
    time_ids: Tensor
    uncond: Tensor | None = None
    uncond_pooled: Tensor | None = None

    def __post_init__(self) -> None:
        b = self.embeds.shape[0]
        if self.embeds.dim() != 3 or self.pooled.dim() != 2 or self.time_ids.shape != (b, 6):
            raise ValueError(f"SDXL conditioning needs embeds (B, L, D), pooled (B, P), time_ids (B, 6); got "
                             f"{tuple(self.embeds.shape)}, {tuple(self.pooled.shape)}, {tuple(self.time_ids.shape)}")
        if self.pooled.shape[0] != b:
            raise ValueError(f"pooled embeddings batch {self.pooled.shape[0]} != text embeddings batch {b}")
        if (self.uncond is None) != (self.uncond_pooled is None):
            raise ValueError("give both uncond and uncond_pooled, or neither")
        if self.uncond is not None and (self.uncond.shape != self.embeds.shape
                                        or self.uncond_pooled.shape != self.pooled.shape):
            raise ValueError("negative embeddings must have the shapes of the prompt embeddings")


class SDXLUNetDenoiser:
    """eps_hat = eps_u + w (eps_c - eps_u) from one batched SDXL UNet call of size 2B, with
    ``added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}``. Returns what the scheduler's
    ``prediction_type`` names, in float32 (conditioning is moved to the latents' device and the UNet's dtype)."""

    def __init__(self, unet: torch.nn.Module, guidance_scale: float = 1.0):
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        self.unet = unet
        self.guidance_scale = float(guidance_scale)

    def __call__(self, x: Tensor, timestep: int, cond: SDXLConditioning) -> Tensor:
        dtype = next(self.unet.parameters()).dtype
        t = torch.full((x.shape[0],), int(timestep), device=x.device, dtype=torch.long)
        if cond.uncond is None or self.guidance_scale == 1.0:
            added = {"text_embeds": cond.pooled.to(x.device, dtype), "time_ids": cond.time_ids.to(x.device, dtype)}
            return self.unet(x.to(dtype), t, encoder_hidden_states=cond.embeds.to(x.device, dtype),
                             added_cond_kwargs=added).sample.float()
        added = {"text_embeds": torch.cat([cond.uncond_pooled, cond.pooled]).to(x.device, dtype),
                 "time_ids": torch.cat([cond.time_ids, cond.time_ids]).to(x.device, dtype)}
        out = self.unet(torch.cat([x, x]).to(dtype), torch.cat([t, t]),
                        encoder_hidden_states=torch.cat([cond.uncond, cond.embeds]).to(x.device, dtype),
                        added_cond_kwargs=added).sample.float()
        uncond, text = out.chunk(2)
        return classifier_free_guidance(uncond, text, self.guidance_scale)


class SDXLModel(DiffusersModel):
    """Wraps a loaded StableDiffusionXLPipeline; LoRA through peft on ``pipe.unet`` (kohya keys
    ``lora_unet_...`` as for SD1.x, written with ``ss_base_model_version = sdxl_base_v1-0``)."""

    def __init__(self, pipe):
        super().__init__(pipe)
        pipe.text_encoder_2.requires_grad_(False)
        self.base_model_version = "sdxl_base_v1-0"
        self._pooled_cache: dict[str, Tensor] = {}
        self.zero_uncond = bool(getattr(pipe.config, "force_zeros_for_empty_prompt", True))

    def _encode_one(self, text: str) -> None:
        embeds, pooled = [], None
        for tokenizer, encoder in ((self.pipe.tokenizer, self.pipe.text_encoder),
                                   (self.pipe.tokenizer_2, self.pipe.text_encoder_2)):
            tok = tokenizer([text], padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt")
            out = encoder(tok.input_ids, output_hidden_states=True)
            pooled = out[0]  # the last encoder's (text_encoder_2's) projected pooled output
            embeds.append(out.hidden_states[-2])
        self._emb_cache[text] = torch.cat(embeds, dim=-1)[0]
        self._pooled_cache[text] = pooled[0]

    @torch.no_grad()
    def encode_pooled(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """(embeds (B, L, D), pooled (B, P)), cached per text (each text encoded alone, as ``encode``)."""
        for text in dict.fromkeys(texts):
            if text not in self._emb_cache:
                self._encode_one(text)
        return (torch.stack([self._emb_cache[t] for t in texts]),
                torch.stack([self._pooled_cache[t] for t in texts]))

    def encode(self, texts: Sequence[str]) -> Tensor:
        return self.encode_pooled(texts)[0]

    def time_ids(self, batch: int) -> Tensor:
        h = w = self.image_size
        return torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32).expand(batch, -1)

    def conditioning(self, texts: Sequence[str]) -> SDXLConditioning:
        embeds, pooled = self.encode_pooled(list(texts))
        if self.zero_uncond:
            uncond, uncond_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        else:
            e, p = self.encode_pooled([""])
            uncond, uncond_pooled = e.expand_as(embeds), p.expand_as(pooled)
        return SDXLConditioning(embeds, pooled, self.time_ids(len(texts)), uncond, uncond_pooled)

    def denoiser(self, guidance_scale: float) -> SDXLUNetDenoiser:
        return SDXLUNetDenoiser(self.unet, guidance_scale)
