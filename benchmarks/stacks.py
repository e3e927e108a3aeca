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
from rlr_backend.train.memory import set_decoder_checkpointing

from . import sd_archs

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
    vae: torch.nn.Module | None = None  # the full-size stacks' (the GPU check): checkpointed as the trainer does

    @contextmanager
    def gradient_checkpointing(self):
        """The trainer's ``--gradient-checkpointing`` minus the step part (an estimator option): UNet
        blocks recompute their activations in backward and the reward decodes one image at a time; with
        ``vae`` the trainer's decoder checkpointing too (``rlr_backend.train.memory.set_decoder_checkpointing``;
        the cost suite's stacks have none, so its measured rows keep their meaning)."""
        if self.unet is not None:
            self.unet.enable_gradient_checkpointing()
        if self.vae is not None:
            set_decoder_checkpointing(self.vae, True)
        self.decode["one_at_a_time"] = True
        try:
            yield
        finally:
            if self.unet is not None:
                self.unet.disable_gradient_checkpointing()
            if self.vae is not None:
                set_decoder_checkpointing(self.vae, False)
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


# ------------------------------------------------------------------- full-size architectures (GPU check)
@dataclass(frozen=True)
class ArchSpec:
    """A UNet + VAE + aesthetic-reward stack of one architecture family at one size."""

    arch: str  # memory model architecture: "sd15" | "sdxl"
    unet: dict  # diffusers UNet2DConditionModel config
    vae: dict  # diffusers AutoencoderKL config
    reward_vision: dict  # CLIP vision config of the aesthetic reward
    resolution: int  # pixels
    text_tokens: int
    text_dim: int
    pooled_dim: int | None  # SDXL's pooled text embedding (added conditioning); None for SD1.x


def arch_spec(arch: str, tiny: bool = False) -> ArchSpec:
    """The published SD1.5 (512 px) / SDXL (1024 px) configs of ``benchmarks.sd_archs``, or, with
    ``tiny``, the same block types and conditioning with every width shrunk (64 px, CPU-test size)."""
    if arch not in sd_archs.ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(sd_archs.ARCHS)}")
    a = sd_archs.ARCHS[arch]
    if not tiny:
        return ArchSpec(arch, a["unet"], sd_archs.SD_VAE, sd_archs.CLIP_VIT_L14_VISION,
                        512 if arch == "sd15" else 1024, a["tokens"], a["text_dim"], 1280 if arch == "sdxl" else None)
    small = {"layers_per_block": 1, "norm_num_groups": 8, "sample_size": 8}
    if arch == "sd15":
        unet = {**a["unet"], **small, "block_out_channels": (32, 32, 64, 64), "cross_attention_dim": 32}
        text_dim, pooled = 32, None
    else:
        pooled = 32
        unet = {**a["unet"], **small, "block_out_channels": (32, 64, 64), "transformer_layers_per_block": (1, 1, 2),
                "attention_head_dim": (1, 2, 2), "cross_attention_dim": 64, "addition_time_embed_dim": 8,
                "projection_class_embeddings_input_dim": 6 * 8 + pooled}
        text_dim = 64
    vae = {**sd_archs.SD_VAE, "block_out_channels": (16, 32, 32, 32), "norm_num_groups": 8, "layers_per_block": 1,
           "sample_size": 64}
    vision = {**sd_archs.CLIP_VIT_L14_VISION, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 2, "image_size": 32, "patch_size": 8, "projection_dim": 32}
    return ArchSpec(arch, unet, vae, vision, 64, 8, text_dim, pooled)


def build_arch_stack(arch: str, *, tiny: bool = False, batch: int = 1, num_steps: int = 50,
                     dtype: torch.dtype = torch.float16, device: str | torch.device = "cpu", guidance: float = 4.0,
                     lora_rank: int = 4, seed: int = 0) -> Stack:
    """A ChainProblem on ``arch`` (see ``arch_spec``) built directly on ``device`` in ``dtype``: random-init
    UNet with a rank-``lora_rank`` LoRA (fp32, non-zero B) on the attention projections, the SD VAE, the
    aesthetic reward (CLIP ViT-L/14 tower + head) backpropagated through the decoder, random text
    embeddings (text encoders offloaded, as ``rlr-train`` does), DDIM with eta = 1 and CFG.

    The reward squashes the latents with ``4 tanh(z / 4)`` before decoding: a random UNet's chain ends
    far outside the latent range a trained one produces, and the decoder would overflow fp16 on it
    (one latent-sized tensor; it changes no other memory or time)."""
    from diffusers import DDIMScheduler

    from rlr_backend.models.sdxl_model import SDXLConditioning, SDXLUNetDenoiser

    spec = arch_spec(arch, tiny)
    device = torch.device(device)
    unet = sd_archs.build_unet(arch, dtype, seed, device=device, config=spec.unet)
    params = add_lora(unet, rank=lora_rank, seed=seed)
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():  # non-zero LoRA B: a trained adapter, so every LoRA tensor gets a gradient
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    vae = sd_archs.build_vae(dtype, seed + 1, device=device, config=spec.vae).requires_grad_(False)
    aesthetic = sd_archs.build_reward(dtype, seed + 3, device=device, vision=spec.reward_vision)
    scale = vae.config.scaling_factor
    decode = {"one_at_a_time": False}

    def score(latents: torch.Tensor) -> torch.Tensor:
        img = (vae.decode(4 * torch.tanh(latents / 4) / scale).sample + 1) / 2
        return aesthetic(img.clamp(0, 1))

    def reward(latents: torch.Tensor) -> torch.Tensor:  # as rlr_backend.models.diffusers_model.decode_latents
        if not decode["one_at_a_time"] or latents.shape[0] == 1:
            return score(latents)
        if torch.is_grad_enabled():
            return torch.cat([checkpoint(score, z, use_reentrant=False) for z in latents.split(1)])
        return torch.cat([score(z) for z in latents.split(1)])  # no grad: one image at a time too

    g = torch.Generator().manual_seed(seed + 4)
    text = torch.randn(1, spec.text_tokens, spec.text_dim, generator=g).to(device, dtype).expand(batch, -1, -1)
    empty = torch.zeros_like(text)
    if spec.pooled_dim is None:
        cond, model = TextConditioning(text, empty), DiffusersUNetDenoiser(unet, guidance)
    else:
        pooled = torch.randn(1, spec.pooled_dim, generator=g).to(device, dtype).expand(batch, -1)
        res = float(spec.resolution)
        time_ids = torch.tensor([[res, res, 0.0, 0.0, res, res]], device=device).expand(batch, -1)
        cond = SDXLConditioning(text, pooled, time_ids, empty, torch.zeros_like(pooled))
        model = SDXLUNetDenoiser(unet, guidance)
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                          set_alpha_to_one=False, clip_sample=False)
    problem = ChainProblem(model, DDIMSchedule.from_diffusers(sched, num_steps, eta=1.0),
                           PromptSchedule.constant(cond, num_steps), reward, params)
    lat = spec.resolution // 2 ** (len(spec.vae["block_out_channels"]) - 1)
    return Stack(f"{arch}{'-tiny' if tiny else ''}", problem, (batch, unet.config.in_channels, lat, lat),
                 _weights(unet, vae, aesthetic), sum(p.numel() for p in unet.parameters()), spec.resolution, unet,
                 decode, vae)
