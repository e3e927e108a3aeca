"""Rule rewards, the registry, weighted sums and custom callables."""

import pytest
import torch

from rlr_backend.rewards import REWARD_HELP, REWARDS, CallableReward, make_reward


def test_rule_rewards_order_images_as_named():
    black, white = torch.zeros(1, 3, 16, 16), torch.ones(1, 3, 16, 16)
    red = torch.zeros(1, 3, 16, 16)
    red[:, 0] = 1
    noise = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    imgs = torch.cat([black, white, red, noise])
    p = [""] * 4
    b = make_reward("brightness")(imgs, p)
    assert b[1] > b[2] > b[0]
    assert make_reward("darkness")(imgs, p)[0] == 1
    assert make_reward("saturation")(imgs, p).argmax() == 2
    assert make_reward("red")(imgs, p).argmax() == 2
    assert make_reward("contrast")(imgs, p).argmax() == 3
    jpeg = make_reward("jpeg_compressibility")
    assert not jpeg.differentiable and jpeg(imgs, p).argmin() == 3  # noise compresses worst


def test_differentiable_rewards_pass_gradients():
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    for name in ("brightness", "saturation", "contrast", "red"):
        x.grad = None
        make_reward(name)(x, ["", ""]).sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0, name


def test_weighted_sum_and_errors():
    x = torch.rand(2, 3, 8, 8)
    both = make_reward("brightness=2,darkness=1")
    torch.testing.assert_close(both(x, ["", ""]), 2 * x.flatten(1).mean(1) + 1 - x.flatten(1).mean(1))
    assert not make_reward("brightness,jpeg_compressibility").differentiable
    with pytest.raises(ValueError, match="choose one of"):
        make_reward("aesthetics")
    with pytest.raises(ValueError, match="must be a number"):
        make_reward("brightness=lots")
    with pytest.raises(ValueError, match="no reward"):
        make_reward("")


def test_custom_callable_reward():
    r = CallableReward(lambda imgs, prompts: imgs[:, 1].flatten(1).mean(1), differentiable=True, name="green")
    assert r.name == "green" and r(torch.ones(3, 3, 4, 4), ["a"] * 3).shape == (3,)
    with pytest.raises(TypeError):
        CallableReward(42)


def test_every_registered_reward_builds(monkeypatch):
    """Every factory builds (model rewards lazily); make_reward builds the weightless ones and, without
    a weights folder, refuses the model rewards (tests/test_reward_models.py builds them from tiny weights)."""
    from rlr_backend.rewards import MissingRewardWeights
    from rlr_backend.rewards.models import MODEL_REWARDS

    monkeypatch.delenv("RLR_REWARD_MODELS", raising=False)
    assert set(MODEL_REWARDS) <= set(REWARDS) and set(REWARDS) <= set(REWARD_HELP)
    for name in REWARDS:
        assert REWARDS[name]().name.split(":")[0] == name or name in ("red", "blue")  # TargetColor: target_color
        if name in MODEL_REWARDS:
            with pytest.raises(MissingRewardWeights, match=name):
                make_reward(name)
        else:
            assert make_reward(name).name


# -- structure rewards: position and size of the shape -------------------------------------------------
def _shape(cx: float, cy: float, size: float) -> tuple[torch.Tensor, list[str]]:
    from rlr_backend.data.shapes import ShapeAttrs, make_caption, render

    a = ShapeAttrs("circle", "red", "blue", cx=cx, cy=cy, size=size)
    return torch.tensor(render(a)).permute(2, 0, 1)[None].double() / 255, [make_caption(a)]


@pytest.mark.parametrize("spec,cx,cy,size,expected", [
    ("position:left", 8, 16, 7, 0.0), ("position:right", 8, 16, 7, -0.5), ("position:top", 16, 8, 7, 0.0),
    ("position:bottom", 16, 8, 7, -0.5), ("position:center", 16, 16, 7, 0.0), ("position:0.75:0.25", 24, 8, 7, 0.0),
    ("size:0.15", 16, 16, 7, -abs(3.14159 * 49 / 1024 - 0.15)), ("size:0.5", 16, 16, 12, -abs(3.14159 * 144 / 1024 - 0.5)),
])
def test_structure_rewards_measure_the_rendered_shape(spec, cx, cy, size, expected):
    images, captions = _shape(cx, cy, size)
    assert float(make_reward(spec)(images, captions)) == pytest.approx(expected, abs=0.012)


@pytest.mark.parametrize("spec", ["position:left", "position:0.3:0.7", "size:0.3"])
def test_structure_reward_gradients_match_finite_differences(spec):
    images, captions = _shape(13, 18, 8)
    images = (images * 0.8 + 0.1 + 0.05 * torch.randn_like(images, generator=None)).clamp(0, 1)  # off the saturation
    small = images[:, :, 8:24, 4:20].clone().requires_grad_()  # gradcheck on a 16x16 crop (its own image)
    reward = make_reward(spec)
    assert torch.autograd.gradcheck(lambda x: reward(x, captions), (small,), eps=1e-6, atol=1e-5)


def test_structure_rewards_in_weighted_sums_and_bad_targets():
    from rlr_backend.choices import ConfigError, parse_reward_spec

    images, captions = _shape(8, 16, 7)
    both = make_reward("position:left=2,size:0.2=1,brightness=0.5")
    parts = [make_reward("position:left")(images, captions), make_reward("size:0.2")(images, captions),
             make_reward("brightness")(images, captions)]
    assert float(both(images, captions)) == pytest.approx(float(2 * parts[0] + parts[1] + 0.5 * parts[2]))
    assert [t.arg for t in parse_reward_spec("position,size")] == ["left", "0.4"]  # the defaults
    for bad, words in [("position:middle", "unknown position target"), ("position:1.5:0", "0-1"),
                       ("size:1.2", "between 0 and 1"), ("size:0", "between 0 and 1"), ("size:x", "between 0 and 1"),
                       ("brightness:2", "takes no argument")]:
        with pytest.raises(ConfigError, match=words):
            parse_reward_spec(bad)
    with pytest.raises(ValueError, match="captions like"):
        make_reward("position")(images, ["a photo of a cat"])
