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
        assert REWARDS[name]().name == name or name in ("red", "blue")  # TargetColor is named target_color
        if name in MODEL_REWARDS:
            with pytest.raises(MissingRewardWeights, match=name):
                make_reward(name)
        else:
            assert make_reward(name).name
