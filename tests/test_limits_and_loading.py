"""Config limits that hold (every option's stated minimum trains), models loaded in the precision asked for,
and bad model input in one line: a single file with a wrong tensor shape (the file's key, the expected and
the found shape, exit 2, nothing written), not enough memory (needed and available, before the load)."""

from dataclasses import fields

import pytest
import torch

from benchmarks.ldm_export import pipeline_to_ldm
from rlr_backend.choices import ConfigError
from rlr_backend.cli import train_main
from rlr_backend.models import weights
from rlr_backend.models.loader import load_pipeline
from rlr_backend.models.tiny_pipelines import build_tiny_pipeline, save_tiny_pipeline
from rlr_backend.safe_io import save_tensors
from rlr_backend.train import TrainConfig, Trainer

MINIMA = {f.name: f.metadata["min"] for f in fields(TrainConfig) if f.metadata.get("min") is not None}


def test_every_stated_minimum_is_enforced_and_below_it_one_line_names_the_option():
    for name, lo in MINIMA.items():
        with pytest.raises(ConfigError, match=f"^{name} must be >= {lo}, got {lo - 1}$") as info:
            TrainConfig(**{name: lo - 1})
        assert info.value.field == name


@pytest.mark.parametrize("estimator", ["rlr", "truncated_bp", "code_compat"])
def test_every_stated_minimum_trains(tmp_path, estimator):
    """All minima at once (T=2 with the default prompts, batch 2, rank 1, one evaluation image, a checkpoint
    every update, a KL term on one step): a whole run, evaluations and checkpoints included."""
    kw = {name: lo for name, lo in MINIMA.items() if name != "batch_size"}
    kw.update(batch_size=MINIMA["batch_size"], kl_weight=0.1, estimator=estimator, reward="brightness",
              output_dir=tmp_path, run_name="m")
    assert set(MINIMA) <= set(kw)
    result = Trainer(TrainConfig(**kw), progress=False).run()
    assert result.steps_done == 1 and result.lora_path.is_file()


# -- loading --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    folder = save_tiny_pipeline("sdxl", root / "sdxl")
    single = root / "sd1.safetensors"
    save_tensors(pipeline_to_ldm(build_tiny_pipeline("sd1")), single)
    return {"folder": folder, "single": single}


@pytest.mark.parametrize("source", ["folder", "single"])
def test_components_load_in_the_dtypes_asked_for(tiny_sources, source):
    pipe = load_pipeline(tiny_sources[source], dtype=torch.bfloat16, text_encoder_dtype=torch.float32)
    assert {p.dtype for p in pipe.unet.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in pipe.vae.parameters()} == {torch.bfloat16}
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) else [])
    assert {p.dtype for m in encoders for p in m.parameters()} == {torch.float32}
    assert not any(t.is_meta for m in (pipe.unet, pipe.vae, *encoders) for t in m.state_dict().values())


def test_a_wrong_tensor_shape_names_the_files_key_and_both_shapes(tiny_sources, tmp_path, capsys):
    state = pipeline_to_ldm(build_tiny_pipeline("sd1"))
    key = "model.diffusion_model.output_blocks.1.0.in_layers.2.weight"  # a resnet conv, not used to infer configs
    state[key] = state[key][:, :-1]
    bad = tmp_path / "bad.safetensors"
    save_tensors(state, bad)
    want = list(state[key].shape)
    want[1] += 1
    runs = tmp_path / "runs"
    assert train_main(["--model", str(bad), "--output-dir", str(runs), "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"tensor {key!r} has shape {list(state[key].shape)}" in err[0] and f"needs {want}" in err[0], err[0]
    assert "up_blocks.0.resnets.1.conv1.weight" in err[0]  # the diffusers key as well
    assert not runs.exists()


def test_not_enough_memory_is_one_line_before_anything_is_read(tiny_sources, tmp_path, monkeypatch, capsys):
    read = []
    monkeypatch.setattr(weights, "available_memory", lambda: 10_000_000)  # 10 MB
    monkeypatch.setattr(weights, "read_tensors", lambda *a, **k: read.append(a))
    for source in ("single", "folder"):
        runs = tmp_path / source
        assert train_main(["--model", str(tiny_sources[source]), "--output-dir", str(runs), "--steps", "1"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "not enough memory to load" in err[0], err
        assert "GB of RAM and 0.0 GB is available" in err[0]
        assert not runs.exists()
    assert not read
