"""Tiny random-initialised flow-matching pipelines (tests): SD3 / SD3.5, FLUX.1 (dev and schnell), Z-Image,
Qwen-Image (:mod:`rlr_backend.models.tiny_qwenimage`, which has its own sizes).

The real architectures' classes and conditioning paths with widths shrunk (shared/reference/flow-matching.md
§3, diffusers' own test configs), 32x32 images: VAE blocks (16, 32) (factor 2), so latents are 16x16 and the
transformers see 8x8 = 64 tokens of a 2x2 patch. CLIP text encoders use the embedded default model's CLIP BPE
vocabulary (``tiny_pipelines._tokenizer``); T5 and Qwen3 encoders are tiny too, with tokenizers built from
local files only. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .tiny_pipelines import _text_config, _tokenizer, _vae

FLOW_ARCHS = ("sd3", "sd35", "flux_dev", "flux_schnell", "zimage", "qwenimage")


def build_tiny_sd3(sd35: bool = False, seed: int = 0):
    """A random-init ``StableDiffusion3Pipeline`` without T5 (as diffusers allows): two CLIP encoders with
    projection (width 32, pooled 32 + 32), a 2-layer MMDiT (SD3.5: dual attention in layer 0, RMS qk-norm)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    extra = dict(dual_attention_layers=(0,), qk_norm="rms_norm") if sd35 else {}
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=64,
                                        caption_projection_dim=16, pooled_projection_dim=64, pos_embed_max_size=16,
                                        **extra)
    te = CLIPTextModelWithProjection(_text_config(32, "quick_gelu", projection_dim=32))
    te2 = CLIPTextModelWithProjection(_text_config(32, "gelu", projection_dim=32))
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=_vae(1.5305, shift_factor=0.0609), text_encoder=te, tokenizer=_tokenizer(),
                                    text_encoder_2=te2, tokenizer_2=_tokenizer("!"), text_encoder_3=None,
                                    tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_flow_pipeline(arch: str, seed: int = 0):
    """A random-init pipeline of ``arch`` in ``FLOW_ARCHS``."""
    if arch in ("sd3", "sd35"):
        return build_tiny_sd3(arch == "sd35", seed)
    if arch in ("flux_dev", "flux_schnell"):
        from .tiny_flux import build_tiny_flux

        return build_tiny_flux(arch == "flux_dev", seed)
    if arch == "zimage":
        from .tiny_flux import build_tiny_zimage

        return build_tiny_zimage(seed)
    if arch == "qwenimage":
        from .tiny_qwenimage import build_tiny_qwenimage

        return build_tiny_qwenimage(seed)
    raise ValueError(f"unknown tiny flow architecture {arch!r}; choose one of {FLOW_ARCHS}")


def save_tiny_flow_pipeline(arch: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Build a tiny ``arch`` pipeline and save it as a diffusers folder (safetensors) at ``out_dir``."""
    out = Path(out_dir)
    build_tiny_flow_pipeline(arch, seed).save_pretrained(str(out), safe_serialization=True)
    return out
