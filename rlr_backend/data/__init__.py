"""Synthetic data: the captioned coloured-shapes dataset (see :mod:`rlr_backend.data.shapes`)."""

from .shapes import (
    COLORS,
    IMAGE_SIZE,
    SHAPES,
    ShapeAttrs,
    all_combinations,
    attrs_to_labels,
    heldout_combinations,
    iterate_batches,
    make_batch,
    make_caption,
    parse_caption,
    render,
    sample_attrs,
    train_combinations,
)

__all__ = [
    "COLORS",
    "IMAGE_SIZE",
    "SHAPES",
    "ShapeAttrs",
    "all_combinations",
    "attrs_to_labels",
    "heldout_combinations",
    "iterate_batches",
    "make_batch",
    "make_caption",
    "parse_caption",
    "render",
    "sample_attrs",
    "train_combinations",
]
