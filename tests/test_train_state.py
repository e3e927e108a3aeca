"""TrainState: one place for what a run resumes from; checkpoints written before it existed still resume.

``data/checkpoint_v1/run`` is a run folder (2 updates, rank-1 LoRA, checkpoint at update 2) written by the
trainer as it was before TrainState; ``lora_after_3_updates.safetensors`` is that code's LoRA after an
uninterrupted 3-update run with the same options.
"""

import json
import math
import shutil
from pathlib import Path

import torch

from rlr_backend.estimators import BaselineState, JSampler
from rlr_backend.safe_io import load_tensors
from rlr_backend.train import TrainConfig, Trainer
from rlr_backend.train.memory import DynamicLossScale
from rlr_backend.train.state import TrainState

DATA = Path(__file__).parent / "data" / "checkpoint_v1"


def test_a_checkpoint_of_the_earlier_trainer_resumes_to_its_uninterrupted_lora(tmp_path):
    run = tmp_path / "v1"
    shutil.copytree(DATA / "run", run)
    saved = json.loads((run / "config.json").read_text())
    cfg = TrainConfig.from_json({**saved, "output_dir": str(tmp_path), "steps": 3})
    trainer = Trainer(cfg, progress=False)
    result = trainer.run(resume=True)
    assert result.steps_done == 3 and not result.stopped_early
    state = json.loads((run / "ckpt" / "step-000002" / "state.json").read_text())
    assert trainer.state.eval_rewards[0] == state["eval_rewards"]["0"]  # the counters came from the old checkpoint
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 3 and steps.count(3) == 1
    new = json.loads((run / "ckpt" / "step-000003" / "state.json").read_text())
    assert new.keys() == state.keys()  # the same format is written
    got, want = load_tensors(result.lora_path)[0], load_tensors(DATA / "lora_after_3_updates.safetensors")[0]
    assert got.keys() == want.keys()
    for k in got:  # bit for bit on the machine that wrote it; fp16 rounding apart elsewhere
        torch.testing.assert_close(got[k].float(), want[k].float(), rtol=1e-2, atol=1e-4)
    assert any(float(v.abs().max()) > 0 for k, v in got.items() if k.endswith("lora_up.weight"))  # it trained


def test_an_rlr_run_saved_before_the_step_baseline_resumes_without_it(tmp_path):
    """Its config.json has no step_baseline: it trained without, so it resumes without (the default is on)."""
    saved = json.loads((DATA / "run" / "config.json").read_text())
    assert "step_baseline" not in saved and saved["estimator"] == "rlr" and TrainConfig().step_baseline
    assert TrainConfig.from_json(saved).step_baseline is False
    assert TrainConfig.from_json({**saved, "estimator": "ddpo"}).step_baseline is True  # no RLR: the default
    from rlr_backend.train.run_folder import config_differences

    given = TrainConfig.from_json({**saved, "output_dir": str(tmp_path), "step_baseline": True})
    assert config_differences(TrainConfig.from_json(saved), given) == ["step_baseline (run: False, now: True)"]


def _state() -> TrainState:
    p = torch.nn.Parameter(torch.randn(3))
    state = TrainState([("p", p)], torch.optim.Adam([p], lr=1e-2), torch.Generator().manual_seed(0),
                       BaselineState(), JSampler("softmax_gradnorm"), DynamicLossScale())
    state.baseline.observe(torch.tensor([1.0, 2.0]), torch.tensor([True, True]), torch.tensor([0, 1]))
    state.j_sampler.observe(3, 0.5)
    state.eval_rewards.update({0: 1.5, 4: math.nan})
    state.best.update(step=0, reward=1.5)
    state.step = 4
    return state


def test_counters_round_trip_through_json_and_roll_back(tmp_path):
    state = _state()
    data = json.loads(json.dumps(state.counters()))  # string keys, as state.json holds them
    other = _state()
    other.baseline, other.j_sampler.norms = BaselineState(), {}
    other.eval_rewards.clear()
    other.best.clear()
    other.load_counters(data)
    assert other.counters().keys() == state.counters().keys()
    assert other.baseline.state_dict() == state.baseline.state_dict() and other.j_sampler.norms == {3: 0.5}
    assert other.best == state.best and other.eval_rewards[0] == 1.5 and math.isnan(other.eval_rewards[4])
    point = state.rollback_point()
    drawn = torch.randn(2, generator=state.generator)
    state.baseline.observe(torch.tensor([5.0]), torch.tensor([True]), torch.tensor([0]))
    state.j_sampler.observe(2, 9.0)
    state.loss_scale.scale = 7.0
    state.roll_back(point)
    assert torch.equal(torch.randn(2, generator=state.generator), drawn)  # the same draws again
    assert state.baseline.state_dict() == other.baseline.state_dict() and state.j_sampler.norms == {3: 0.5}
    assert state.loss_scale.scale == DynamicLossScale().scale


def test_save_and_load_restore_every_field(tmp_path):
    state = _state()
    p = state.params[0]
    p.grad = torch.ones(3)
    state.optimizer.step()  # Adam moments to save
    state.save(tmp_path)
    other = _state()
    with torch.no_grad():
        other.params[0].zero_()
    other.step, other.baseline = 0, BaselineState()
    other.load(tmp_path / "ckpt" / "step-000004")
    assert other.step == 4 and torch.equal(other.params[0], p)
    assert torch.equal(other.generator.get_state(), state.generator.get_state())
    assert other.baseline.state_dict() == state.baseline.state_dict()
    assert other.optimizer.state_dict()["state"][0]["exp_avg"].equal(state.optimizer.state_dict()["state"][0]["exp_avg"])
    shared = other.shared()
    third = _state()
    third.load_shared(shared)
    assert third.step == 4 and third.j_sampler.norms == other.j_sampler.norms
