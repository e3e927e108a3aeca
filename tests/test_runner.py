"""The background job manager the Gradio app uses: one job at a time, stop within one update, failures."""

import time

import pytest
import torch

from rlr_backend.lora import load_lora
from rlr_backend.rewards import CallableReward, make_reward
from rlr_backend.safe_io import load_tensors
from rlr_backend.train import TrainConfig, Trainer
from rlr_backend.train.checkpoint import latest_checkpoint
from rlr_backend.models.loader import load_pipeline
from rlr_backend.train.runner import RunInProgress, RunManager, eval_captions

TINY = dict(batch_size=2, images_per_prompt=2, fo_steps=1, num_inference_steps=4, eval_seeds=1, lr=1e-2)


def wait_until(pred, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    raise AssertionError("timed out")


def test_one_job_at_a_time_and_stop_keeps_the_partial_lora(tmp_path):
    manager = RunManager()
    cfg = TrainConfig(steps=500, eval_every=2, ckpt_every=50, output_dir=tmp_path, run_name="long", **TINY)
    job = manager.start([("rlr", cfg)])
    wait_until(lambda: job.runs[0].step >= 3)
    with pytest.raises(RunInProgress, match="already in progress"):
        manager.start([("rlr", TrainConfig(steps=2, output_dir=tmp_path, run_name="second", **TINY))])
    at_stop = job.runs[0].step
    manager.stop()
    wait_until(lambda: job.finished)
    run = job.snapshot().runs[0]
    assert run.status == "stopped" and at_stop <= run.step <= at_stop + 1  # the update in progress is dropped
    assert manager.max_active == 1 and not (tmp_path / "second").exists()
    tensors, meta = load_tensors(run.lora_path)
    assert meta["rlr_steps"] == str(run.step)
    unet = load_pipeline(None).unet
    load_lora(unet, run.lora_path)
    assert latest_checkpoint(tmp_path / "long").name == f"step-{run.step:06d}"
    # the streamed state: train reward per update, the first and the latest previews
    assert [s for s, _ in run.train_rewards] == list(range(1, run.step + 1))
    assert run.before.shape == run.latest.shape and run.latest_step == run.step // 2 * 2
    assert job.first_preview_at is not None and any("eval reward" in line for line in job.log)


def test_streamed_eval_rewards_match_the_trainers(tmp_path):
    results = []

    class Recording(Trainer):
        def run(self, resume=False):
            results.append(super().run(resume))
            return results[-1]

    cfg = TrainConfig(steps=2, eval_every=1, ckpt_every=2, output_dir=tmp_path, run_name="r",
                      prompts=TrainConfig().prompts[:3], **TINY)
    job = RunManager(Recording).start([("rlr", cfg)])
    wait_until(lambda: job.finished)
    run = job.snapshot().runs[0]
    assert run.status == "done" and len(eval_captions(cfg)) == run.latest.shape[0] == 3
    streamed = dict(run.eval_rewards)
    assert streamed.keys() == results[0].eval_rewards.keys() == {0, 1, 2}
    for step, value in results[0].eval_rewards.items():
        assert streamed[step] == pytest.approx(value, abs=1e-5)


def test_a_failure_is_one_line_and_the_last_checkpoint_resumes(tmp_path):
    real = make_reward("brightness")
    calls = []

    def flaky(images, prompts):
        calls.append(1)
        if len(calls) > 12:
            raise RuntimeError("reward server went away\nsecond line")
        return real(images, prompts)

    def factory(cfg, **kw):
        return Trainer(cfg, reward=CallableReward(flaky, name="flaky"), **kw)

    cfg = TrainConfig(steps=50, estimator="rlr", eval_every=0, ckpt_every=2, reward="brightness", output_dir=tmp_path,
                      run_name="f", **TINY)
    job = RunManager(factory).start([("rlr", cfg)])
    wait_until(lambda: job.finished)
    run = job.snapshot().runs[0]
    assert run.status == "failed" and run.error == "RuntimeError: reward server went away second line"
    ckpt = latest_checkpoint(tmp_path / "f")
    assert ckpt is not None and 2 <= int(ckpt.name.split("-")[1]) < 50
    done = Trainer(TrainConfig(**{**cfg.__dict__, "steps": int(ckpt.name.split("-")[1]) + 1}),
                   progress=False).run(resume=True)
    assert done.steps_done == int(ckpt.name.split("-")[1]) + 1
    assert all(torch.isfinite(v.float()).all() for v in load_tensors(done.lora_path)[0].values())


def test_a_compare_job_trains_its_runs_one_after_the_other(tmp_path):
    active = []

    def factory(cfg, **kw):
        trainer = Trainer(cfg, **kw)
        run = trainer.run

        def tracked(resume=False):
            active.append(cfg.run_name)
            assert manager.active == 1
            return run(resume)
        trainer.run = tracked
        return trainer

    manager = RunManager(factory)
    runs = [(est, TrainConfig(steps=2, eval_every=0, ckpt_every=2, estimator=est, output_dir=tmp_path,
                              run_name=f"cmp-{est}", **TINY)) for est in ("rlr", "ddpo")]
    job = manager.start(runs)
    wait_until(lambda: job.finished)
    snap = job.snapshot()
    assert [r.status for r in snap.runs] == ["done", "done"] and active == ["cmp-rlr", "cmp-ddpo"]
    assert manager.max_active == 1 and manager.active == 0
    # a stop during the first run skips the second
    runs = [(label, TrainConfig(**{**cfg.__dict__, "steps": 500, "run_name": cfg.run_name + "-2"}))
            for label, cfg in runs]
    job = manager.start(runs)
    wait_until(lambda: job.runs[0].step >= 1)
    manager.stop()
    wait_until(lambda: job.finished)
    assert [r.status for r in job.snapshot().runs] == ["stopped", "skipped"]
