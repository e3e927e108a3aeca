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


def test_an_fp32_folder_loaded_in_half_precision_is_read_tensor_by_tensor_with_the_librarys_values(tiny_sources):
    """No fp16 variant: the UNet and VAE are built on the meta device and read one tensor at a time (low peak),
    and hold exactly what diffusers' own load-then-cast gives."""
    from diffusers import StableDiffusionXLPipeline

    from rlr_backend.models.folder_weights import load_cast_components
    from rlr_backend.models.loader import weight_files

    folder = tiny_sources["folder"]
    dtypes = {"default": torch.float16, "text_encoder": torch.float32, "text_encoder_2": torch.float32}
    own = load_cast_components(folder, ("unet", "vae", "text_encoder", "text_encoder_2"), dtypes,
                               lambda c: weight_files(folder / c))
    assert set(own) == {"unet", "vae"}  # the text encoders' files are fp32 already: the library reads them
    ref = StableDiffusionXLPipeline.from_pretrained(str(folder), dtype=dtypes, local_files_only=True,
                                                    use_safetensors=True, add_watermarker=False)
    for comp, module in own.items():
        theirs = getattr(ref, comp).state_dict()
        mine = module.state_dict()
        assert mine.keys() == theirs.keys() and not module.training
        assert all(torch.equal(mine[k], theirs[k]) and mine[k].dtype == theirs[k].dtype for k in mine), comp
    pipe = load_pipeline(folder, dtype=torch.float16, text_encoder_dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(pipe.unet.state_dict().values(), ref.unet.state_dict().values()))


def test_old_format_keys_are_left_to_the_library(tmp_path):
    """A VAE saved with the old attention names (query/key/value/proj_attn), which diffusers renames on load:
    not taken over (None), and the pipeline still loads with the right values."""
    from safetensors.torch import load_file, save_file

    from rlr_backend.models.folder_weights import load_cast_component
    from diffusers import AutoencoderKL

    folder = save_tiny_pipeline("sd1", tmp_path / "sd1")
    f = folder / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(f)
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for k, v in state.items():
        for new, was in renames.items():
            if f"attentions.0.{new}." in k:
                k = k.replace(f".{new}.", f".{was}.")
        old[k] = v
    assert old.keys() != state.keys()
    save_file(old, f)
    from rlr_backend.models.weights import header_tensors

    assert load_cast_component(folder, "vae", AutoencoderKL, {f: header_tensors(f)}, torch.float16) is None
    pipe = load_pipeline(folder, dtype=torch.float16)
    ref = AutoencoderKL.from_pretrained(str(folder / "vae"), local_files_only=True)
    assert all(torch.equal(a, b.half()) for a, b in zip(pipe.vae.state_dict().values(), ref.state_dict().values()))


def test_a_folder_tensor_of_the_wrong_shape_is_one_line_naming_the_file_key_and_both_shapes(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    folder = save_tiny_pipeline("sd1", tmp_path / "sd1")
    f = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(f)
    key = "conv_out.weight"
    want = list(state[key].shape)
    state[key] = state[key][:, :-1].contiguous()
    save_file(state, f)
    runs = tmp_path / "runs"
    assert train_main(["--model", str(folder), "--precision", "fp16", "--output-dir", str(runs), "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert str(f) in err[0] and f"tensor {key!r} has shape {list(state[key].shape)}" in err[0] and str(want) in err[0]
    assert not runs.exists()
