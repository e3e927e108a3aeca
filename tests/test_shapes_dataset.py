"""The procedural coloured-shapes dataset: caption grammar, determinism, held-out split."""

import numpy as np
import pytest

from rlr_backend.data import shapes
from rlr_backend.data.shapes import (
    COLOR_RGB,
    COLORS,
    SHAPES,
    ShapeAttrs,
    all_combinations,
    heldout_combinations,
    make_batch,
    make_caption,
    parse_caption,
    render,
    sample_attrs,
    train_combinations,
)


def test_caption_round_trip_every_combination():
    for shape, fg, bg in all_combinations():
        cap = make_caption((shape, fg, bg))
        assert cap == f"a {fg} {shape} on a {bg} background"
        assert parse_caption(cap).combination == (shape, fg, bg)


def test_parse_is_lenient_on_case_article_and_full_stop():
    assert parse_caption("  A Red Triangle on an Yellow background. ").combination == ("triangle", "red", "yellow")


@pytest.mark.parametrize(
    "bad, needle",
    [
        ("a red circle", "not of the form"),
        ("a purple circle on a blue background", "purple"),
        ("a red hexagon on a blue background", "hexagon"),
        ("a red circle on a red background", "both"),
        ("", "not of the form"),
    ],
)
def test_parse_rejects_captions_outside_the_grammar(bad, needle):
    with pytest.raises(ValueError) as e:
        parse_caption(bad)
    assert repr(bad) in str(e.value) and needle in str(e.value)


def test_attrs_validate():
    with pytest.raises(ValueError):
        ShapeAttrs("circle", "red", "red")
    with pytest.raises(ValueError):
        ShapeAttrs("star", "red", "blue")


def test_batches_are_deterministic_given_the_seed():
    a, ca, _ = make_batch(np.random.default_rng(7), 16)
    b, cb, _ = make_batch(np.random.default_rng(7), 16)
    c, cc, _ = make_batch(np.random.default_rng(8), 16)
    assert a.shape == (16, 3, 32, 32) and a.dtype == np.float32
    assert 0.0 <= a.min() and a.max() <= 1.0
    np.testing.assert_array_equal(a, b)
    assert ca == cb
    assert not np.array_equal(a, c)


def test_iterate_batches_matches_make_batch():
    it = shapes.iterate_batches(3, 4)
    x1, c1, _ = next(it)
    x, c, _ = make_batch(np.random.default_rng(3), 4)
    np.testing.assert_array_equal(x1, x)
    assert c1 == c


def test_heldout_split_is_disjoint_and_covers_every_value_in_training():
    held, train, every = set(heldout_combinations()), set(train_combinations()), set(all_combinations())
    assert len(every) == 90 and len(held) == 14
    assert held.isdisjoint(train) and held | train == every
    for i, values in enumerate((SHAPES, COLORS, COLORS)):
        assert {c[i] for c in train} == set(values)
    # same answer on every call
    assert heldout_combinations() == heldout_combinations()


def test_split_sampling_respects_the_split():
    rng = np.random.default_rng(0)
    held = set(heldout_combinations())
    assert all(a.combination in held for a in sample_attrs(rng, 200, "heldout"))
    assert not any(a.combination in held for a in sample_attrs(rng, 200, "train"))
    with pytest.raises(ValueError):
        sample_attrs(rng, 1, "test")


def test_render_draws_the_colours_where_expected():
    img = render(ShapeAttrs("square", "red", "blue", 16, 16, 10))
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert tuple(img[16, 16]) == COLOR_RGB["red"]
    assert tuple(img[0, 0]) == COLOR_RGB["blue"]


def test_render_distinguishes_shapes():
    imgs = [render(ShapeAttrs(s, "white", "black", 16, 16, 11)).astype(int) for s in SHAPES]
    for i in range(3):
        for j in range(i + 1, 3):
            assert np.abs(imgs[i] - imgs[j]).sum() > 1000
