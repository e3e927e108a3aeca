"""Model stacks the benchmarks measure: the embedded default model and random-init SD-shaped UNets.

Each stack is a ChainProblem (denoiser with CFG, DDIM schedule, constant prompt, differentiable
brightness reward through the VAE decoder) plus its weights' size, so every estimator can run on it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint

from rlr_backend.estimators import ChainProblem
from rlr_backend.lora import add_lora
from rlr_backend.models.diffusers_unet import DiffusersUNetDenoiser, TextConditioning
from rlr_backend.models.tiny import build_tiny_unet
from rlr_backend.sampling import DDIMSchedule, PromptSchedule

#: name -> (UNet block channels, text width, VAE block channels, what it stands for)
MODELS = {
    "default": (None, None, None, "the embedded default model (1.0 M UNet, 32 px, its own VAE and text encoder)"),
    "sd-small": ((32, 64, 128), 128, (16, 32, 32, 32), "random-init SD1.x-shaped UNet, 3 levels"),
    "sd-mid": ((64, 128, 256), 256, (32, 64, 64, 64), "random-init SD1.x-shaped UNet, 3 levels, wider"),
}


@dataclass
class Stack:
    name: str
    problem: ChainProblem
    latent_shape: tuple[int, ...]
    weight_bytes: int
    unet_params: int
    pixels: int
    unet: torch.nn.Module | None = None
    decode: dict = field(default_factory=lambda: {"one_at_a_time": False})

    @contextmanager
    def gradient_checkpointing(self):
        """The trainer's ``--gradient-checkpointing`` minus the step part (an estimator option): UNet
        blocks recompute their activations in backward and the reward decodes one image at a time."""
        self.unet.enable_gradient_checkpointing()
        self.decode["one_at_a_time"] = True
        try:
            yield
        finally:
            self.unet.disable_gradient_checkpointing()
            self.decode["one_at_a_time"] = False


def _weights(*modules: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for m in modules for t in list(m.parameters()) + list(m.buffers()))


def build_stack(model: str = "default", num_steps: int = 20, batch: int = 4, pixels: int | None = None,
                guidance: float = 4.0, seed: int = 0) -> Stack:
    """A ChainProblem on ``model`` (see MODELS) with a LoRA of rank 4 on the attention projections."""
    from diffusers import AutoencoderKL, DDIMScheduler

    if model not in MODELS:
        raise ValueError(f"unknown benchmark model {model!r}; choose one of {sorted(MODELS)}")
    torch.manual_seed(seed)
    if model == "default":
        from rlr_backend.models.default_model import load_default_pipeline

        pipe = load_default_pipeline()
        unet, vae, sched = pipe.unet, pipe.vae, pipe.scheduler
        ids = pipe.tokenizer(["a red circle on a blue background", ""], padding="max_length",
                             max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
        with torch.no_grad():
            emb = pipe.text_encoder(ids)[0]
        text, empty = emb[:1], emb[1:]
        pixels = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    else:
        unet_ch, width, vae_ch, _ = MODELS[model]
        pixels = pixels or 64
        f = 2 ** (len(vae_ch) - 1)
        unet = build_tiny_unet(sample_size=pixels // f, channels=4, cross_attention_dim=width,
                               block_out_channels=unet_ch, seed=seed)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(vae_ch),
                            up_block_types=("UpDecoderBlock2D",) * len(vae_ch), block_out_channels=vae_ch,
                            latent_channels=4, norm_num_groups=16, sample_size=pixels)
        sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                              set_alpha_to_one=False, clip_sample=False)
        g = torch.Generator().manual_seed(seed + 3)
        text, empty = torch.randn(1, 8, width, generator=g), torch.zeros(1, 8, width)
    vae.requires_grad_(False)
    unet.requires_grad_(False)
    params = add_lora(unet, rank=4, seed=seed)
    with torch.no_grad():  # non-zero LoRA B: a trained adapter, so every LoRA tensor gets a gradient
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(seed + 2))
    scale = vae.config.scaling_factor
    decode = {"one_at_a_time": False}

    def brightness(latents: torch.Tensor) -> torch.Tensor:
        img = (vae.decode(latents / scale).sample + 1) / 2
        return img.clamp(0, 1).flatten(1).mean(1)

    def reward(latents: torch.Tensor) -> torch.Tensor:
        if decode["one_at_a_time"] and torch.is_grad_enabled() and latents.shape[0] > 1:
            return torch.cat([checkpoint(brightness, z, use_reentrant=False) for z in latents.split(1)])
        return brightness(latents)

    cond = TextConditioning(text.expand(batch, -1, -1), empty.expand(batch, -1, -1))
    problem = ChainProblem(DiffusersUNetDenoiser(unet, guidance), DDIMSchedule.from_diffusers(sched, num_steps, eta=1.0),
                           PromptSchedule.constant(cond, num_steps), reward, params)
    lat = unet.config.sample_size
    return Stack(model, problem, (batch, unet.config.in_channels, lat, lat), _weights(unet, vae),
                 sum(p.numel() for p in unet.parameters()), pixels, unet, decode)
