"""Image preprocessing of CLIP/BLIP reward models as differentiable torch ops (no torchvision, no PIL).

Every reward model here was trained on ``Resize(shorter side -> S, bicubic)`` +
``CenterCrop(S)`` + ``Normalize(mean, std)`` of images in [0, 1] (OpenAI CLIP's ``_transform``,
open_clip's validation transform, transformers' ``CLIPImageProcessor``, ImageReward's ``_transform``).
Here the resize is ``F.interpolate(mode="bicubic", antialias=True)``, which follows PIL's filter
when shrinking; PIL rounds to 8-bit and clips, this does neither, so values differ from the
reference pipelines by up to about 1/255 per pixel and gradients flow through every step.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

#: OpenAI CLIP's normalisation, also used by open_clip's OpenAI/LAION models, PickScore, HPSv2, ImageReward.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


def resize_center_crop(images: Tensor, size: int) -> Tensor:
    """Bicubic resize of the shorter side to ``size`` (antialiased), then a central ``size x size`` crop."""
    h, w = images.shape[-2:]
    if (h, w) != (size, size):
        # output size and crop offsets as torchvision's Resize(int) / CenterCrop compute them
        new_h, new_w = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
        images = F.interpolate(images, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        images = images[..., top:top + size, left:left + size]
    return images


def normalize(images: Tensor, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> Tensor:
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - m) / s


def clip_pixels(images: Tensor, size: int, mean: Sequence[float] = CLIP_MEAN,
                std: Sequence[float] = CLIP_STD) -> Tensor:
    """Images (B, 3, H, W) in [0, 1] -> the model's ``pixel_values`` (B, 3, size, size)."""
    return normalize(resize_center_crop(images, size), mean, std)
