"""Stop within one model call in every phase: the initial evaluation, the sampling pass of an update,
the estimator's backward passes and the final evaluation; the LoRA of the last finished update is kept."""

import inspect
import json

import pytest
import torch

from rlr_backend.safe_io import load_tensors
from rlr_backend.train import StepInfo, TrainConfig, Trainer
from rlr_backend.train.stopping import StopCheckingDenoiser, StopRequested

TINY = dict(batch_size=2, images_per_prompt=2, fo_steps=1, num_inference_steps=4, eval_every=0, eval_seeds=1,
            ckpt_every=1, lr=1e-2)


def in_backward() -> bool:
    return any(f.function == "_engine_run_backward" or f.filename.endswith("autograd/__init__.py")
               for f in inspect.stack(0))


class Switch:
    """should_stop that turns True at the first call where ``when(self)`` holds; counts calls per phase."""

    def __init__(self, when):
        self.when, self.updates_done, self.calls, self.fired_at = when, 0, 0, None
        self.preview_steps: list[int] = []

    def __call__(self) -> bool:
        self.calls += 1
        if self.fired_at is None and self.when(self):
            self.fired_at = (self.updates_done, self.calls, in_backward())
        return self.fired_at is not None

    def on_step(self, info: StepInfo) -> None:
        self.updates_done = info.step

    def on_preview(self, images, step: int) -> None:
        self.preview_steps.append(step)


def run(tmp_path, name, switch, steps=3, **kw):
    cfg = TrainConfig(steps=steps, output_dir=tmp_path, run_name=name, **{**TINY, **kw})
    return Trainer(cfg, progress=False, should_stop=switch, on_step=switch.on_step,
                   on_preview=switch.on_preview).run()


@pytest.fixture(scope="module")
def after_one_update(tmp_path_factory):
    """The LoRA of an uninterrupted run of 1 update (the same seed)."""
    cfg = TrainConfig(steps=1, output_dir=tmp_path_factory.mktemp("one"), run_name="one", **TINY)
    return load_tensors(Trainer(cfg, progress=False).run().lora_path)[0]


def test_stop_during_the_initial_evaluation_keeps_the_untrained_lora(tmp_path):
    switch = Switch(lambda s: s.calls == 2)  # the 2nd of the 4 model calls of the first evaluation
    result = run(tmp_path, "init", switch)
    assert result.stopped_early and result.steps_done == 0 and switch.calls == 2
    assert switch.preview_steps == []  # the evaluation never finished
    sd, meta = load_tensors(result.lora_path)
    assert meta["rlr_interrupted_at_step"] == "0"
    ups = [v for k, v in sd.items() if k.endswith("lora_up.weight")]
    assert ups and all(float(u.abs().max()) == 0 for u in ups)  # loadable, and a no-op


def test_stop_during_sampling_keeps_the_previous_update(tmp_path, after_one_update):
    calls = {}

    def when(s):  # the 2nd model call of update 2's sampling pass (no gradient)
        calls.setdefault(s.updates_done, 0)
        calls[s.updates_done] += 1
        return s.updates_done == 1 and calls[1] == 3  # call 1 is the trainer's check after update 1

    switch = Switch(when)
    result = run(tmp_path, "sampling", switch)
    assert result.steps_done == 1 and result.stopped_early and not switch.fired_at[2]
    sd, meta = load_tensors(result.lora_path)
    assert meta["rlr_interrupted_at_step"] == "1"
    assert sd.keys() == after_one_update.keys()
    assert all(torch.equal(sd[k], after_one_update[k]) for k in sd)  # update 2 left no trace
    rows = [json.loads(r) for r in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]  # the first evaluation and update 1


def test_stop_inside_a_backward_pass(tmp_path, after_one_update):
    switch = Switch(lambda s: s.updates_done == 1 and in_backward())
    result = run(tmp_path, "backward", switch)
    assert switch.fired_at is not None and switch.fired_at[0] == 1 and switch.fired_at[2]  # raised in backward
    assert result.steps_done == 1 and result.stopped_early
    sd, _ = load_tensors(result.lora_path)
    assert all(torch.equal(sd[k], after_one_update[k]) for k in sd)


def test_stop_during_the_final_evaluation(tmp_path):
    seen = {"backward": False}

    def when(s):  # the first model call without gradient after update 2's backward passes: the evaluation
        if s.updates_done == 1 and in_backward():
            seen["backward"] = True
            return False
        return seen["backward"] and not in_backward() and not torch.is_grad_enabled()

    switch = Switch(when)
    result = run(tmp_path, "final", switch, steps=2)
    assert result.steps_done == 2 and result.stopped_early  # update 2 finished, its evaluation did not
    assert switch.preview_steps == [0]
    sd, meta = load_tensors(result.lora_path)
    assert meta["rlr_interrupted_at_step"] == "2" and all(torch.isfinite(v.float()).all() for v in sd.values())
    rows = [json.loads(r) for r in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and "eval_reward" not in rows[2]  # update 2's row, no evaluation
    assert (result.run_dir / "ckpt" / "LATEST").read_text().strip() == "step-000002"


def test_the_wrapper_raises_before_the_call_and_in_backward():
    calls = []
    flag = {"stop": False}
    net = StopCheckingDenoiser(lambda x, t, c: calls.append(t) or x * 2, lambda: flag["stop"])
    x = torch.ones(2, requires_grad=True)
    out = net(x, 5, None)
    flag["stop"] = True
    with pytest.raises(StopRequested):
        out.sum().backward()
    with pytest.raises(StopRequested):
        net(x, 6, None)
    assert calls == [5]


def test_a_run_stopped_in_backward_resumes_to_the_uninterrupted_lora(tmp_path):
    """The stop rolls the generator and statistics back to the end of update 1 and checkpoints there
    (ckpt_every=50 would not): resuming to 3 updates gives the LoRA of an uninterrupted 3-update run."""
    kw = dict(ckpt_every=50)
    ref = run(tmp_path, "ref", Switch(lambda s: False), steps=3, **kw)
    switch = Switch(lambda s: s.updates_done == 1 and in_backward())
    stopped = run(tmp_path, "cut", switch, steps=3, **kw)
    assert stopped.steps_done == 1 and (stopped.run_dir / "ckpt" / "step-000001").is_dir()
    cfg = TrainConfig(steps=3, output_dir=tmp_path, run_name="cut", **{**TINY, **kw})
    resumed = Trainer(cfg, progress=False).run(resume=True)
    a, b = load_tensors(resumed.lora_path)[0], load_tensors(ref.lora_path)[0]
    assert resumed.steps_done == 3 and all(torch.equal(a[k], b[k]) for k in a)
