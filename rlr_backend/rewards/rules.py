"""Rewards defined by a rule (no weights): brightness, saturation, colour, contrast, JPEG size."""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .base import check_images, to_uint8


class _Rule:
    differentiable = True
    name = "rule"

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        check_images(images)
        return self.score(images)

    def score(self, images: Tensor) -> Tensor:
        raise NotImplementedError


class Brightness(_Rule):
    """Mean pixel value in [0, 1]."""

    name = "brightness"

    def score(self, images: Tensor) -> Tensor:
        return images.flatten(1).mean(1)


class Darkness(_Rule):
    """1 - brightness."""

    name = "darkness"

    def score(self, images: Tensor) -> Tensor:
        return 1 - images.flatten(1).mean(1)


class Saturation(_Rule):
    """Mean HSV-style saturation (max - min over RGB) in [0, 1]."""

    name = "saturation"

    def score(self, images: Tensor) -> Tensor:
        return (images.amax(1) - images.amin(1)).flatten(1).mean(1)


class Contrast(_Rule):
    """Standard deviation of the luma over the image."""

    name = "contrast"

    def score(self, images: Tensor) -> Tensor:
        luma = 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]
        return luma.flatten(1).std(1)


class TargetColor(_Rule):
    """1 - mean distance of pixels to an RGB colour (components in [0, 1]); 1 means all pixels match."""

    name = "target_color"

    def __init__(self, rgb: Sequence[float] = (1.0, 0.0, 0.0)):
        if len(rgb) != 3 or not all(0 <= c <= 1 for c in rgb):
            raise ValueError(f"target colour must be three numbers in [0, 1], got {list(rgb)}")
        self.rgb = torch.tensor([float(c) for c in rgb])

    def score(self, images: Tensor) -> Tensor:
        target = self.rgb.to(images).view(1, 3, 1, 1)
        return 1 - ((images - target) ** 2).sum(1).add(1e-8).sqrt().flatten(1).mean(1) / 3**0.5


class JpegSize(_Rule):
    """DDPO's compressibility reward: -(JPEG size in kB) at quality 95, or +size for incompressibility.

    Not differentiable (the encoder is a black box).
    """

    differentiable = False

    def __init__(self, sign: float = -1.0, quality: int = 95):
        self.sign, self.quality = sign, quality
        self.name = "jpeg_compressibility" if sign < 0 else "jpeg_incompressibility"

    def score(self, images: Tensor) -> Tensor:
        sizes = []
        for img in to_uint8(images).permute(0, 2, 3, 1).numpy():
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(img)).save(buf, format="JPEG", quality=self.quality)
            sizes.append(buf.tell() / 1000)
        return self.sign * torch.tensor(sizes, dtype=images.dtype, device=images.device)
