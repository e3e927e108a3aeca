"""The published SD1.5 / SDXL architectures at random init, from their public configs (nothing downloads).

Shared by the memory model (``benchmarks.memory_model``), the SD-shaped stacks (``benchmarks.stacks``) and the
load-memory benchmark (``benchmarks.load_memory``); it imports none of them.
"""

from __future__ import annotations

from typing import Sequence

import torch

from rlr_backend.lora import DEFAULT_TARGET_MODULES, is_target

MEASURE_DTYPE = torch.bfloat16  # stands for fp16: 2 bytes per element either way

# --------------------------------------------------------------------------------------------- configs
# Sources: the public diffusers / transformers config.json files of
#   runwayml/stable-diffusion-v1-5 (unet/, vae/, text_encoder/),
#   stabilityai/stable-diffusion-xl-base-1.0 (unet/, vae/, text_encoder/, text_encoder_2/),
#   openai/clip-vit-large-patch14 (the image tower of the LAION aesthetic predictor).
# Only architecture fields are kept; values are the published ones.

SD15_UNET: dict = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32, "norm_eps": 1e-5,
    "act_fn": "silu", "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0,
}

SDXL_UNET: dict = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20), "cross_attention_dim": 2048,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816, "use_linear_projection": True, "norm_num_groups": 32,
    "norm_eps": 1e-5, "act_fn": "silu", "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0,
}

SD_VAE: dict = {  # SD1.x and SDXL share this architecture (SDXL's differs in weights and scaling factor only)
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "block_out_channels": (128, 256, 512, 512), "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4, "norm_num_groups": 32, "act_fn": "silu", "sample_size": 512,
}

CLIP_L_TEXT: dict = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                     "num_attention_heads": 12, "max_position_embeddings": 77, "vocab_size": 49408,
                     "projection_dim": 768, "hidden_act": "quick_gelu"}
OPENCLIP_BIGG_TEXT: dict = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                            "num_attention_heads": 20, "max_position_embeddings": 77, "vocab_size": 49408,
                            "projection_dim": 1280, "hidden_act": "gelu"}
CLIP_VIT_L14_VISION: dict = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                             "num_attention_heads": 16, "image_size": 224, "patch_size": 14, "projection_dim": 768,
                             "hidden_act": "quick_gelu"}

#: architecture -> (UNet config, text encoders, text width, pooled width for SDXL's added conditioning)
ARCHS: dict[str, dict] = {
    "sd15": {"unet": SD15_UNET, "text": (CLIP_L_TEXT,), "tokens": 77, "text_dim": 768, "label": "SD1.5"},
    "sdxl": {"unet": SDXL_UNET, "text": (CLIP_L_TEXT, OPENCLIP_BIGG_TEXT), "tokens": 77, "text_dim": 2048,
             "label": "SDXL"},
}
LORA_TARGETS: tuple[str, ...] = DEFAULT_TARGET_MODULES  # the modules rlr_backend.lora.add_lora adapts
AESTHETIC_HEAD_PARAMS = 768 * 1024 + 1024 + 1024 * 128 + 128 + 128 * 64 + 64 + 64 * 16 + 16 + 16 + 1


# ------------------------------------------------------------------------------------------ building
def _materialize(module: torch.nn.Module, dtype: torch.dtype, seed: int,
                 device: str | torch.device = "cpu") -> torch.nn.Module:
    """Allocate a meta-device module directly in ``dtype`` on ``device`` and initialise it with each
    layer's default init (values are irrelevant to memory; building on meta avoids a transient fp32
    copy of SDXL, and on a GPU the init runs there)."""
    module = module.to(dtype).to_empty(device=device)
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    return module


def build_unet(arch: str, dtype: torch.dtype = MEASURE_DTYPE, seed: int = 0, meta: bool = False,
               device: str | torch.device = "cpu", config: dict | None = None) -> torch.nn.Module:
    """The arch's UNet2DConditionModel at random init (``meta=True``: shapes only, no memory);
    ``config`` replaces the arch's published config (e.g. a shrunk one of the same family)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**(config or ARCHS[arch]["unet"]))
    return unet if meta else _materialize(unet, dtype, seed, device)


def build_vae(dtype: torch.dtype = MEASURE_DTYPE, seed: int = 0, meta: bool = False,
              device: str | torch.device = "cpu", config: dict | None = None) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(**(config or SD_VAE))
    return vae if meta else _materialize(vae, dtype, seed, device)


class AestheticReward(torch.nn.Module):
    """CLIP ViT-L/14 image tower + projection + the LAION aesthetic MLP head, on images in [0, 1]:
    the reward's differentiable path (resize to 224, normalise, embed, L2-normalise, score)."""

    def __init__(self, vision: dict | None = None) -> None:
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        vision = vision or CLIP_VIT_L14_VISION
        self.size = vision["image_size"]
        self.clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**vision))
        self.head = torch.nn.Sequential(torch.nn.Linear(vision["projection_dim"], 1024), torch.nn.Linear(1024, 128),
                                        torch.nn.Linear(128, 64), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.interpolate(images, size=(self.size, self.size), mode="bilinear", antialias=False)
        x = (x - 0.45) / 0.27
        emb = self.clip(pixel_values=x).image_embeds
        return self.head(torch.nn.functional.normalize(emb, dim=-1)).squeeze(-1).float()


def build_reward(dtype: torch.dtype = MEASURE_DTYPE, seed: int = 0, device: str | torch.device = "cpu",
                 vision: dict | None = None) -> AestheticReward:
    """The aesthetic reward at random init in ``dtype`` on ``device`` (initialised on the CPU, as transformers
    does it, then moved); ``vision`` replaces the ViT-L/14 config (e.g. a shrunk one)."""
    torch.manual_seed(seed)
    return AestheticReward(vision).to(dtype).to(device).requires_grad_(False).eval()


def param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def lora_param_count(unet: torch.nn.Module, rank: int, targets: Sequence[str] = LORA_TARGETS) -> int:
    """Parameters of a rank-``rank`` LoRA on ``targets`` (r x (in + out) per adapted Linear), as
    rlr_backend.lora.add_lora injects it; counted from the (meta) module's shapes."""
    n = 0
    for name, m in unet.named_modules():
        if isinstance(m, torch.nn.Linear) and is_target(name, targets):
            n += rank * (m.in_features + m.out_features)
    return n


def text_encoder_params(arch: str) -> int:
    """Parameters of the arch's text encoder(s), counted on the meta device."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    total = 0
    for i, cfg in enumerate(ARCHS[arch]["text"]):
        cls = CLIPTextModelWithProjection if i == 1 else CLIPTextModel
        with torch.device("meta"):
            total += param_count(cls(CLIPTextConfig(**cfg)))
    return total


def reward_params(full_clip: bool = True) -> int:
    """Aesthetic reward parameters: the ViT-L/14 image tower + projection + head; ``full_clip`` adds
    the CLIP text tower, which a full CLIP checkpoint loads although the reward does not use it."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.device("meta"):
        n = param_count(CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_VIT_L14_VISION)))
        if full_clip:
            n += param_count(CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))) + 768 * 768
    return n + AESTHETIC_HEAD_PARAMS
