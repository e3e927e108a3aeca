"""Procedural, seeded dataset of captioned coloured shapes.

Every image is 32x32 RGB: one shape (circle, square or triangle) of a
foreground colour on a uniform background of a different colour, at a random
position and size.  The caption follows a fixed grammar::

    "a {fg} {shape} on a {bg} background"      e.g. "a red circle on a blue background"

This is the training data of the project's embedded default text-to-image model
(:mod:`rlr_backend.models.pretrain_default`) and of the prompt-alignment
classifier (:mod:`rlr_backend.rewards.alignment`), so "does the image match its
caption" has a ground truth.

A deterministic split of the 90 (shape, fg, bg) combinations holds 14 of them
out of training (:func:`heldout_combinations`); every shape and every colour
still appears in training as foreground and as background, so the held-out
combinations measure compositional generalisation.

All randomness goes through an explicit :class:`numpy.random.Generator`; the
same seed gives the same images, bit for bit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "SHAPES",
    "COLORS",
    "COLOR_RGB",
    "IMAGE_SIZE",
    "ShapeAttrs",
    "render",
    "render_rgb",
    "make_caption",
    "parse_caption",
    "all_combinations",
    "heldout_combinations",
    "train_combinations",
    "sample_attrs",
    "make_batch",
    "iterate_batches",
    "attrs_to_labels",
]

IMAGE_SIZE = 32
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "white", "black")
#: sRGB values of the colours; chosen far apart so every pair is easy to tell apart.
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (245, 215, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}

#: Size of the shape: radius of the circle / half side of the square / circumradius
#: of the triangle, in pixels of the 32x32 image.
MIN_SIZE, MAX_SIZE = 6.0, 12.0
_SUPERSAMPLE = 4  # render at 4x and downsample for anti-aliased edges

_CAPTION_RE = re.compile(r"^\s*an?\s+(\w+)\s+(\w+)\s+on\s+an?\s+(\w+)\s+background\s*\.?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class ShapeAttrs:
    """Attributes of one image. ``cx, cy, size`` are in pixels of the final image."""

    shape: str
    fg: str
    bg: str
    cx: float = IMAGE_SIZE / 2
    cy: float = IMAGE_SIZE / 2
    size: float = 9.0

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        for role, c in (("foreground", self.fg), ("background", self.bg)):
            if c not in COLORS:
                raise ValueError(f"unknown {role} colour {c!r}; expected one of {COLORS}")
        if self.fg == self.bg:
            raise ValueError(f"foreground and background colour must differ (both {self.fg!r})")

    @property
    def combination(self) -> tuple[str, str, str]:
        return (self.shape, self.fg, self.bg)


def render(attrs: ShapeAttrs, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Render one image as a uint8 array of shape (image_size, image_size, 3).

    Positions and sizes are given for a 32x32 image and scaled to ``image_size``.
    """
    return render_rgb(attrs.shape, COLOR_RGB[attrs.fg], COLOR_RGB[attrs.bg], attrs.cx, attrs.cy, attrs.size, image_size)


def render_rgb(shape: str, fg_rgb: Sequence[int], bg_rgb: Sequence[int], cx: float, cy: float, size: float, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Like :func:`render` with arbitrary RGB colours (used e.g. to make a classifier's
    shape features colour-agnostic)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    s = _SUPERSAMPLE * image_size
    k = s / IMAGE_SIZE
    img = Image.new("RGB", (s, s), tuple(int(v) for v in bg_rgb))
    draw = ImageDraw.Draw(img)
    cx, cy, r = cx * k, cy * k, size * k
    fill = tuple(int(v) for v in fg_rgb)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        h = r * 0.9  # a square of the same "size" looks bigger than a circle; shrink a little
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    else:  # upward equilateral triangle, centred on its centroid; enlarged so its area is
        r = r * 1.2  # closer to the other shapes' at the same size
        pts = [(cx + r * np.cos(a), cy - r * np.sin(a)) for a in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3)]
        draw.polygon(pts, fill=fill)
    img = img.resize((image_size, image_size), Image.BOX)
    return np.asarray(img, dtype=np.uint8)


def make_caption(attrs: ShapeAttrs | tuple[str, str, str]) -> str:
    """Caption of an image: ``"a {fg} {shape} on a {bg} background"``.

    Accepts a :class:`ShapeAttrs` or a ``(shape, fg, bg)`` tuple.
    """
    if not isinstance(attrs, ShapeAttrs):
        shape, fg, bg = attrs
        attrs = ShapeAttrs(shape, fg, bg)
    return f"a {attrs.fg} {attrs.shape} on a {attrs.bg} background"


def parse_caption(text: str) -> ShapeAttrs:
    """Parse a caption of the grammar ``"a {fg} {shape} on a {bg} background"``.

    Case and surrounding whitespace are ignored, "an" is accepted for "a" and a
    final full stop is allowed.  Position and size of the returned attributes are
    the defaults (a caption does not say them).

    Raises:
        ValueError: if ``text`` is not in the grammar or names an unknown shape or
            colour; the message quotes the caption and lists the valid words.
    """
    if not isinstance(text, str):
        raise ValueError(f"caption must be a string, got {type(text).__name__}")
    m = _CAPTION_RE.match(text)
    if m is None:
        raise ValueError(
            f"caption {text!r} is not of the form 'a <colour> <shape> on a <colour> background' "
            f"(shapes: {', '.join(SHAPES)}; colours: {', '.join(COLORS)})"
        )
    fg, shape, bg = (g.lower() for g in m.groups())
    problems = []
    if shape not in SHAPES:
        problems.append(f"unknown shape {shape!r} (expected one of {', '.join(SHAPES)})")
    if fg not in COLORS:
        problems.append(f"unknown foreground colour {fg!r} (expected one of {', '.join(COLORS)})")
    if bg not in COLORS:
        problems.append(f"unknown background colour {bg!r} (expected one of {', '.join(COLORS)})")
    if not problems and fg == bg:
        problems.append(f"foreground and background colour are both {fg!r}")
    if problems:
        raise ValueError(f"caption {text!r}: " + "; ".join(problems))
    return ShapeAttrs(shape, fg, bg)


def all_combinations() -> list[tuple[str, str, str]]:
    """All 90 valid (shape, fg, bg) combinations, in a fixed order."""
    return [(s, f, b) for s in SHAPES for f in COLORS for b in COLORS if f != b]


def _is_heldout(shape: str, fg: str, bg: str) -> bool:
    # (s + f + b) % 6 == 0 picks 14 combinations; each (fg, bg) pair is held out for at
    # most one shape, and every shape/colour keeps many training combinations.
    return (SHAPES.index(shape) + COLORS.index(fg) + COLORS.index(bg)) % 6 == 0


def heldout_combinations() -> list[tuple[str, str, str]]:
    """The 14 (shape, fg, bg) combinations kept out of training, for evaluation."""
    return [c for c in all_combinations() if _is_heldout(*c)]


def train_combinations() -> list[tuple[str, str, str]]:
    """The 76 (shape, fg, bg) combinations used for training."""
    return [c for c in all_combinations() if not _is_heldout(*c)]


def _combos(split: str) -> list[tuple[str, str, str]]:
    if split == "train":
        return train_combinations()
    if split == "heldout":
        return heldout_combinations()
    if split == "all":
        return all_combinations()
    raise ValueError(f"unknown split {split!r}; expected 'train', 'heldout' or 'all'")


def sample_attrs(rng: np.random.Generator, n: int, split: str = "train") -> list[ShapeAttrs]:
    """Draw ``n`` random attributes: a uniform combination of ``split``, a uniform
    size in [MIN_SIZE, MAX_SIZE] and a centre that keeps the shape inside the image."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError("rng must be a numpy.random.Generator (e.g. numpy.random.default_rng(seed))")
    combos = _combos(split)
    idx = rng.integers(0, len(combos), size=n)
    sizes = rng.uniform(MIN_SIZE, MAX_SIZE, size=n)
    u = rng.uniform(0.0, 1.0, size=(n, 2))
    out = []
    for i in range(n):
        shape, fg, bg = combos[idx[i]]
        r = float(sizes[i])
        lo, hi = r, IMAGE_SIZE - r
        cx, cy = lo + u[i, 0] * (hi - lo), lo + u[i, 1] * (hi - lo)
        out.append(ShapeAttrs(shape, fg, bg, float(cx), float(cy), r))
    return out


def attrs_to_labels(attrs: Sequence[ShapeAttrs]) -> np.ndarray:
    """Integer labels, shape (n, 3): indices into SHAPES, COLORS (fg), COLORS (bg)."""
    return np.array([[SHAPES.index(a.shape), COLORS.index(a.fg), COLORS.index(a.bg)] for a in attrs], dtype=np.int64).reshape(-1, 3)


def make_batch(rng: np.random.Generator, n: int, split: str = "train", image_size: int = IMAGE_SIZE):
    """A batch of ``n`` random images of ``split``.

    Returns ``(images, captions, attrs)``: ``images`` is a float32 numpy array of
    shape (n, 3, image_size, image_size) in [0, 1], ``captions`` a list of str,
    ``attrs`` a list of :class:`ShapeAttrs`.  Use ``torch.from_numpy(images)`` for
    a tensor.
    """
    attrs = sample_attrs(rng, n, split)
    imgs = np.stack([render(a, image_size) for a in attrs]) if n else np.zeros((0, image_size, image_size, 3), np.uint8)
    images = imgs.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    return images, [make_caption(a) for a in attrs], attrs


def iterate_batches(seed: int, batch_size: int, split: str = "train", image_size: int = IMAGE_SIZE) -> Iterator[tuple]:
    """Endless iterator of :func:`make_batch` batches from ``numpy.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    while True:
        yield make_batch(rng, batch_size, split, image_size)
