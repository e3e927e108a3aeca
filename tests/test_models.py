"""SD1.x, SD2.x-v and SDXL from local files: tiny random-init models of each architecture, built and
saved in tmp folders, go load -> train a step -> export LoRA -> reload; SDXL conditioning matches
diffusers; bad input gives one clear error and writes nothing."""

import json
import shutil

import pytest
import torch
from benchmarks.ldm_export import save_ldm_checkpoint  # diffusers pipeline -> one LDM-layout file

from rlr_backend.lora import save_kohya
from rlr_backend.models.loader import load_model
from rlr_backend.models.sdxl_model import SDXLConditioning, SDXLModel
from rlr_backend.models.single_file import UnsupportedCheckpoint
from rlr_backend.models.tiny_pipelines import ARCHS, save_tiny_pipeline
from rlr_backend.safe_io import InvalidModelFile, load_tensors, save_tensors
from rlr_backend.train import TrainConfig, Trainer
from rlr_backend.train.sample import add_lora_file

TINY = dict(batch_size=2, images_per_prompt=2, fo_steps=1, num_inference_steps=4, eval_every=0, eval_seeds=1,
            lr=1e-2, reward="brightness", guidance_scale=3.0)
EXPECTED = {"sd1": ("DiffusersModel", "sd_v1", "epsilon"), "sd2v": ("DiffusersModel", "sd_v2", "v_prediction"),
            "sdxl": ("SDXLModel", "sdxl_base_v1-0", "epsilon")}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {arch: save_tiny_pipeline(arch, root / arch) for arch in ARCHS}


def denoise(model, lora_scale=None):
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, *model.latent_shape), generator=g)
    with torch.no_grad():
        return model.denoiser(3.0)(x, 500, model.conditioning(["a red circle", "a blue square"]))


@pytest.mark.parametrize("arch", ARCHS)
def test_load_train_export_reload(folders, arch, tmp_path):
    cls, version, prediction = EXPECTED[arch]
    model = load_model(folders[arch])
    assert (type(model).__name__, model.base_model_version) == (cls, version)
    assert model.schedule(4, 1.0).prediction_type == prediction
    base = denoise(model)
    result = Trainer(TrainConfig(model=str(folders[arch]), steps=1, output_dir=tmp_path, run_name=arch, **TINY),
                     model=model, progress=False).run()
    trained = denoise(model)
    tensors, meta = load_tensors(result.lora_path)
    assert meta["ss_base_model_version"] == version
    ups = [v for k, v in tensors.items() if k.endswith("lora_up.weight")]
    assert ups and any(u.abs().max() > 0 for u in ups)  # non-zero B: the reload check below is not vacuous
    assert (trained - base).abs().max() > 1e-6

    reloaded = load_model(folders[arch])
    add_lora_file(reloaded.pipe, result.lora_path)
    torch.testing.assert_close(denoise(reloaded), trained, atol=2e-3, rtol=2e-3)  # fp16 export


def test_sdxl_conditioning_matches_diffusers(folders):
    model = load_model(folders["sdxl"])
    assert isinstance(model, SDXLModel)
    cond = model.conditioning(["a red circle"])
    assert isinstance(cond, SDXLConditioning)
    pe, ne, pp, npool = model.pipe.encode_prompt("a red circle", device="cpu", num_images_per_prompt=1,
                                                 do_classifier_free_guidance=True)
    torch.testing.assert_close(cond.embeds, pe)
    torch.testing.assert_close(cond.pooled, pp)
    torch.testing.assert_close(cond.uncond, ne)  # zeros: force_zeros_for_empty_prompt
    torch.testing.assert_close(cond.uncond_pooled, npool)
    assert cond.time_ids.tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]
    # one full denoiser step equals diffusers' own UNet call with its added conditioning
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    add = {"text_embeds": pp, "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])}
    with torch.no_grad():
        ref = model.unet(x, torch.tensor([500]), encoder_hidden_states=pe, added_cond_kwargs=add).sample
        torch.testing.assert_close(model.denoiser(1.0)(x, 500, cond), ref)


def test_unsupported_architecture_is_refused(folders, tmp_path):
    bad = tmp_path / "pixart"
    shutil.copytree(folders["sd1"], bad)
    index = json.loads((bad / "model_index.json").read_text())
    (bad / "model_index.json").write_text(json.dumps({**index, "_class_name": "PixArtSigmaPipeline"}))
    with pytest.raises(ValueError, match="unsupported architecture 'PixArtSigmaPipeline'.*StableDiffusionXLPipeline"):
        load_model(bad)
    out = tmp_path / "runs"
    with pytest.raises(ValueError, match="unsupported architecture"):
        Trainer(TrainConfig(model=str(bad), steps=1, output_dir=out, **TINY), progress=False)
    assert not out.exists()


def test_sdxl_lora_on_sd1_is_refused_unchanged(folders, tmp_path):
    sdxl = load_model(folders["sdxl"])
    sdxl.add_lora(2, None, seed=0)
    sd, rank, alpha = sdxl.lora_state_dict()
    path = save_kohya(sd, tmp_path / "sdxl.safetensors", rank, alpha, base_model_version=sdxl.base_model_version)
    sd1 = load_model(folders["sd1"])
    before = {k: v.clone() for k, v in sd1.unet.state_dict().items()}
    with pytest.raises(InvalidModelFile, match=r"made for SDXL .* the model is SD1\.x"):
        add_lora_file(sd1.pipe, path)
    # without the header the module names/shapes still give it away
    with pytest.raises(InvalidModelFile, match=r"the model is SD1\.x"):
        sd1.load_lora(sd)
    assert not getattr(sd1.unet, "peft_config", None)
    assert sd1.unet.state_dict().keys() == before.keys()


@pytest.mark.parametrize("name", ["model.ckpt", "model.safetensors"])
def test_pickle_checkpoint_is_refused(tmp_path, name):
    p = tmp_path / name
    torch.save({"state_dict": {"x": torch.zeros(1)}}, p)  # a pickle, whatever its name says
    out = tmp_path / "runs"
    with pytest.raises(InvalidModelFile, match="pickle"):
        load_model(p)
    with pytest.raises(InvalidModelFile, match="pickle"):
        Trainer(TrainConfig(model=str(p), steps=1, output_dir=out, **TINY), progress=False)
    assert not out.exists()


def test_pickles_beside_safetensors_are_ignored_and_a_pickle_only_component_is_refused(folders, tmp_path, caplog):
    """An official repository's full clone has .bin files beside the .safetensors ones: the safetensors are
    loaded, the pickles never read (one info line); a component with only a pickle is refused naming it."""
    import logging
    import pickle

    good = tmp_path / "f"
    shutil.copytree(folders["sd1"], good)
    for comp, name in (("unet", "diffusion_pytorch_model.bin"), ("text_encoder", "pytorch_model.bin"),
                       ("vae", "diffusion_pytorch_model.fp16.bin")):
        (good / comp / name).write_bytes(pickle.dumps({"x": 1}))
    (good / "v1-5-pruned.ckpt").write_bytes(pickle.dumps({"x": 1}))
    with caplog.at_level(logging.INFO, logger="rlr_backend.models.loader"):
        model = load_model(good)
    notes = [r.getMessage() for r in caplog.records if "pickle file" in r.getMessage()]
    assert len(notes) == 1 and "ignoring 4 pickle file(s)" in notes[0], notes
    torch.testing.assert_close(denoise(model), denoise(load_model(folders["sd1"])))

    only = tmp_path / "only"
    shutil.copytree(good, only)
    (only / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(InvalidModelFile, match=r"the unet weights exist only as a pickle \(unet/diffusion_pytorch_model"
                                               r"\.bin\); pickles are never loaded"):
        load_model(only)


# -- single-file checkpoints (ComfyUI/A1111 layout) ------------------------------------------------

@pytest.fixture(scope="module")
def checkpoints(folders, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {arch: save_ldm_checkpoint(load_model(folders[arch]).pipe, root / f"{arch}.safetensors") for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_single_file_load_train_export_reload(folders, checkpoints, arch, tmp_path):
    cls, version, prediction = EXPECTED[arch]
    model = load_model(checkpoints[arch], image_size=32)
    assert (type(model).__name__, model.base_model_version, model.latent_shape) == (cls, version, (4, 16, 16))
    assert model.schedule(4, 1.0).prediction_type == prediction
    folder_model = load_model(folders[arch])
    torch.testing.assert_close(denoise(model), denoise(folder_model))  # same network, same conditioning
    torch.testing.assert_close(model.decode(torch.ones(1, 4, 16, 16)), folder_model.decode(torch.ones(1, 4, 16, 16)))
    result = Trainer(TrainConfig(model=str(checkpoints[arch]), steps=1, output_dir=tmp_path, run_name=arch, **TINY),
                     model=model, progress=False).run()
    # the LoRA trained on the single file applies to the same model loaded from its diffusers folder
    add_lora_file(folder_model.pipe, result.lora_path)
    torch.testing.assert_close(denoise(folder_model), denoise(model), atol=2e-3, rtol=2e-3)


def test_single_file_native_size_and_v_pred_marker(folders, tmp_path):
    pipe = load_model(folders["sd1"]).pipe
    path = save_ldm_checkpoint(pipe, tmp_path / "v.safetensors", v_pred_marker=True)
    model = load_model(path)  # native SD1 size: 512 px
    assert model.latent_shape == (4, 256, 256) and model.image_size == 512
    assert model.schedule(4, 1.0).prediction_type == "v_prediction"  # ComfyUI's v_pred key
    assert load_model(path, image_size=32, prediction_type="epsilon").schedule(4, 1.0).prediction_type == "epsilon"
    with pytest.raises(ValueError, match="only apply to single-file"):
        load_model(folders["sd1"], image_size=32)


def _variant(src, dst, edit):
    tensors, _ = load_tensors(src)
    save_tensors(edit(dict(tensors)), dst)
    return dst


@pytest.mark.parametrize("case, match", [
    ("inpainting", r"9 input channels"),
    ("refiner", r"SDXL refiner"),
    ("unet_only", r"no text encoder beside it"),
    ("sd3", r"no Stable Diffusion UNet keys"),
    ("lora", r"this is a LoRA"),
    ("missing_vae_tensor", r"VAE weights do not match"),
])
def test_unsupported_single_files_are_refused(checkpoints, tmp_path, case, match):
    def edit(t):
        if case == "inpainting":
            w = t["model.diffusion_model.input_blocks.0.0.weight"]
            t["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(w.shape[0], 9, *w.shape[2:])
        elif case == "refiner":
            t = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v for k, v in t.items()
                 if not k.startswith("conditioner.embedders.0.")}
        elif case == "unet_only":
            t = {k: v for k, v in t.items() if k.startswith("model.diffusion_model.")}
        elif case == "sd3":
            t = {"model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight": torch.zeros(6, 2)}
        elif case == "lora":
            t = {"lora_unet_down_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(2, 4)}
        else:
            t.pop("first_stage_model.decoder.conv_out.bias")
        return t

    src = checkpoints["sdxl" if case == "refiner" else "sd1"]
    bad = _variant(src, tmp_path / f"{case}.safetensors", edit)
    out = tmp_path / "runs"
    with pytest.raises(UnsupportedCheckpoint, match=match) as e:
        Trainer(TrainConfig(model=str(bad), steps=1, output_dir=out, **TINY), progress=False)
    assert "SD1.x, SD2.x or SDXL base" in str(e.value)
    assert not out.exists()


def test_rlr_sample_on_single_file_and_bad_lora(checkpoints, folders, tmp_path, capsys):
    from rlr_backend.cli import sample_main

    out = tmp_path / "s.png"
    ckpt = str(checkpoints["sdxl"])
    assert sample_main(["a red circle", "--model", ckpt, "--image-size", "32", "--num", "1", "--steps", "2",
                        "--out", str(out)]) == 0
    assert out.is_file()
    sd1 = load_model(folders["sd1"])
    sd1.add_lora(2, None, seed=0)
    sd, rank, alpha = sd1.lora_state_dict()
    lora = save_kohya(sd, tmp_path / "sd1.safetensors", rank, alpha, base_model_version="sd_v1")
    bad = tmp_path / "bad.png"
    assert sample_main(["a red circle", "--model", ckpt, "--image-size", "32", "--lora", str(lora),
                        "--out", str(bad)]) == 2
    assert "made for SD1.x" in capsys.readouterr().err and not bad.exists()


def test_rlr_train_on_a_single_file_at_a_chosen_size(checkpoints, folders, tmp_path, capsys):
    """`rlr-train --model file.safetensors --image-size N` trains at N px; a folder refuses the option."""
    from rlr_backend.cli import train_main

    args = ["--batch-size", "2", "--images-per-prompt", "2", "--fo-steps", "1", "--num-inference-steps", "4",
            "--eval-every", "0", "--eval-seeds", "1", "--steps", "1", "--quiet", "--output-dir", str(tmp_path)]
    assert train_main([*args, "--model", str(checkpoints["sd2v"]), "--image-size", "32", "--prediction-type",
                       "epsilon", "--run-name", "sd2"]) == 0
    cfg = json.loads((tmp_path / "sd2" / "config.json").read_text())
    assert (cfg["image_size"], cfg["prediction_type"]) == (32, "epsilon")
    trainer = Trainer(TrainConfig.from_json({**cfg, "run_name": "again"}), progress=False)
    assert trainer.latent_shape == (4, 16, 16) and trainer.schedule.prediction_type == "epsilon"  # 32 px, not 768
    assert train_main([*args, "--model", str(folders["sd1"]), "--image-size", "32", "--run-name", "f"]) == 2
    assert "only apply to single-file" in capsys.readouterr().err and not (tmp_path / "f").exists()
