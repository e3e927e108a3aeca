"""``TrainableModel`` for a diffusers StableDiffusionPipeline (SD1.x/SD2.x layout; the embedded default).
SDXL pipelines use :class:`rlr_backend.models.sdxl_model.SDXLModel`; :func:`rlr_backend.models.loader.load_model`
picks the right one."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..lora import add_lora, kohya_state_dict, load_lora_state_dict, set_lora_scale
from ..sampling import DDIMSchedule
from .diffusers_unet import DiffusersUNetDenoiser, TextConditioning


def decode_latents(vae, latents: Tensor, one_at_a_time: bool = False) -> Tensor:
    """A diffusers VAE's latents -> float32 images (B, 3, H, W) in [0, 1] on the latents' device, differentiable:
    D(z / scaling_factor + shift_factor) (no shift for SD1.x/SDXL VAEs); for a video VAE's one-frame latents
    (B, C, 1, H, W) (Qwen-Image's ``AutoencoderKLQwenImage``) D(z / (1 / std) + mean) with its per-channel
    ``latents_mean`` / ``latents_std``, frame 0 of the decoded video, as ``QwenImagePipeline`` decodes.
    ``one_at_a_time``: each image decoded on its own, under a checkpoint when gradients are on (the decoder's
    activations of one image at a time)."""
    if latents.dim() == 5:
        view = (1, -1, 1, 1, 1)
        mean, std = torch.tensor(vae.config.latents_mean).view(view), torch.tensor(vae.config.latents_std).view(view)

    def run(z: Tensor) -> Tensor:
        z = z.to(vae.device, vae.dtype)
        if z.dim() == 5:
            z = z / (1.0 / std.to(z)) + mean.to(z)
            image = vae.decode(z).sample[:, :, 0]
        else:
            shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
            z = z / float(vae.config.scaling_factor)
            image = vae.decode(z + shift if shift else z).sample
        return (image.float() / 2 + 0.5).clamp(0, 1).to(latents.device)

    if not one_at_a_time or latents.shape[0] == 1:
        return run(latents)
    if torch.is_grad_enabled():
        return torch.cat([checkpoint(run, z, use_reentrant=False) for z in latents.split(1)])
    return torch.cat([run(z) for z in latents.split(1)])


class DiffusersModel:
    """Wraps a loaded pipeline; LoRA through peft on ``pipe.unet``. Text embeddings are cached per text."""

    base_model_version = "sd_v1"

    def __init__(self, pipe, base_model_version: str | None = None):
        """``base_model_version`` (kohya's ``ss_base_model_version``) defaults to ``sd_v2`` for a
        v-prediction or 1024-wide cross-attention UNet (SD2.x), else ``sd_v1``."""
        self.pipe, self.unet, self.vae = pipe, pipe.unet, pipe.vae
        if base_model_version is None:  # the embedded default names its own; else SD1.x / SD2.x by its layout
            base_model_version = getattr(pipe, "rlr_base_model_version", None)
        if base_model_version is None:
            v_pred = getattr(pipe.scheduler.config, "prediction_type", "epsilon") == "v_prediction"
            sd2 = v_pred or self.unet.config.cross_attention_dim == 1024
            base_model_version = "sd_v2" if sd2 else "sd_v1"
        self.base_model_version = base_model_version
        self.vae.requires_grad_(False)
        pipe.text_encoder.requires_grad_(False)
        f = 2 ** (len(self.vae.config.block_out_channels) - 1)
        size = self.unet.config.sample_size
        self.latent_shape = (self.unet.config.in_channels, size, size)
        self.image_size = size * f
        self._emb_cache: dict[str, Tensor] = {}

    def schedule(self, num_steps: int, eta: float) -> DDIMSchedule:
        return DDIMSchedule.from_diffusers(self.pipe.scheduler, num_steps, eta=eta)

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> Tensor:
        """Text embeddings, cached. Each text is encoded on its own, so its embedding does not depend on
        which other texts shared a batch (batch shape can change float results; resume must be exact)."""
        tokenizer = self.pipe.tokenizer
        for text in dict.fromkeys(texts):
            if text not in self._emb_cache:
                tok = tokenizer([text], padding="max_length", max_length=tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
                self._emb_cache[text] = self.pipe.text_encoder(tok.input_ids)[0][0]
        return torch.stack([self._emb_cache[t] for t in texts])

    def conditioning(self, texts: Sequence[str]) -> TextConditioning:
        uncond = self.encode([""]).expand(len(texts), -1, -1)
        return TextConditioning(self.encode(list(texts)), uncond)

    def denoiser(self, guidance_scale: float) -> DiffusersUNetDenoiser:
        return DiffusersUNetDenoiser(self.unet, guidance_scale)

    #: decode one image at a time (``gradient_checkpointing``): under grad each image under a checkpoint (only
    #: its latent and image are kept until backward), without grad simply one after the other
    decode_one_at_a_time: bool = False

    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> float32 images in [0, 1] on the latents' device, differentiable."""
        return decode_latents(self.vae, latents, self.decode_one_at_a_time)

    def add_lora(self, rank: int, alpha: float | None, seed: int) -> list[tuple[str, torch.nn.Parameter]]:
        add_lora(self.unet, rank=rank, alpha=alpha, seed=seed)
        return [(n, p) for n, p in self.unet.named_parameters() if p.requires_grad]

    def lora_state_dict(self, dtype: torch.dtype = torch.float16) -> tuple[dict[str, Tensor], int, float]:
        return kohya_state_dict(self.unet, dtype=dtype)

    def text_encoders(self) -> dict[str, torch.nn.Module]:
        """The pipeline's text encoders by component name (a LoRA's text-encoder parts go to them)."""
        return {name: getattr(self.pipe, name) for name in ("text_encoder", "text_encoder_2")
                if getattr(self.pipe, name, None) is not None}

    def load_lora(self, state_dict: dict[str, Tensor], strength: float = 1.0) -> None:
        """Apply a LoRA (kohya, diffusers or PEFT keys; its text-encoder parts too) at ``strength``."""
        adapters = getattr(self.unet, "peft_config", {}) or {}
        name = f"applied_{len(adapters)}"
        encoders = self.text_encoders()
        load_lora_state_dict(self.unet, state_dict, adapter_name=name, source="LoRA",
                             model_version=self.base_model_version, text_encoders=encoders)
        self.unet.set_adapters([name], weights=[strength])
        set_lora_scale(encoders.values(), name, strength)
        self._emb_cache.clear()  # embeddings from before a text-encoder LoRA are stale
