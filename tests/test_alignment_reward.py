"""The prompt-alignment reward of the default model's domain (committed classifier)."""

import numpy as np
import pytest
import torch

from rlr_backend.data.shapes import COLORS, SHAPES, ShapeAttrs, make_batch, make_caption, render
from rlr_backend.rewards.alignment import (
    DEFAULT_CLASSIFIER_PATH,
    PromptAlignmentReward,
    ShapeClassifier,
    load_classifier,
    save_classifier,
)


@pytest.fixture(scope="module")
def reward():
    return PromptAlignmentReward()


@pytest.fixture(scope="module")
def heldout_batch():
    images, captions, attrs = make_batch(np.random.default_rng(123), 48, "heldout")
    return torch.from_numpy(images), captions, attrs


def _swap(attrs, which):
    """Captions with one attribute changed to another valid value."""
    out = []
    for a in attrs:
        shape, fg, bg = a.combination
        if which == "shape":
            shape = SHAPES[(SHAPES.index(shape) + 1) % len(SHAPES)]
        elif which == "fg":
            fg = next(c for c in COLORS[COLORS.index(fg) + 1 :] + COLORS if c not in (fg, bg))
        else:
            bg = next(c for c in COLORS[COLORS.index(bg) + 1 :] + COLORS if c not in (fg, bg))
        out.append(make_caption((shape, fg, bg)))
    return out


def test_committed_weights_are_safetensors():
    assert DEFAULT_CLASSIFIER_PATH.suffix == ".safetensors" and DEFAULT_CLASSIFIER_PATH.is_file()
    assert DEFAULT_CLASSIFIER_PATH.stat().st_size < 2_000_000


def test_reward_shape_range_and_flag(reward, heldout_batch):
    images, captions, _ = heldout_batch
    r = reward(images, captions)
    assert reward.differentiable is True
    assert r.shape == (len(captions),) and r.dtype == torch.float32
    assert torch.all((r >= 0) & (r <= 1))


def test_classifier_is_accurate_on_clean_heldout_images(reward, heldout_batch):
    images, captions, _ = heldout_batch
    m = reward.match(images, captions).float().mean(dim=0)
    assert torch.all(m >= 0.95), m
    assert reward(images, captions).mean() > 0.8


@pytest.mark.parametrize("which", ["shape", "fg", "bg"])
def test_matching_caption_scores_higher_than_mismatched(reward, heldout_batch, which):
    images, captions, attrs = heldout_batch
    good = reward(images, captions)
    bad = reward(images, _swap(attrs, which))
    assert (good > bad).float().mean() >= 0.95
    assert good.mean() - bad.mean() > 0.5


def test_gradient_flows_to_the_image(reward, heldout_batch):
    images, captions, _ = heldout_batch
    x = images[:4].clone().requires_grad_(True)
    reward(x, captions[:4]).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in reward.model.parameters())


def test_larger_images_are_resized(reward):
    attrs = [ShapeAttrs("triangle", "yellow", "green", 16, 16, 10), ShapeAttrs("circle", "white", "red", 12, 20, 8)]
    big = torch.from_numpy(np.stack([render(a, 64) for a in attrs]).transpose(0, 3, 1, 2).astype(np.float32) / 255)
    caps = [make_caption(a) for a in attrs]
    assert big.shape[-1] == 64
    r = reward(big, caps)
    assert torch.all(r > 0.5), r
    assert reward.predict_attributes(big)[0] == {"shape": "triangle", "fg": "yellow", "bg": "green"}


def test_geometric_mean_is_at_least_the_product(heldout_batch):
    images, captions, attrs = heldout_batch
    caps = _swap(attrs, "fg")
    p = PromptAlignmentReward(combine="product")(images, caps)
    g = PromptAlignmentReward(combine="geometric_mean")(images, caps)
    assert torch.all(g >= p - 1e-6)


def test_bad_prompts_and_shapes_raise(reward, heldout_batch):
    images, captions, _ = heldout_batch
    with pytest.raises(ValueError, match="a cat on a mat"):
        reward(images[:2], [captions[0], "a cat on a mat"])
    with pytest.raises(ValueError, match="2 prompts"):
        reward(images[:3], captions[:2])
    with pytest.raises(ValueError, match="B, 3, H, W"):
        reward(images[0], captions[:1])
    with pytest.raises(ValueError):
        PromptAlignmentReward(combine="mean")


def test_weight_file_round_trip_and_refusals(tmp_path):
    torch.manual_seed(0)
    m = ShapeClassifier(width=8)
    path = tmp_path / "clf.safetensors"
    save_classifier(m, path)
    m2 = load_classifier(path)
    x = torch.rand(2, 3, 32, 32)
    for k, v in m(x).items():
        torch.testing.assert_close(v, m2(x)[k])
    with pytest.raises(ValueError, match="safetensors"):
        load_classifier(tmp_path / "clf.pt")
    with pytest.raises(FileNotFoundError):
        load_classifier(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError):
        load_classifier(tmp_path / "junk.safetensors")
