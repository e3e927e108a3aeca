"""Tiny random-initialised diffusers models for tests and benchmarks (no weights downloaded)."""

from __future__ import annotations

import torch


def build_tiny_unet(sample_size: int = 32, channels: int = 3, cross_attention_dim: int = 32,
                    block_out_channels: tuple[int, ...] = (32, 64), seed: int = 0):
    """A ~1M-parameter UNet2DConditionModel with SD1.x's block layout, randomly initialised from ``seed``."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)  # diffusers initialises from the global RNG; keep it explicit here
    n = len(block_out_channels)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=channels, out_channels=channels, layers_per_block=1,
        block_out_channels=block_out_channels,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=16,
    )
