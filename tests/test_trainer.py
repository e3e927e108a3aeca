"""The trainer on the embedded default model: outputs, exact resume (also after a kill), bad input."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlr_backend.choices import ConfigError
from rlr_backend.cli import train_main
from rlr_backend.rewards import CallableReward, make_reward
from rlr_backend.safe_io import load_tensors
from rlr_backend.train import TrainConfig, Trainer

TINY = dict(batch_size=2, images_per_prompt=2, fo_steps=1, num_inference_steps=4, eval_every=0, eval_seeds=1,
            ckpt_every=2, lr=1e-2)
TINY_ARGS = ["--batch-size", "2", "--images-per-prompt", "2", "--fo-steps", "1", "--num-inference-steps", "4",
             "--eval-every", "0", "--eval-seeds", "1", "--ckpt-every", "2", "--lr", "1e-2", "--quiet", "--threads", "1"]


def lora_of(run_dir: Path) -> dict:
    return load_tensors(run_dir / "lora.safetensors")[0]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    cfg = TrainConfig(steps=6, output_dir=out, run_name="ref", **TINY)
    result = Trainer(cfg, progress=False).run()
    return cfg, result


def test_run_writes_lora_grid_curve_and_metrics(reference_run):
    cfg, result = reference_run
    d = result.run_dir
    for name in ("lora.safetensors", "before_after.png", "reward_curve.png", "metrics.jsonl", "config.json",
                 "grids/step-000000.png", "grids/step-000006.png", "ckpt/LATEST"):
        assert (d / name).is_file(), name
    rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(0, 7))
    evals = {r["step"]: r["eval_reward"] for r in rows if "eval_reward" in r}
    assert evals == pytest.approx(result.eval_rewards) and rows[0]["eval_images"] == result.eval_images > 0
    assert all(torch.isfinite(v.float()).all() for v in lora_of(d).values())
    assert set(result.eval_rewards) == {0, 6}


def test_resume_reaches_the_same_lora(reference_run, tmp_path):
    cfg, result = reference_run
    part = TrainConfig(steps=4, output_dir=tmp_path, run_name="r", **TINY)
    Trainer(part, progress=False).run()
    full = TrainConfig(steps=6, output_dir=tmp_path, run_name="r", **TINY)
    Trainer(full, progress=False).run(resume=True)
    a, b = lora_of(result.run_dir), lora_of(tmp_path / "r")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(0, 7))


def test_resume_without_lr_continues_at_the_runs_own_rate(tmp_path):
    """A run saved at 3e-3 (RLR's default before the per-estimator rates) resumes without --lr at 3e-3, not at
    today's default 1e-3; a rate given that differs from the run's is refused, naming both."""
    old = TrainConfig(steps=2, output_dir=tmp_path, run_name="old", estimator="rlr", **{**TINY, "lr": 3e-3})
    Trainer(old, progress=False).run()
    later = Trainer(TrainConfig(**{**old.__dict__, "steps": 3, "lr": None}), progress=False)
    assert later.config.lr == 1e-3  # today's default, until the run folder is read
    result = later.run(resume=True)
    assert later.config.lr == 3e-3 and later.state.optimizer.param_groups[0]["lr"] == 3e-3
    assert load_tensors(result.lora_path)[1]["ss_learning_rate"] == "0.003" and result.steps_done == 3
    assert json.loads((tmp_path / "old" / "config.json").read_text())["lr"] == 3e-3
    with pytest.raises(ValueError, match=r"lr \(run: 0.003, now: 0.001\)"):
        Trainer(TrainConfig(**{**old.__dict__, "steps": 4, "lr": 1e-3}), progress=False).run(resume=True)


# Runs the CLI in a child process whose 4th update hangs (after the step-2 checkpoint), so the kill
# always lands mid-run however slow or fast the machine is.
HANG_AT_UPDATE_4 = """
import sys, time
from pathlib import Path
import rlr_backend.train.trainer as trainer
flag, calls, update = Path(sys.argv.pop(1)), [0], trainer.Trainer.update
def hanging_update(self):
    calls[0] += 1
    if calls[0] == 4:
        flag.touch()
        time.sleep(600)
    return update(self)
trainer.Trainer.update = hanging_update
from rlr_backend.cli import train
train()
"""


def test_kill_during_run_then_resume(reference_run, tmp_path):
    _, result = reference_run
    flag = tmp_path / "hanging"
    cmd = [sys.executable, "-c", HANG_AT_UPDATE_4, str(flag), "--steps", "6",
           "--output-dir", str(tmp_path), "--run-name", "k", *TINY_ARGS]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not flag.exists() and proc.poll() is None:
        time.sleep(0.05)
    assert flag.exists(), "the child never reached its 4th update"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "k" / "ckpt" / "LATEST").read_text().strip() == "step-000002"
    assert not (tmp_path / "k" / "lora.safetensors").exists()
    assert train_main(["--steps", "6", "--output-dir", str(tmp_path), "--run-name", "k", "--resume", *TINY_ARGS]) == 0
    a, b = lora_of(result.run_dir), lora_of(tmp_path / "k")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_rewards_are_skipped_and_training_continues(tmp_path):
    base = make_reward("brightness")

    def flaky(images, prompts):
        r = base(images, prompts)
        return torch.where(torch.arange(len(r)) == 0, torch.full_like(r, float("nan")), r)

    cfg = TrainConfig(steps=3, output_dir=tmp_path, run_name="nan", **TINY)
    seen = []
    Trainer(cfg, progress=False, reward=CallableReward(flaky, differentiable=True),
            on_step=lambda info: seen.append(info.metrics)).run()
    assert len(seen) == 3 and all(m["nonfinite_rewards"] == 1 for m in seen)
    assert all(torch.isfinite(v.float()).all() for v in lora_of(tmp_path / "nan").values())


def test_the_lora_says_whether_its_estimator_was_unbiased(reference_run, tmp_path, caplog):
    """Options that bias the estimator are logged once at the start of the run and recorded in the LoRA;
    so is a non-differentiable reward taking away RLR's first-order part."""
    _, result = reference_run  # the default estimator, auto: truncated backprop for this differentiable reward
    meta = load_tensors(result.lora_path)[1]
    assert meta["rlr_estimator"] == "truncated_bp" and meta["rlr_unbiased"] == "false"
    rlr = Trainer(TrainConfig(steps=1, estimator="rlr", output_dir=tmp_path, run_name="r", **TINY), progress=False).run()
    assert load_tensors(rlr.lora_path)[1]["rlr_unbiased"] == "true"  # RLR with its default settings
    with caplog.at_level("WARNING"):
        biased = Trainer(TrainConfig(steps=1, estimator="truncated_bp", output_dir=tmp_path, run_name="t", **TINY),
                         progress=False).run()
    meta = load_tensors(biased.lora_path)[1]
    assert meta["rlr_unbiased"] == "false" and "last 2 step" in meta["rlr_bias"]
    assert sum("is biased" in r.getMessage() for r in caplog.records) == 1
    dark = CallableReward(lambda images, prompts: -images.mean((1, 2, 3)), differentiable=False)
    nondiff = Trainer(TrainConfig(steps=1, output_dir=tmp_path, run_name="n", **{**TINY, "fo_steps": 2}),
                      progress=False, reward=dark).run()
    meta = load_tensors(nondiff.lora_path)[1]
    assert meta["rlr_unbiased"] == "true" and "fo_steps=2 is ignored" in meta["rlr_overrides"]


def test_inference_uses_the_trained_prompt_schedule(tmp_path, capsys):
    """A LoRA trained with 'coarse | mid | fine' prompts records them and their split; sampling its fine prompt
    uses them (as the trainer's evaluation images do) unless --no-prompt-schedule says otherwise."""
    from PIL import Image

    from rlr_backend.cli import sample_main
    from rlr_backend.models.trainable import sample_images
    from rlr_backend.train.prompts import PromptSpec
    from rlr_backend.train.trainer import EVAL_SEED

    spec = PromptSpec("a red circle on a blue background", "a red shape", "a red circle")
    cfg = TrainConfig(steps=1, prompts=(spec,), prompt_split=(0.5, 0.25, 0.25), output_dir=tmp_path, run_name="s",
                      **TINY)
    trainer = Trainer(cfg, progress=False)
    result = trainer.run()
    _, evaluated = trainer.evaluate()
    sampled = sample_images(trainer.t2i, [spec] * cfg.eval_seeds, num_steps=cfg.num_inference_steps, eta=cfg.eta,
                            guidance_scale=cfg.guidance_scale, seed=EVAL_SEED, prompt_split=cfg.prompt_split)
    torch.testing.assert_close(sampled.float().cpu(), evaluated)
    meta = load_tensors(result.lora_path)[1]
    assert json.loads(meta["rlr_prompt_split"]) == [0.5, 0.25, 0.25]
    assert json.loads(meta["rlr_prompts"]) == [["a red shape", "a red circle", spec.fine]]
    common = ["--lora", str(result.lora_path), "--num", "1", "--steps", "4", "--seed", "3", "--threads", "1"]
    assert sample_main([spec.fine, *common, "--out", str(tmp_path / "trained.png")]) == 0
    assert sample_main([" | ".join(spec.versions()), *common, "--out", str(tmp_path / "explicit.png")]) == 0
    assert sample_main([spec.fine, *common, "--no-prompt-schedule", "--out", str(tmp_path / "plain.png")]) == 0
    trained, explicit, plain = (Image.open(tmp_path / f"{n}.png").tobytes() for n in ("trained", "explicit", "plain"))
    assert trained == explicit != plain
    assert "trained prompt schedule" in capsys.readouterr().out


def test_should_stop_ends_early_with_a_lora(tmp_path):
    cfg = TrainConfig(steps=50, output_dir=tmp_path, run_name="stop", **TINY)
    result = Trainer(cfg, progress=False, should_stop=lambda: True).run()
    assert result.stopped_early and result.steps_done == 0 and result.lora_path.is_file()  # stops at once


@pytest.mark.parametrize("args,message", [
    (["--model", "/nonexistent/model"], "does not exist"),
    (["--model", "evil.ckpt"], "safetensors"),
    (["--reward", "aesthetics"], "unknown reward"),
    (["--prompt", " "], "empty"),
    (["--lora-rank", "0"], "lora_rank must be >= 1"),
    (["--images-per-prompt", "3"], "multiple of images_per_prompt"),
    (["--fo-steps", "3"], "h + fo_steps <= num_inference_steps"),
    (["--prompt-split", "0.5,0.5,0.5"], "sum to 1"),
    (["--run-name", "../elsewhere"], "plain folder name"),
    (["--estimator", "truncated_bp", "--reward", "jpeg_compressibility"], "not differentiable"),
])
def test_bad_options_fail_with_one_line(args, message, tmp_path, capsys):
    assert train_main([*TINY_ARGS, *args, "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_bad_prompt_files(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("a caf\xe9 on a table\n".encode("latin-1"))
    for path, msg in [(empty, "no prompts"), (latin, "not UTF-8"), (tmp_path / "missing.txt", "does not exist")]:
        assert train_main(["--prompt-file", str(path), "--output-dir", str(tmp_path), *TINY_ARGS]) == 2
        assert msg in capsys.readouterr().err


def test_existing_run_folder_is_never_changed_by_a_refused_start(reference_run, capsys):
    cfg, result = reference_run
    before = snapshot(result.run_dir)
    common = ["--output-dir", str(cfg.output_dir), "--run-name", "ref", *TINY_ARGS]
    assert train_main(["--steps", "6", *common]) == 2  # exists, no --resume
    assert train_main(["--steps", "6", "--resume", *common, "--lr", "0.5"]) == 2  # other options
    assert train_main(["--steps", "6", "--resume", "--reward", "nope", *common]) == 2
    assert snapshot(result.run_dir) == before
    err = capsys.readouterr().err
    assert "already exists" in err and "differ" in err


def test_rlr_sample_with_and_without_the_lora(reference_run, tmp_path, capsys):
    from PIL import Image

    from rlr_backend.cli import sample_main

    _, result = reference_run
    common = ["a red circle on a blue background", "--num", "2", "--steps", "4", "--seed", "3"]
    assert sample_main([*common, "--out", str(tmp_path / "base.png")]) == 0
    assert sample_main([*common, "--lora", str(result.lora_path), "--out", str(tmp_path / "lora.png")]) == 0
    assert sample_main([*common, "--lora", str(result.lora_path), "--lora-scale", "0",
                        "--out", str(tmp_path / "zero.png")]) == 0
    base, lora, zero = (Image.open(tmp_path / f"{n}.png").tobytes() for n in ("base", "lora", "zero"))
    assert base != lora and base == zero  # the LoRA changes the samples; scale 0 is the base model
    pickle = tmp_path / "lora.ckpt"
    torch.save({"x": torch.zeros(1)}, pickle)
    assert sample_main([*common, "--lora", str(pickle), "--out", str(tmp_path / "x.png")]) == 2
    assert "safetensors" in capsys.readouterr().err


def test_resume_survives_a_metrics_line_cut_by_a_crash(tmp_path):
    cfg = TrainConfig(steps=2, output_dir=tmp_path, run_name="cut", **TINY)
    Trainer(cfg, progress=False).run()
    metrics = tmp_path / "cut" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 3, "reward_me')  # killed mid-line after step 2's checkpoint
    Trainer(TrainConfig(steps=3, output_dir=tmp_path, run_name="cut", **TINY), progress=False).run(resume=True)
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == [0, 1, 2, 3]


def test_cli_defaults_are_the_config_defaults():
    from rlr_backend.cli import build_config, train_parser

    assert build_config(train_parser().parse_args([])) == TrainConfig()
    assert build_config(train_parser().parse_args(["--fo-steps", "2", "--lr", "0.01"])) == \
        TrainConfig(fo_steps=2, lr=0.01)
    split = build_config(train_parser().parse_args(["--prompt-split", "0.5,0.25,0.25"]))
    assert split.prompt_split == (0.5, 0.25, 0.25)
    assert TrainConfig.from_json(json.loads(json.dumps(split.to_json()))) == split


def test_the_default_learning_rate_is_the_one_the_sweeps_chose_for_the_estimator():
    """lr None: the rate the sweeps chose (1e-3 for RLR with the step baseline on a differentiable reward, DDPO
    and zo without the step baseline; 3e-3 for the others); a rate given is kept; 0, negative and NaN rates
    are refused naming the option."""
    assert TrainConfig().lr is None
    cases = {("rlr", True, True): 1e-3, ("rlr", True, False): 3e-3, ("rlr", False, True): 3e-3,
             ("rlr", False, False): 3e-3, ("zo", True, False): 3e-3, ("zo", False, False): 1e-3,
             ("truncated_bp", True, True): 3e-3, ("ddpo", True, True): 1e-3, ("ddpo", False, False): 1e-3,
             ("full_bp", True, True): 3e-3, ("code_compat", False, True): 3e-3}
    for (estimator, sb, differentiable), lr in cases.items():
        got = TrainConfig(estimator=estimator, step_baseline=sb).resolve(differentiable).lr
        assert got == lr, (estimator, sb, differentiable, got)
    assert TrainConfig(estimator="rlr", lr=5e-4).resolve(True).lr == 5e-4
    assert TrainConfig().resolve(False) == TrainConfig(estimator="rlr", lr=3e-3)  # auto, a black-box reward (JPEG)
    for bad in (0.0, -1e-3, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="lr must be a positive number"):
            TrainConfig(lr=bad)
    from rlr_backend.cli import train_parser

    assert "1e-3 for rlr with the step baseline on a differentiable reward, ddpo, and zo without the step " \
        "baseline; 3e-3 for the others" in \
        " ".join(train_parser().format_help().split())


def test_auto_estimator_is_truncated_backprop_for_differentiable_rewards_and_rlr_otherwise(tmp_path):
    from rlr_backend.cli import build_config, train_parser

    assert build_config(train_parser().parse_args(["--estimator", "auto"])).estimator == "auto"
    for reward, expected, lr in (("brightness", "truncated_bp", 3e-3), ("jpeg_compressibility", "rlr", 3e-3)):
        cfg = TrainConfig(steps=1, estimator="auto", reward=reward, output_dir=tmp_path, run_name=reward,
                          **{**TINY, "lr": None})  # the learning rate the sweeps chose for the estimator
        trainer = Trainer(cfg, progress=False)
        assert trainer.config.estimator == expected and trainer.config.lr == lr
        assert trainer.state.optimizer.param_groups[0]["lr"] == lr
        assert trainer.config.gradient_checkpointing is False  # auto changes the estimator only
        result = trainer.run()
        assert load_tensors(result.lora_path)[1]["rlr_estimator"] == expected
        # a resume with the same options (estimator auto) resolves the same way and is accepted
        Trainer(TrainConfig(**{**cfg.__dict__, "steps": 2}), progress=False).run(resume=True)
