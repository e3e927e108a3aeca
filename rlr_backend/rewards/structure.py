"""Structure rewards on the embedded model's domain: where the shape is, and how large.

Both read the caption (``"a red circle on a blue background"``) for the shape's and the
background's colours and compute a soft foreground mask from the pixels,

    m(p) = sigmoid((|img(p) - bg|^2 - |img(p) - fg|^2) / tau),   tau = 0.05,

which is about 1 on the shape, 0 on the background and 1/2 on an anti-aliased edge; it is smooth
in the pixels, so both rewards are differentiable. Their optimum is 0 and it is reachable (the
dataset draws shapes anywhere with radius 6-12 px of 32), so the headroom is the base model's score.

* ``position``: minus the distance (in image widths) from the mask's centroid to a target: ``left``
  (x = 1/4), ``right`` (x = 3/4), ``top`` (y = 1/4), ``bottom`` (y = 3/4), ``center`` or a point ``X:Y``.
  Where a shape goes is decided in the first, noisiest denoising steps: a reward that backprop through
  the last steps hardly reaches.
* ``size``: minus |fraction of the image covered by the mask - target|.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..choices import position_target, size_target
from ..data.shapes import COLOR_RGB, parse_caption
from .base import check_images

TAU = 0.05


def _colours(prompts: Sequence[str], name: str, device, dtype) -> tuple[Tensor, Tensor]:
    """(B, 3) foreground and background colours in [0, 1] named by the captions."""
    fg, bg = [], []
    for p in prompts:
        try:
            a = parse_caption(p)
        except ValueError as e:
            raise ValueError(f"the {name} reward reads the shape's colours from captions like 'a red circle on a "
                             f"blue background' (the embedded model's); {e}") from None
        fg.append(COLOR_RGB[a.fg])
        bg.append(COLOR_RGB[a.bg])
    to = dict(device=device, dtype=dtype)
    return torch.tensor(fg, **to) / 255, torch.tensor(bg, **to) / 255


def foreground_mask(images: Tensor, prompts: Sequence[str], name: str = "structure") -> Tensor:
    """(B, H, W) soft mask of the caption's foreground colour against its background colour."""
    check_images(images)
    if len(prompts) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts")
    fg, bg = _colours(prompts, name, images.device, images.dtype)
    d_fg = (images - fg[:, :, None, None]).pow(2).sum(1)
    d_bg = (images - bg[:, :, None, None]).pow(2).sum(1)
    return torch.sigmoid((d_bg - d_fg) / TAU)


def centroid(mask: Tensor) -> Tensor:
    """(B, 2) centre of mass (x, y) of a (B, H, W) mask in [0, 1] image coordinates (the image centre when empty)."""
    b, h, w = mask.shape
    ys = (torch.arange(h, device=mask.device, dtype=mask.dtype) + 0.5) / h
    xs = (torch.arange(w, device=mask.device, dtype=mask.dtype) + 0.5) / w
    total = mask.flatten(1).sum(1) + 1.0  # one pixel's worth at the centre keeps an empty mask finite
    cx = ((mask * xs).flatten(1).sum(1) + 0.5) / total
    cy = ((mask * ys[:, None]).flatten(1).sum(1) + 0.5) / total
    return torch.stack([cx, cy], dim=1)


class ShapePosition:
    differentiable = True

    def __init__(self, target: str = "left"):
        self.target = target
        self.xy = position_target(target)
        self.name = f"position:{target}"

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        c = centroid(foreground_mask(images, prompts, "position"))
        sq = torch.zeros_like(c[:, 0])
        for axis, t in enumerate(self.xy):
            if t is not None:
                sq = sq + (c[:, axis] - t) ** 2
        return -torch.sqrt(sq + 1e-8)


class ShapeSize:
    differentiable = True

    def __init__(self, target: str | float = "0.4"):
        self.fraction = size_target(str(target))
        self.name = f"size:{self.fraction:g}"

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        covered = foreground_mask(images, prompts, "size").flatten(1).mean(1)
        return -(covered - self.fraction).abs()
