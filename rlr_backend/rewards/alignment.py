"""Prompt-alignment reward for the embedded default model.

A small CNN (:class:`ShapeClassifier`) predicts the shape, the foreground colour
and the background colour of a 32x32 image of the coloured-shapes dataset
(:mod:`rlr_backend.data.shapes`).  :class:`PromptAlignmentReward` parses each
prompt ("a red circle on a blue background") and returns the classifier's
probability that the image shows what the prompt says:

    reward = p(shape) * p(fg) * p(bg)             (combine="product", default)
    reward = (p(shape) * p(fg) * p(bg)) ** (1/3)  (combine="geometric_mean")

The reward is differentiable with respect to the images (softmax probabilities,
no argmax).  The weights are committed as
``rlr_backend/assets/alignment_classifier.safetensors`` and reproduced by
``python -m rlr_backend.rewards.train_alignment``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from rlr_backend.data.shapes import COLORS, IMAGE_SIZE, SHAPES, ShapeAttrs, parse_caption

logger = logging.getLogger(__name__)

#: Committed classifier weights (inside the installed package).
DEFAULT_CLASSIFIER_PATH: Path = Path(__file__).resolve().parent.parent / "assets" / "alignment_classifier.safetensors"

ATTRIBUTES: tuple[str, ...] = ("shape", "fg", "bg")
CLASSES: dict[str, tuple[str, ...]] = {"shape": SHAPES, "fg": COLORS, "bg": COLORS}


class ShapeClassifier(nn.Module):
    """CNN: image (B, 3, 32, 32) in [0, 1] -> logits for shape (3), fg colour (6), bg colour (6)."""

    def __init__(self, width: int = 24):
        super().__init__()
        w = width
        self.width = w
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.SiLU(),
            nn.AvgPool2d(2),  # 16x16
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.SiLU(),
            nn.AvgPool2d(2),  # 8x8
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.SiLU(),
        )
        self.trunk = nn.Sequential(nn.Linear(8 * w + 3, 4 * w), nn.SiLU())
        self.heads = nn.ModuleDict({a: nn.Linear(4 * w, len(CLASSES[a])) for a in ATTRIBUTES})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = images * 2.0 - 1.0
        h = self.features(x)
        # mean + max pooling of the features, plus the mean colour (helps the background head)
        pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3)), x.mean(dim=(2, 3))], dim=1)
        z = self.trunk(pooled)
        return {a: head(z) for a, head in self.heads.items()}


def save_classifier(model: ShapeClassifier, path: str | Path, extra_metadata: dict | None = None) -> None:
    """Save weights as safetensors with the architecture and class lists in the metadata."""
    from safetensors.torch import save_file

    meta = {
        "format": "rlr_backend.alignment.ShapeClassifier",
        "width": str(model.width),
        "classes": json.dumps(CLASSES),
    }
    for k, v in (extra_metadata or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(path), metadata=meta)


def load_classifier(path: str | Path | None = None) -> ShapeClassifier:
    """Load a :class:`ShapeClassifier` from a safetensors file (default: the committed one).

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: the file is not safetensors, or its metadata/classes do not match.
    """
    from ..safe_io import load_tensors, one_line

    p = Path(DEFAULT_CLASSIFIER_PATH if path is None else path)
    if p.suffix in {".ckpt", ".pt", ".pth", ".bin", ".pkl"}:
        raise ValueError(f"{p}: pickle-based weight files are not loaded; give a .safetensors file")
    if not p.is_file():
        raise FileNotFoundError(f"alignment classifier weights {p} not found; rebuild with: python -m rlr_backend.rewards.train_alignment --out {p}")
    sd, meta = load_tensors(p)  # refuses pickles, damaged headers and NaN/inf tensors, naming the tensor
    if meta.get("format") != "rlr_backend.alignment.ShapeClassifier":
        raise ValueError(f"{p} is not a ShapeClassifier weight file (metadata format={meta.get('format')!r})")
    if json.loads(meta.get("classes", "{}")) != {k: list(v) for k, v in CLASSES.items()}:
        raise ValueError(f"{p} was trained for other classes than {CLASSES}")
    try:
        model = ShapeClassifier(width=int(meta.get("width", 24)))
        model.load_state_dict(sd)
    except (RuntimeError, ValueError) as e:  # missing keys or wrong shapes
        raise ValueError(f"{p}: the tensors do not fit a ShapeClassifier ({one_line(e)[:300]})") from None
    model.eval()
    return model


class PromptAlignmentReward:
    """Probability that an image of the coloured-shapes domain matches its caption.

    ``reward(images, prompts)`` takes images as float (B, 3, H, W) in [0, 1] (resized
    to 32x32 if needed, differentiably) and prompts in the dataset's grammar, and
    returns a (B,) tensor in [0, 1].  Differentiable with respect to ``images``;
    the classifier's own weights are frozen.

    Args:
        weights: safetensors file; default: the committed classifier.
        device, dtype: where and in which dtype the classifier runs.  The reward is
            returned on ``device`` in ``dtype``.
        combine: "product" (default; the probability that all three attributes
            match, if they are independent) or "geometric_mean".
    """

    differentiable = True
    name = "prompt_alignment"

    def __init__(self, weights: str | Path | None = None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, combine: str = "product"):
        if combine not in ("product", "geometric_mean"):
            raise ValueError(f"combine must be 'product' or 'geometric_mean', got {combine!r}")
        self.combine = combine
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = load_classifier(weights).to(device=self.device, dtype=dtype)
        self.model.requires_grad_(False)
        self._parsed: dict[str, tuple[int, int, int]] = {}

    # ---------------------------------------------------------------- helpers
    @staticmethod
    def _check_images(images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a float tensor of shape (B, 3, H, W) in [0, 1], got {shape}")

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        self._check_images(images)
        x = images.to(device=self.device, dtype=self.dtype)
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False, antialias=True)
        return x

    def parse(self, prompt: str) -> tuple[int, int, int]:
        """Class indices (shape, fg, bg) named by ``prompt``; ValueError naming the prompt if unparseable."""
        if prompt not in self._parsed:
            try:
                a = parse_caption(prompt)
            except ValueError as e:
                raise ValueError(f"prompt alignment reward cannot parse prompt {prompt!r}: {e}") from None
            self._parsed[prompt] = (SHAPES.index(a.shape), COLORS.index(a.fg), COLORS.index(a.bg))
        return self._parsed[prompt]

    def _targets(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        self._check_images(images)
        if isinstance(prompts, str):
            prompts = [prompts]
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts")
        return torch.tensor([self.parse(p) for p in prompts], device=self.device, dtype=torch.long).reshape(-1, 3)

    # ---------------------------------------------------------------- API
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-attribute class probabilities: {"shape": (B, 3), "fg": (B, 6), "bg": (B, 6)}."""
        logits = self.model(self._prepare(images))
        return {a: l.softmax(dim=-1) for a, l in logits.items()}

    def predict_attributes(self, images: torch.Tensor) -> list[dict[str, str]]:
        """Most likely shape / fg / bg names per image (argmax; for evaluation, not differentiable)."""
        with torch.no_grad():
            probs = self.predict(images)
        idx = {a: p.argmax(dim=-1).tolist() for a, p in probs.items()}
        return [{a: CLASSES[a][idx[a][i]] for a in ATTRIBUTES} for i in range(len(idx["shape"]))]

    def attribute_probs(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """(B, 3) probabilities of the prompt's shape, fg colour and bg colour."""
        target = self._targets(images, prompts)
        probs = self.predict(images)
        return torch.stack([probs[a].gather(1, target[:, i : i + 1]).squeeze(1) for i, a in enumerate(ATTRIBUTES)], dim=1)

    def match(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """(B, 3) bool: does the predicted shape / fg / bg equal the prompt's (argmax)."""
        with torch.no_grad():
            target = self._targets(images, prompts)
            probs = self.predict(images)
            pred = torch.stack([probs[a].argmax(dim=-1) for a in ATTRIBUTES], dim=1)
        return pred == target

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        p = self.attribute_probs(images, prompts)
        r = p.prod(dim=1)
        if self.combine == "geometric_mean":
            r = r.clamp_min(1e-12) ** (1.0 / 3.0)
        return r


def labels_for(attrs: Sequence[ShapeAttrs]) -> torch.Tensor:
    """(n, 3) long tensor of (shape, fg, bg) class indices."""
    return torch.tensor([[SHAPES.index(a.shape), COLORS.index(a.fg), COLORS.index(a.bg)] for a in attrs], dtype=torch.long).reshape(-1, 3)
