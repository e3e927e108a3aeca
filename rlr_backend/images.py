"""Image tensors as pictures: the one image-grid layout every grid in the project uses.

Images are float tensors (N, 3, H, W) in [0, 1]. PIL is imported on first use.
"""

from __future__ import annotations

from typing import Sequence

import torch


def to_pil(images: torch.Tensor, scale: int = 1) -> list:
    """One PIL image per row of ``images``, each upscaled ``scale`` times (nearest: pixels stay sharp)."""
    from PIL import Image

    arr = (images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a).resize((a.shape[1] * scale, a.shape[0] * scale), Image.NEAREST) for a in arr]


def grid_image(pictures: Sequence, ncol: int, *, gap: int = 0, row_gap: int | None = None, margin: int = 0,
               background: str = "white"):
    """Equal-size PIL pictures in rows of ``ncol``, ``gap`` pixels between columns (``row_gap`` between rows,
    default ``gap``) and ``margin`` around, on a ``background`` canvas."""
    from PIL import Image

    ncol = max(ncol, 1)
    rows = (len(pictures) + ncol - 1) // ncol
    row_gap = gap if row_gap is None else row_gap
    w, h = pictures[0].size
    canvas = Image.new("RGB", (2 * margin + ncol * w + (ncol - 1) * gap, 2 * margin + rows * h + (rows - 1) * row_gap),
                       background)
    for i, pic in enumerate(pictures):
        r, c = divmod(i, ncol)
        canvas.paste(pic, (margin + c * (w + gap), margin + r * (h + row_gap)))
    return canvas
