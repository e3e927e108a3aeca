"""Tensors the estimators make follow the latents' device.

The first GPU check (docs/gpu_check.md) found two places that made them on the CPU: the step baseline's
per-prompt sums (every RLR update failed on CUDA) and the finite-reward mask of a reward scored on the CPU
(the ComfyUI trainer on CUDA). No GPU here: the first test refuses factories without a device, the second
puts the latents on the meta device, where mixing with a CPU tensor raises as it does on CUDA."""

import sys
from types import SimpleNamespace

import pytest
import torch
from torch.overrides import TorchFunctionMode

from rlr_backend.estimators.advantages import BaselineState, compute_advantages
from rlr_backend.estimators.problem import detach_rows, evaluate_reward
from rlr_backend.estimators.step_baseline import scaled_advantages

FACTORIES = {torch.zeros, torch.ones, torch.full, torch.empty, torch.arange, torch.tensor, torch.randn, torch.rand}


class NoDefaultDevice(TorchFunctionMode):
    """Raises when a tensor is made without naming its device (it would land on the CPU whatever the inputs);
    ``only``: police calls made from files whose path ends so (the tokenizer's CPU tensors are fine)."""

    def __init__(self, only: str | None = None):
        super().__init__()
        self.only = only

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        caller = sys._getframe(1).f_code.co_filename
        if func in FACTORIES and kwargs.get("device") is None and (self.only is None or caller.endswith(self.only)):
            raise AssertionError(f"torch.{func.__name__} without a device")
        return func(*args, **kwargs)


def test_the_guard_catches_a_factory_without_a_device():
    with NoDefaultDevice(), pytest.raises(AssertionError, match="torch.zeros without a device"):
        torch.zeros(3)


@pytest.mark.parametrize("kind", ["loo", "none"])
def test_the_step_baseline_makes_its_sums_on_the_rewards_device(kind):
    r = torch.tensor([1.0, 2.0, float("nan"), 4.0, 3.0], dtype=torch.float64)
    b = torch.tensor([0.5, 1.5, 1.0, 3.0, 2.0], dtype=torch.float64)
    groups = torch.tensor([0, 0, 1, 1, 1])
    expected = scaled_advantages(r, b, groups, kind)
    with NoDefaultDevice():
        adv = scaled_advantages(r, b, groups, kind)
    torch.testing.assert_close(adv, expected)
    assert adv[2] == 0 and torch.isfinite(adv).all()


def test_the_per_prompt_baseline_history_is_on_the_rewards_device():
    state = BaselineState(per_prompt_buffer=8)
    r = torch.tensor([1.0, 2.0, 3.0, 5.0])
    compute_advantages(r, "per_prompt_norm", groups=torch.tensor([0, 0, 1, 1]), state=state)
    with NoDefaultDevice():
        adv = compute_advantages(r, "per_prompt_norm", groups=torch.tensor([0, 0, 1, 1], device="cpu"), state=state)
    assert torch.isfinite(adv).all()


def test_the_trainer_makes_its_prompt_ids_on_its_device(tmp_path):
    """The trainer made the prompt ids on the CPU; with rewards on CUDA every RLR update with a prompt list
    failed in the baseline (the GPU check's ComfyUI run). (``compute_advantages`` also moves ids it is given to
    the rewards' device; with one device here that line cannot be tested on the CPU.)"""
    from rlr_backend.train import TrainConfig, Trainer

    config = TrainConfig(estimator="rlr", steps=1, batch_size=2, images_per_prompt=1, num_inference_steps=6,
                         eval_every=0, output_dir=tmp_path)
    trainer = Trainer(config, progress=False)
    with NoDefaultDevice(only="rlr_backend/train/trainer.py"):
        problem = trainer.problem([0, 1])
    assert problem.groups.device == trainer.device and problem.groups.tolist() == [0, 1]


def test_a_reward_scored_on_another_device_comes_back_on_the_latents_device():
    x0 = torch.zeros(2, 4, 8, 8, device="meta", requires_grad=True)
    problem = SimpleNamespace(reward=lambda x: torch.tensor([1.0, float("nan")]))  # scored on the CPU
    rewards, valid = evaluate_reward(problem, x0)
    assert rewards.device == valid.device == x0.device
    kept = detach_rows(x0, valid)  # mixing a CPU mask with these latents raised before
    assert kept.shape == x0.shape and kept.device == x0.device
