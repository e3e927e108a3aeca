"""Tiny random-initialised SD1.x-, SD2.x-v- and SDXL-shaped diffusers pipelines (tests, load-time figures).

Same block layout, conditioning and scheduler settings as the real architectures, widths shrunk:
UNet blocks (32, 64), one layer per block; VAE blocks (16, 32) (8x smaller latents become 2x);
CLIP text encoders of width 32 (SD2: 64), 2 layers, with the real CLIP BPE vocabulary of the
embedded default model. Attention heads follow the real models' rules: SD1.x 8 heads, SD2.x/SDXL
head width 64 (at least one head). Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .default_model import DEFAULT_MODEL_DIR

ARCHS = ("sd1", "sd2v", "sdxl")
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def _tokenizer(pad_token: str | None = None):
    from transformers import CLIPTokenizer

    tok_dir = DEFAULT_MODEL_DIR / "tokenizer"
    kw = {} if pad_token is None else {"pad_token": pad_token}
    return CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=16, **kw)


def _text_config(hidden: int, act: str, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                          num_attention_heads=max(1, hidden // 64), max_position_embeddings=16, vocab_size=49408,
                          hidden_act=act, projection_dim=projection_dim or hidden, bos_token_id=49406,
                          eos_token_id=49407, pad_token_id=49407)


def _vae(scaling_factor: float, latent_channels: int = 4, shift_factor: float | None = None):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=latent_channels,
                         norm_num_groups=16, layers_per_block=1, sample_size=32, scaling_factor=scaling_factor,
                         shift_factor=shift_factor)


def build_tiny_pipeline(arch: str, seed: int = 0):
    """A random-init pipeline of ``arch`` in {"sd1", "sd2v", "sdxl"} (32x32 images, 16x16x4 latents)."""
    from diffusers import (DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if arch not in ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {ARCHS}")
    torch.manual_seed(seed)  # diffusers/transformers initialise from the global RNG
    common = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                  norm_num_groups=32)
    if arch == "sdxl":
        unet = UNet2DConditionModel(**common, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                                    attention_head_dim=(1, 1), use_linear_projection=True,
                                    addition_embed_type="text_time", addition_time_embed_dim=8,
                                    projection_class_embeddings_input_dim=6 * 8 + 32)
        te = CLIPTextModel(_text_config(32, "quick_gelu"))
        te2 = CLIPTextModelWithProjection(_text_config(32, "gelu", projection_dim=32))
        sched = EulerDiscreteScheduler(**SD_BETAS, steps_offset=1, timestep_spacing="leading")
        pipe = StableDiffusionXLPipeline(vae=_vae(0.13025), text_encoder=te, text_encoder_2=te2,
                                         tokenizer=_tokenizer(), tokenizer_2=_tokenizer("!"), unet=unet,
                                         scheduler=sched, force_zeros_for_empty_prompt=True, add_watermarker=False)
    else:
        sd2 = arch == "sd2v"
        width = 64 if sd2 else 32
        unet = UNet2DConditionModel(**common, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=width,
                                    attention_head_dim=(1, 1) if sd2 else 8, use_linear_projection=sd2)
        te = CLIPTextModel(_text_config(width, "gelu" if sd2 else "quick_gelu"))
        sched = DDIMScheduler(**SD_BETAS, steps_offset=1, clip_sample=False, set_alpha_to_one=False,
                              prediction_type="v_prediction" if sd2 else "epsilon")
        pipe = StableDiffusionPipeline(vae=_vae(0.18215), text_encoder=te, tokenizer=_tokenizer("!" if sd2 else None),
                                       unet=unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(arch: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Build a tiny ``arch`` pipeline and save it as a diffusers folder (safetensors) at ``out_dir``."""
    out = Path(out_dir)
    build_tiny_pipeline(arch, seed).save_pretrained(str(out), safe_serialization=True)
    return out
