"""``TrainableModel`` for a diffusers ``ZImagePipeline`` (Z-Image and Z-Image-Turbo).

Z-Image's transformer takes a list of per-image latents (C, 1, H, W), the time input 1 - sigma (the
pipeline's (1000 - t) / 1000), and a list of per-prompt caption features of varying length (Qwen3's
penultimate hidden states with the padding removed, ``encode_prompt``); its output is the negated velocity.
Guidance as the pipeline has it: for ``guidance_scale`` s > 0 the output is pos + s (pos - neg), the standard
classifier-free guidance with weight w = 1 + s (``classifier_free_guidance(neg, pos, 1 + s)``); s = 0 (Turbo)
makes no unconditional pass. The LoRA is exported as ``diffusion_model.<diffusers module>.lora_A/B.weight``
(the prefix ComfyUI maps for Z-Image; diffusers strips it). ``cfg_normalization`` and ``cfg_truncation`` (off by default in diffusers) are
not offered. Sigmas are linspace(1, 1/N, N) with the scheduler's static shift (3.0 for the released models).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .flow_model import FlowConditioning, FlowDenoiser, FlowModel

#: attention projections of every Z-Image block (the refiners' too)
ZIMAGE_LORA_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")


class ZImageDenoiser(FlowDenoiser):
    """Z-Image: list inputs, time input 1 - sigma, negated output; CFG weight 1 + s for s > 0."""

    @property
    def cfg_weight(self) -> float | None:
        return 1 + self.guidance_scale if self.guidance_scale > 0 else None

    def _forward(self, x: Tensor, sigma: float, embeds: list[Tensor], pooled: None) -> Tensor:
        dt = self.dtype
        t = torch.full((x.shape[0],), 1 - sigma, device=x.device, dtype=dt)
        out = self.transformer(list(x.to(dt).unsqueeze(2).unbind(0)), t, [e.to(x.device, dt) for e in embeds],
                               return_dict=False)[0]
        return -torch.stack([o.float() for o in out]).squeeze(2)


class ZImageModel(FlowModel):
    """``ZImagePipeline``: see the module docstring (kohya-style ``ss_base_model_version`` ``zimage``)."""

    base_model_version = "zimage"
    denoiser_cls = ZImageDenoiser
    lora_targets = ZIMAGE_LORA_TARGETS
    pipeline_sigmas = True
    text_encoder_names = ("text_encoder",)
    default_max_sequence_length = 512
    #: ComfyUI (0.3.75, ``comfy/lora.py`` Lumina2 branch) maps Z-Image's diffusers names under ``diffusion_model.``
    #: only, not ``transformer.``; diffusers' ``ZImageLoraLoaderMixin`` strips that prefix, so both load it
    lora_prefix = "diffusion_model."

    @property
    def patch_size(self) -> int:
        return int(self.transformer.config.all_patch_size[0])

    def native_image_size(self) -> int:
        return 1024  # the pipeline's default height and width

    def encode_one(self, text: str) -> tuple:
        embeds, _ = self.pipe.encode_prompt(prompt=text, device=self.text_device, do_classifier_free_guidance=False,
                                            max_sequence_length=self.max_sequence_length)
        return (embeds[0],)

    def _batch(self, cond: list[tuple], neg: list[tuple]) -> FlowConditioning:
        return FlowConditioning([c[0] for c in cond], None, [c[0] for c in neg], None)
