"""The Gradio app's form, model list, curve, served files and network settings, without a running app
(tests/test_gradio_app.py starts the app and drives it through its API)."""

import os
from pathlib import Path

import gradio_app as ga
from rlr_app.form import DEFAULT_FLOW_MODEL

TINY = dict(batch_size=2, images_per_prompt=2, fo_steps=1, num_inference_steps=4, eval_every=2, eval_seeds=1,
            lr=1e-2, prompts="a red circle on a blue background\na green square on a white background")


def form(**changes) -> list:
    values = {**ga.form_defaults(), **TINY, **changes}
    return [values[k] for k in ga.FORM_KEYS]


def test_default_form_is_valid_and_bad_fields_get_their_own_message(tmp_path):
    settings = ga.Settings(tmp_path)
    errors, kw = ga.check_form(ga.form_defaults(), settings)
    assert errors == {} and kw["model"] is None and kw["prompts"]
    cases = {
        "prompts": {"prompts": "  \n# only a comment\n"},
        "model": {"model": "../../etc"},
        "steps": {"steps": 0},
        "w:brightness": {"w:brightness": float("nan")},
        "lr": {"lr": "abc"},
        "batch_size": {"batch_size": 3},
        "ho_from": {"ho_from": 5, "ho_to": 2},
        "estimator": {"estimator": "truncated_bp", "w:jpeg_compressibility": 1.0},
    }
    for key, change in cases.items():
        errors, _ = ga.check_form({**ga.form_defaults(), **change}, settings)
        assert key in errors, (key, errors)
        assert all("\n" not in m for m in errors.values())
    errors, _ = ga.check_form({**ga.form_defaults(), **{f"w:{r}": 0 for r in ga.REWARDS}}, settings)
    assert any("at least one reward" in m for m in errors.values())
    assert not any(tmp_path.iterdir())  # validating writes nothing


def test_the_step_baseline_checkbox_reaches_the_config_and_only_takes_true_or_false(tmp_path):
    from rlr_app.form import config_to_form

    settings = ga.Settings(tmp_path)
    assert ga.form_defaults()["step_baseline"] is True  # TrainConfig's default
    for on in (True, False):
        errors, kw = ga.check_form({**ga.form_defaults(), "step_baseline": on}, settings)
        assert errors == {} and kw["step_baseline"] is on
        assert config_to_form(ga.TrainConfig(**kw, output_dir=tmp_path), settings)["step_baseline"] is on
    errors, _ = ga.check_form({**ga.form_defaults(), "step_baseline": "yes"}, settings)
    assert errors == {"step_baseline": "must be true or false, got 'yes'"}
    assert ga.FORM_KEYS[-2:] == ("step_baseline", "best_recheck_seeds")  # added last: positional API callers'
    # values keep their slots
    assert ga.FORM_KEYS.index("sde_size") == len(ga.FORM_KEYS) - 3


def test_learning_rate_0_is_the_estimators_measured_rate(tmp_path):
    """The form shows 0 (the default: the rate resolved per estimator when the run starts), sends None for 0,
    keeps a typed rate, refuses a negative one, and shows a saved run's resolved rate."""
    from rlr_app.form import LABELS, config_to_form

    settings = ga.Settings(tmp_path)
    assert ga.form_defaults()["lr"] == 0 and "0:" in LABELS["lr"]
    errors, kw = ga.check_form(ga.form_defaults(), settings)
    assert errors == {} and kw["lr"] is None
    errors, kw = ga.check_form({**ga.form_defaults(), "lr": 2e-4}, settings)
    assert errors == {} and kw["lr"] == 2e-4
    assert config_to_form(ga.TrainConfig(**kw, output_dir=tmp_path), settings)["lr"] == 2e-4
    errors, _ = ga.check_form({**ga.form_defaults(), "lr": -1e-3}, settings)
    assert list(errors) == ["lr"] and "positive" in errors["lr"]
    resolved = ga.TrainConfig(estimator="rlr", output_dir=tmp_path).resolve(reward_differentiable=True)
    assert config_to_form(resolved, settings)["lr"] == 1e-3


def test_the_curve_overlays_every_run_of_a_job(tmp_path):
    from rlr_backend.train.runner import JobState

    cfg = ga.TrainConfig(output_dir=tmp_path)
    job = JobState(1, [("rlr", cfg), ("ddpo", cfg)])
    job.runs[0].train_rewards, job.runs[0].eval_rewards = [(1, 0.5), (2, 0.6)], [(0, 0.4), (2, 0.7)]
    job.runs[1].train_rewards, job.runs[1].eval_rewards = [(1, 0.3)], [(0, 0.4), (2, float("nan"))]
    lines = ga.curve_figure(job).axes[0].lines
    assert [line.get_label() for line in lines] == ["rlr: batch reward", "rlr: eval reward (fixed seeds)",
                                                   "ddpo: batch reward", "ddpo: eval reward (fixed seeds)"]
    assert list(lines[3].get_xdata()) == [0]  # a non-finite eval reward is left out
    assert ga.curve_image(job).size == (700, 300)


def test_model_list_shows_folders_under_the_models_dir_only(tmp_path):
    for name in ("sd-tiny", ".hidden", "nested/deep"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "model_index.json").write_text("{}")
    (tmp_path / "not-a-model").mkdir()
    models = ga.list_models(tmp_path)
    assert list(models) == [ga.DEFAULT_MODEL, DEFAULT_FLOW_MODEL, "sd-tiny", "nested/deep"]
    (tmp_path / "sd-tiny" / "model_index.json").unlink()
    errors, _ = ga.check_form({**ga.form_defaults(), "model": "sd-tiny"}, ga.Settings(tmp_path / "o", tmp_path))
    assert "model" in errors


def test_the_flow_default_is_in_the_model_list_and_trains_from_the_form(tmp_path):
    """The embedded flow-matching default is offered next to the UNet default; picked in the form it gives its
    folder, and one update trains (flow chain, transformer LoRA)."""
    from rlr_backend.model_paths import DEFAULT_FLOW_MODEL_DIR
    from rlr_backend.train import TrainConfig, Trainer

    settings = ga.Settings(tmp_path / "o", None)
    errors, kw = ga.check_form({**ga.form_defaults(), **TINY, "model": DEFAULT_FLOW_MODEL, "eval_every": 0}, settings)
    assert not errors and kw["model"] == str(DEFAULT_FLOW_MODEL_DIR)
    kw.update(steps=1, output_dir=settings.output_dir, run_name="flow")
    result = Trainer(TrainConfig(**kw), progress=False).run()
    assert result.steps_done == 1 and result.lora_path.is_file()


def test_served_pictures_and_downloads_are_never_rewritten_in_place(tmp_path, monkeypatch):
    """A browser may be downloading a file while the next refresh sends it again: an unchanged picture keeps
    its file, a re-staged download replaces it atomically (an open reader keeps the whole old copy)."""
    from PIL import Image

    from rlr_app.render import png_file, stage_downloads

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "served"))
    settings = ga.Settings(tmp_path / "out")
    red, blue = Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")
    first = png_file(red, settings)
    inode = os.stat(first).st_ino
    assert png_file(red.copy(), settings) == first and os.stat(first).st_ino == inode
    assert png_file(blue, settings) != first
    assert Image.open(first).getpixel((0, 0)) == (255, 0, 0)
    run = tmp_path / "out" / "run1"
    run.mkdir(parents=True)
    (run / "lora.safetensors").write_bytes(b"A" * 1000)
    (staged,) = stage_downloads(settings, run)
    with open(staged, "rb") as reader:  # a download in progress
        (run / "lora.safetensors").write_bytes(b"B" * 3000)
        assert stage_downloads(settings, run) == [staged]
        assert reader.read() == b"A" * 1000
    assert Path(staged).read_bytes() == b"B" * 3000
    assert Path(staged).parent.parent.parent == tmp_path / "served"
    assert not [p for p in (tmp_path / "served").rglob(".tmp-*")]


def test_network_exposure_needs_auth(tmp_path, capsys):
    assert ga.parser().parse_args([]).host == "127.0.0.1"
    assert ga.main(["--host", "0.0.0.0", "--output-dir", str(tmp_path)]) == 2
    assert "--auth" in capsys.readouterr().err
    assert ga.main(["--host", "0.0.0.0", "--auth", "nopassword", "--output-dir", str(tmp_path)]) == 2
    assert ga._loopback("127.0.0.1") and ga._loopback("::1") and ga._loopback("localhost")
    assert not ga._loopback("0.0.0.0") and not ga._loopback("192.168.1.5")


# -- through gradio_client ---------------------------------------------------------------------------
