"""``TrainableModel`` for a diffusers ``QwenImagePipeline`` (Qwen-Image text-to-image).

Latents stay as the video VAE (``AutoencoderKLQwenImage``) makes them, one frame: (B, C, 1, H, W); the
denoiser packs the frame into 2x2 patches, (B, (H/2)(W/2), 4C) (FLUX's packing, ``flux_model.pack_latents``),
passes ``img_shapes`` [(1, H/2, W/2)] per image and the time input sigma (the pipeline's t / 1000), and unpacks
the velocity. Decoding: z / (1 / std) + mean per channel, frame 0 (``diffusers_model.decode_latents``).

Conditioning: the pipeline's ``encode_prompt`` (Qwen2.5-VL's last hidden states after the chat template, the
template's first 34 tokens dropped, padding removed), one text at a time, so lengths vary; a batch is
zero-padded to its longest text with ``encoder_hidden_states_mask`` marking the real tokens (the transformer
masks the padded keys in its joint attention; text RoPE positions start at 0 for every text, so padding does
not move them). When every text in the batch has the same length no mask is passed, as the pipeline does.

Guidance: the config's ``guidance_scale`` is the pipeline's ``true_cfg_scale`` with the empty negative prompt
(the pipeline's "true CFG"): for s > 1 the output is eps_u + s (eps_c - eps_u) rescaled per packed token to the
conditional output's norm (``sampling.norm_rescaled_guidance``), not the plain ``classifier_free_guidance``;
s <= 1 makes no unconditional pass. The pipeline's own ``guidance_scale`` is for guidance-distilled transformers
(``guidance_embeds``), but diffusers 0.42's ``QwenImageTransformer2DModel`` builds no guidance embedding and
fails when given one, and no such checkpoint is released, so a folder with ``guidance_embeds`` is refused.
Sigmas are linspace(1, 1/N, N) with the dynamic shift mu from the image tokens (256 -> 8192 tokens, 0.5 ->
0.9 in the released scheduler) and the scheduler's ``shift_terminal`` stretch (0.02), both applied by the
scheduler's ``set_timesteps``. LoRA: the joint blocks' image and text attention projections, exported as
``transformer.<module>.lora_A/B.weight``, which diffusers' ``QwenImageLoraLoaderMixin`` loads and ComfyUI maps
for Qwen-Image (``comfy/lora.py``: ``transformer.<name>`` -> ``diffusion_model.<name>.weight``, its native
names being diffusers'); kohya ``ss_base_model_version`` ``qwen_image``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..sampling import norm_rescaled_guidance
from .flow_model import MMDIT_LORA_TARGETS, FlowConditioning, FlowDenoiser, PackedFlowModel
from .flux_model import pack_latents, unpack_latents


def pad_embeds(embeds: list[Tensor]) -> tuple[Tensor, Tensor | None]:
    """Per-text (L_i, D) -> zero-padded (B, max L, D) and the (B, max L) mask of real tokens, or None when every
    text has the same length (the pipeline then passes no mask)."""
    longest = max(e.shape[0] for e in embeds)
    padded = torch.stack([torch.cat([e, e.new_zeros(longest - e.shape[0], e.shape[1])]) for e in embeds])
    if all(e.shape[0] == longest for e in embeds):
        return padded, None
    mask = torch.stack([(torch.arange(longest) < e.shape[0]).long() for e in embeds])
    return padded, mask.to(padded.device)


class QwenImageDenoiser(FlowDenoiser):
    """Qwen-Image: packed one-frame latents, time input sigma, padded text with a mask; true CFG with the
    norm rescale for guidance_scale > 1 (the pipeline's ``true_cfg_scale``)."""

    def _forward(self, x: Tensor, sigma: float, embeds: list[Tensor], pooled: None) -> Tensor:
        dt = self.dtype
        b, _, _, h, w = x.shape
        text, mask = pad_embeds([e.to(x.device, dt) for e in embeds])
        t = torch.full((b,), sigma, device=x.device, dtype=dt)
        out = self.transformer(hidden_states=pack_latents(x[:, :, 0]).to(dt), timestep=t, encoder_hidden_states=text,
                               encoder_hidden_states_mask=mask, img_shapes=[[(1, h // 2, w // 2)]] * b,
                               return_dict=False)[0]
        return unpack_latents(out, h, w).unsqueeze(2)

    def guide(self, uncond: Tensor, text: Tensor, w: float) -> Tensor:
        """``norm_rescaled_guidance`` per packed token (the norm over its 4C channels), as the pipeline has it."""
        h, wd = text.shape[-2:]
        out = norm_rescaled_guidance(pack_latents(uncond[:, :, 0]), pack_latents(text[:, :, 0]), w)
        return unpack_latents(out, h, wd).unsqueeze(2)


class QwenImageModel(PackedFlowModel):
    """``QwenImagePipeline``: see the module docstring."""

    base_model_version = "qwen_image"
    denoiser_cls = QwenImageDenoiser
    lora_targets = MMDIT_LORA_TARGETS
    pipeline_sigmas = True
    text_encoder_names = ("text_encoder",)
    default_max_sequence_length = 512  # the pipeline's default (at most 1024)
    latent_frames = (1,)

    def __init__(self, pipe, image_size: int | None = None, defaults: dict | None = None):
        if pipe.transformer.config.get("guidance_embeds", False):
            raise ValueError("this Qwen-Image transformer is guidance-distilled (guidance_embeds); diffusers' "
                             "QwenImageTransformer2DModel cannot take a guidance input yet, so it is not supported")
        super().__init__(pipe, image_size, defaults)

    def _vae_scale_factor(self) -> int:
        return 2 ** len(self.vae.temperal_downsample)  # as QwenImagePipeline computes it

    def encode_one(self, text: str) -> tuple:
        embeds, _ = self.pipe.encode_prompt(prompt=text, device=self.text_device,
                                            max_sequence_length=self.max_sequence_length)
        return (embeds[0],)

    def _batch(self, cond: list[tuple], neg: list[tuple]) -> FlowConditioning:
        return FlowConditioning([c[0] for c in cond], None, [c[0] for c in neg], None)
