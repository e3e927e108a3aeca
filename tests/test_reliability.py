"""Reliability and security, the fast cases: kills at named points (a forked child killed with SIGKILL),
damaged files made here, planted symlinks and traversal names, non-finite rewards, a full disk (pickles:
tests/test_pickles.py). The long battery: ``python -m benchmarks.reliability`` (docs/reliability.md)."""

import errno
import json
import os
import resource
import shutil
import signal
from pathlib import Path

import pytest
import torch

from benchmarks.damage import CHECKPOINT_MUTATIONS, FILE_MUTATIONS, TRAVERSAL_NAMES, plant_symlinks
from benchmarks.faults import TINY, run_killed, same_run, snapshot, tiny_args
from rlr_backend.cli import sample_main, train_main
from rlr_backend.rewards import CallableReward, make_reward
from rlr_backend.safe_io import InvalidModelFile, StorageError, load_tensors, save_tensors
from rlr_backend.train import TrainConfig, Trainer
from rlr_backend.train.checkpoint import latest_checkpoint, load_checkpoint
from rlr_backend.train.run_folder import open_run_folder


def tiny(out: Path, name: str, steps: int = 4, **kw) -> TrainConfig:
    return TrainConfig(**{**TINY, "steps": steps, "output_dir": out, "run_name": name, **kw})


def rows(run: Path) -> list[dict]:
    """metrics.jsonl rows without the wall-clock column; strict JSON (a NaN token fails)."""
    def refuse(token):
        raise ValueError(f"non-JSON token {token}")
    out = [json.loads(line, parse_constant=refuse) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("seconds", "cpu_seconds")} for r in out]


def temp_files(run: Path) -> list[str]:
    return [str(p) for p in run.rglob(".tmp-*")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 4-update run (checkpoints at 2 and 4)."""
    out = tmp_path_factory.mktemp("ref")
    Trainer(tiny(out, "ref"), progress=False).run()
    return out / "ref"


def assert_same_run(run: Path, ref: Path) -> None:
    """Bitwise: the LoRA, the checkpoints kept and the last one's files; the metrics rows apart from their
    timing; no temporary file left (see benchmarks.faults.same_run)."""
    assert same_run(run, ref) == ""


# -- kills ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("point,resume", [
    ("step:begin@2", False),  # killed in update 2, before the first checkpoint: a plain rerun reuses the folder
    ("ckpt:before_latest@2", True),  # killed mid-save: the last checkpoint renamed into place, LATEST not moved
])
def test_a_killed_run_continues_bitwise_equal(reference, tmp_path, point, resume):
    trainer = Trainer(tiny(tmp_path, "ref"), progress=False)  # the forked child trains a copy of it
    assert run_killed(trainer.run, point) == "killed"
    assert not (tmp_path / "ref" / "lora.safetensors").exists()
    trainer.run(resume=resume)
    assert_same_run(tmp_path / "ref", reference)
    if not resume:
        # a run started over writes every file again: identical runs give identical bytes (safetensors headers
        # in a fixed order), apart from config.json's output_dir and the metrics' wall-clock seconds
        a, b = snapshot(reference), snapshot(tmp_path / "ref")
        assert a.keys() == b.keys() and sorted(k for k in a if a[k] != b[k]) == ["config.json", "metrics.jsonl"]
        strip = lambda p: {k: v for k, v in json.loads(p.read_text()).items() if k != "output_dir"}  # noqa: E731
        assert strip(reference / "config.json") == strip(tmp_path / "ref" / "config.json")


def test_a_resume_killed_while_rewriting_metrics_then_moved_still_continues(reference, tmp_path):
    trainer = Trainer(tiny(tmp_path, "k"), progress=False)
    assert run_killed(trainer.run, "step:begin@4") == "killed"  # after the step-2 checkpoint
    assert [r["step"] for r in rows(tmp_path / "k")] == [0, 1, 2, 3]
    assert run_killed(lambda: trainer.run(resume=True), "atomic:before_replace@1") == "killed"  # metrics rewrite
    assert [r["step"] for r in rows(tmp_path / "k")] == [0, 1, 2, 3] and temp_files(tmp_path / "k")
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.move(tmp_path / "k", moved / "k")  # a moved (or copied) run folder resumes too
    assert train_main(tiny_args(moved, "k", 4, "--resume")) == 0
    assert_same_run(moved / "k", reference)


def test_disk_full_during_a_save_keeps_the_last_checkpoint(reference, tmp_path):
    """The file-size limit (EFBIG, as a full disk gives ENOSPC) is set after the step-2 checkpoint, so the
    step-4 save fails: one line naming the file, step 2 intact, no temporary files; a resume ends equal."""
    cfg, message = tiny(tmp_path, "full"), tmp_path / "message"

    def limit(info):
        if info.step == 2:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))

    trainer = Trainer(cfg, progress=False, on_step=limit)  # the forked child trains a copy of it

    def child():
        try:
            trainer.run()
        except StorageError as e:
            resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            message.write_text(str(e))
            raise
    assert run_killed(child) == "failed"
    text = message.read_text()
    assert "\n" not in text and "cannot write" in text and str(tmp_path / "full") in text, text
    run = tmp_path / "full"
    assert latest_checkpoint(run).name == "step-000002" and temp_files(run) == []
    trainer.run(resume=True)
    assert_same_run(run, reference)


def test_a_read_only_folder_gives_one_line_and_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "x.safetensors"
    save_tensors({"a": torch.ones(2)}, target)
    before = target.read_bytes()

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(os, "replace", read_only)
    with pytest.raises(StorageError, match=r"cannot write .*x\.safetensors: read-only file system") as info:
        save_tensors({"a": torch.zeros(2)}, target)
    assert "\n" not in str(info.value) and target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


# -- damaged files ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checker(reference):
    """A trainer of the reference's options, to load checkpoints into (its tensors must never change)."""
    return Trainer(tiny(reference.parent, "ref"), progress=False)


def test_every_damaged_checkpoint_is_refused_with_one_line_and_changes_nothing(reference, checker, tmp_path):
    before = [p.detach().clone() for p in checker.params]
    refused = []
    for i, (name, mutate) in enumerate(CHECKPOINT_MUTATIONS):
        out = tmp_path / str(i)
        shutil.copytree(reference, out / "ref")
        mutate(out / "ref")
        files = snapshot(out)
        with pytest.raises((ValueError, OSError)) as info:
            folder = open_run_folder(tiny(out, "ref", 6), resume=True)
            load_checkpoint(folder.checkpoint, checker.named_params, checker.state.optimizer, checker.state.generator)
        message = str(info.value)
        assert "\n" not in message and len(message) < 600, (name, message)
        assert snapshot(out) == files, name
        refused.append(name)
    assert len(refused) == len(CHECKPOINT_MUTATIONS) >= 50
    assert all(torch.equal(a, b) for a, b in zip(before, checker.params))
    assert not checker.state.optimizer.state  # never loaded


@pytest.mark.parametrize("name", ["optim: empty (Adam state lost)", "LATEST: ../../../../etc"])
def test_the_cli_refuses_a_damaged_checkpoint_with_exit_2(reference, tmp_path, capsys, name):
    mutate = dict(CHECKPOINT_MUTATIONS)[name]
    shutil.copytree(reference, tmp_path / "ref")
    mutate(tmp_path / "ref")
    files = snapshot(tmp_path)
    assert train_main(tiny_args(tmp_path, "ref", 6, "--resume")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rlr-train: error: ") and len(err.splitlines()) == 1 and "Traceback" not in err
    assert snapshot(tmp_path) == files


def test_damaged_lora_files_are_refused_naming_the_file(reference, tmp_path):
    from rlr_backend.lora import load_lora
    from rlr_backend.models.loader import load_pipeline

    pipe = load_pipeline(None)
    good = (reference / "lora.safetensors").read_bytes()
    for i, (name, mutate) in enumerate(FILE_MUTATIONS):
        p = tmp_path / f"{i}.safetensors"
        p.write_bytes(mutate(good))
        with pytest.raises(InvalidModelFile, match=f"{i}\\.safetensors") as info:
            load_lora(pipe.unet, p)
        assert "\n" not in str(info.value), name
    assert not hasattr(pipe.unet, "peft_config")  # nothing was added to the UNet


def test_damaged_model_weights_and_scheduler_are_refused(tmp_path):
    from rlr_backend.models.tiny_pipelines import save_tiny_pipeline
    from rlr_backend.models.loader import load_pipeline

    good = save_tiny_pipeline("sd1", tmp_path / "good")
    nan = shutil.copytree(good, tmp_path / "nan")
    unet = next((nan / "unet").glob("*.safetensors"))
    tensors, meta = load_tensors(unet)
    key = sorted(tensors)[3]
    tensors[key].view(-1)[0] = float("nan")
    from safetensors.torch import save_file
    save_file(tensors, str(unet), metadata=meta)
    with pytest.raises(InvalidModelFile, match=f"unet tensor '{key}' holds 1 NaN/inf"):
        load_pipeline(nan)
    sched = shutil.copytree(good, tmp_path / "sched")
    cfg_path = sched / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["beta_start"] = float("nan")
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(InvalidModelFile, match="scheduler setting beta_start is nan"):
        load_pipeline(sched)


# -- paths ------------------------------------------------------------------------------------------
def test_traversal_and_odd_run_names_are_refused_with_one_line():
    for name in TRAVERSAL_NAMES:
        with pytest.raises(ValueError, match="plain folder name") as info:
            TrainConfig(run_name=name)
        assert "\n" not in str(info.value) and len(str(info.value)) < 300, repr(name)


def test_symlinks_in_or_as_a_run_folder_are_refused(reference, tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "file").write_text("keep")
    for i, (name, plant) in enumerate(plant_symlinks(reference, outside)):
        run = tmp_path / str(i) / "ref"
        shutil.copytree(reference, run)
        for label, fn in plant_symlinks(run, outside):
            if label == name:
                fn()
        with pytest.raises(ValueError, match="symbolic link"):
            open_run_folder(tiny(run.parent, "ref", 6), resume=True)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "r").symlink_to(outside, target_is_directory=True)
    assert train_main(tiny_args(tmp_path / "runs", "r", 2)) == 2
    assert "symbolic link" in capsys.readouterr().err
    assert snapshot(outside) == {"file": snapshot(outside)["file"]} and (outside / "file").read_text() == "keep"


def test_a_300_character_model_path_gives_one_line(tmp_path, capsys):
    assert sample_main(["a red circle", "--model", str(tmp_path / ("a" * 300)), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_the_app_never_serves_through_a_symlink_in_a_run_folder(reference, tmp_path):
    from rlr_app.form import Settings, list_runs
    from rlr_app.render import stage_downloads

    out = tmp_path / "runs"
    settings = Settings(out)
    shutil.copytree(reference, out / "ok")
    shutil.copytree(reference, out / "planted")
    (out / "planted" / "lora.safetensors").unlink()
    (out / "planted" / "lora.safetensors").symlink_to("/etc/passwd")
    (out / "linked").symlink_to(out / "ok", target_is_directory=True)
    long_name = "r" * 240
    shutil.copytree(reference, out / long_name)
    assert sorted(list_runs(out)) == sorted(["ok", "planted", long_name])  # a linked run folder is not listed
    assert sorted(list_runs(out, with_lora=True)) == sorted(["ok", long_name])  # nor a linked LoRA
    assert len(stage_downloads(settings, out / long_name)) == 3  # staged names stay under 255 bytes
    with pytest.raises(ValueError, match="symbolic link"):
        stage_downloads(settings, out / "planted")
    staged = [p for p in (out / ".gradio").rglob("*") if p.is_file()]
    assert all(b"root:" not in p.read_bytes() for p in staged)


# -- non-finite rewards -----------------------------------------------------------------------------------
def test_an_all_nan_reward_stops_after_three_batches_with_valid_json(tmp_path):
    reward = CallableReward(lambda images, prompts: torch.full((len(images),), float("nan")), differentiable=True,
                            name="broken")
    with pytest.raises(ValueError, match=r"reward 'broken' gave NaN/inf for every image in 3 batches in a row") as info:
        Trainer(tiny(tmp_path, "nan", 10), progress=False, reward=reward).run()
    assert "\n" not in str(info.value)
    got = rows(tmp_path / "nan")[1:]  # strict JSON: null, never a NaN token (row 0: the first evaluation)
    assert [r["step"] for r in got] == [1, 2, 3] and all(r["skipped_batch"] == 1 for r in got)
    assert all(r["reward_mean"] is None for r in got)
    state = json.loads((tmp_path / "nan" / "ckpt" / "step-000002" / "state.json").read_text())
    assert state["eval_rewards"] == {"0": None}


def test_a_dropped_term_is_counted_every_update_and_logged_once(tmp_path, monkeypatch):
    base = make_reward("brightness")

    def second_call_nan(images, prompts):  # the first-order term's reward call (with grad) gives NaN
        r = base(images, prompts)
        return r * float("nan") if images.requires_grad else r
    reward = CallableReward(second_call_nan, differentiable=True, name="flaky")
    import rlr_backend.train.trainer as trainer_module

    warnings = []  # the trainer's warnings (caplog misses them once another test reconfigured logging)
    monkeypatch.setattr(trainer_module.logger, "warning", lambda msg, *args: warnings.append(msg % args))
    Trainer(tiny(tmp_path, "drop", 3, eval_every=0, estimator="rlr"), progress=False, reward=reward).run()
    got = rows(tmp_path / "drop")[1:]  # row 0: the first evaluation
    assert all(r.get("dropped_first_order_term") == 1 for r in got)
    assert sum("first order term was dropped" in m for m in warnings) == 1

