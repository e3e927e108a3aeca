"""Flow-matching models (SD3 / SD3.5, FLUX.1, Z-Image, Qwen-Image) as ``TrainableModel``s, on tiny random-weight
folders.

Checked against diffusers itself: the deterministic chain (eta = 0) reproduces each pipeline's own sampling loop,
and an exported LoRA loads with ``load_lora_weights`` into every adapted module and gives the trained model's
output. Training: one update of rlr and truncated_bp through the trainer. Bad input: one line each.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time

import pytest
import torch

from rlr_backend.lora import load_lora, save_kohya
from rlr_backend.models.flux_model import pack_latents, unpack_latents
from rlr_backend.models.loader import check_pipeline_dir, load_model, load_pipeline, model_for_pipeline
from rlr_backend.models.tiny_flow_pipelines import save_tiny_flow_pipeline
from rlr_backend.safe_io import InvalidModelFile
from rlr_backend.sampling import FlowSchedule, PromptSchedule, sample_chain

ARCHS = ("sd3", "sd35", "flux_dev", "flux_schnell", "zimage", "qwenimage")
SEQ = 16  # text tokens (T5 / Qwen) in these tests: the tiny tokenizers' length


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    return {arch: save_tiny_flow_pipeline(arch, root / arch) for arch in ARCHS}


def _model(folder):
    m = load_model(folder, image_size=32)
    m.max_sequence_length = SEQ
    return m


def _diffusers_latents(m, arch, x_T, steps, guidance):
    """The pipeline's own sampling loop from ``x_T`` (output_type latent), unpacked for FLUX and Qwen-Image
    (whose guidance is ``true_cfg_scale`` with the empty negative prompt)."""
    kw = dict(height=32, width=32, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
              max_sequence_length=SEQ)
    if arch == "qwenimage":
        kw.update(guidance_scale=None, true_cfg_scale=guidance, negative_prompt="")
        out = m.pipe("a red circle", latents=pack_latents(x_T[:, :, 0]), **kw).images
        return unpack_latents(out, *x_T.shape[3:]).unsqueeze(2)
    if arch.startswith("flux"):
        out = m.pipe("a red circle", latents=pack_latents(x_T), **kw).images
        return unpack_latents(out, *x_T.shape[2:])
    return m.pipe("a red circle", latents=x_T, **kw).images


@pytest.mark.parametrize("arch,guidance", [("sd3", 4.0), ("sd35", 4.0), ("flux_dev", 3.5), ("flux_schnell", 0.0),
                                           ("zimage", 3.0), ("qwenimage", 4.0)])
def test_deterministic_chain_equals_the_pipeline(folders, arch, guidance):
    """eta = 0 makes every flow step the Euler step the scheduler takes: our chain (time convention, packing,
    guidance, shift, conditioning) must land on the pipeline's latents."""
    m = _model(folders[arch])
    steps = 3
    x_T = torch.randn((1, *m.latent_shape), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = sample_chain(m.denoiser(guidance), m.schedule(steps, 0.0),
                            PromptSchedule.constant(m.conditioning(["a red circle"]), steps), x_T).final
        ref = _diffusers_latents(m, arch, x_T, steps, guidance)
    assert ours.shape == x_T.shape
    torch.testing.assert_close(ours, ref.float(), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(ours, x_T)


def test_flux_packing_round_trips_and_schedule_shifts(folders):
    x = torch.randn(2, 4, 6, 8)
    torch.testing.assert_close(unpack_latents(pack_latents(x), 6, 8), x)
    dev, schnell = _model(folders["flux_dev"]), _model(folders["flux_schnell"])
    s_dev, s_schnell = dev.schedule(4, 0.7), schnell.schedule(4, 0.7)
    assert isinstance(s_dev, FlowSchedule) and s_dev.kind == "flow_sde"
    torch.testing.assert_close(s_schnell.sigmas, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    mu = 0.5 + (64 - 256) * (1.15 - 0.5) / (4096 - 256)  # 8x8 = 64 image tokens, the pipeline's calculate_shift
    lin = s_schnell.sigmas[:-1]
    torch.testing.assert_close(s_dev.sigmas[:-1], math.exp(mu) / (math.exp(mu) + 1 / lin - 1))
    window = dev.schedule(4, 0.7, kind="cps", sde_window=(1, 2))
    assert window.sde_steps == (1, 2) and window.kind == "cps"


def test_qwenimage_schedule_text_padding_guidance_and_decode(folders):
    """Qwen-Image's pieces one by one: the dynamic shift then the shift_terminal stretch; a batch of texts of
    different lengths (padded, masked) gives each text's own velocity; the guidance is the norm-rescaled true CFG;
    5-D latents decode as the pipeline decodes them; a guidance-distilled transformer is refused in one line."""
    from rlr_backend.sampling import classifier_free_guidance, norm_rescaled_guidance

    m = _model(folders["qwenimage"])
    assert m.latent_shape == (4, 1, 8, 8) and m.image_seq_len() == 16 and m.base_model_version == "qwen_image"
    mu = 0.5 + (16 - 256) * (0.9 - 0.5) / (8192 - 256)  # 4x4 tokens, the released scheduler's 256 -> 8192, 0.5 -> 0.9
    lin = torch.tensor([1.0, 2 / 3, 1 / 3], dtype=torch.float64)
    shifted = math.exp(mu) / (math.exp(mu) + 1 / lin - 1)
    stretched = 1 - (1 - shifted) / ((1 - shifted[-1]) / (1 - 0.02))  # shift_terminal: the last sigma becomes 0.02
    torch.testing.assert_close(m.schedule(3, 0.0).sigmas[:-1], stretched)

    texts = ["a red circle", "a blue square on the background"]
    lengths = [e[0].shape[0] for e in m.encode(texts + [""])]
    assert len(set(lengths)) == 3  # variable lengths: the batch below is padded and masked
    x = torch.randn((2, *m.latent_shape), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        den = m.denoiser(4.0)
        both = den(x, 600.0, m.conditioning(texts))
        alone = torch.cat([den(x[i:i + 1], 600.0, m.conditioning(texts[i:i + 1])) for i in range(2)])
        plain = m.denoiser(1.0)
        cond, uncond = plain(x, 600.0, m.conditioning(texts)), plain(x, 600.0, m.conditioning(["", ""]))
    torch.testing.assert_close(both, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both, den.guide(uncond, cond, 4.0), atol=1e-5, rtol=1e-5)
    packed = pack_latents(both[:, :, 0])
    torch.testing.assert_close(packed.norm(dim=-1), pack_latents(cond[:, :, 0]).norm(dim=-1))  # per-token rescale
    assert (both - classifier_free_guidance(uncond, cond, 4.0)).abs().max() > 1e-2  # not the plain CFG
    u, c = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    torch.testing.assert_close(norm_rescaled_guidance(u, c, 1.0), c)

    x_T = torch.randn((1, *m.latent_shape), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        final = sample_chain(m.denoiser(4.0), m.schedule(3, 0.0), PromptSchedule.constant(m.conditioning(texts[:1]), 3),
                             x_T).final
        ours = m.decode(final)
        ref = m.pipe(texts[0], negative_prompt="", true_cfg_scale=4.0, latents=pack_latents(x_T[:, :, 0]), height=32,
                     width=32, num_inference_steps=3, output_type="pt", max_sequence_length=SEQ).images
    assert ours.shape == (1, 3, 32, 32)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)

    m.pipe.transformer.register_to_config(guidance_embeds=True)
    with pytest.raises(ValueError, match="guidance-distilled .* not supported") as err:
        model_for_pipeline(m.pipe)
    assert "\n" not in str(err.value)


def _random_lora(m, seed=0):
    m.add_lora(2, 4.0, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in m.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("arch", ["sd35", "flux_dev", "zimage", "qwenimage"])
def test_lora_export_loads_in_diffusers_and_back(folders, arch, tmp_path):
    """The exported file (diffusers keys, scale alpha/rank = 2 folded in) adapts every module in diffusers'
    ``load_lora_weights`` and gives the trained model's velocity; our loader reads it back to the same."""
    trained = _model(folders[arch])
    _random_lora(trained)
    sd, rank, alpha = trained.lora_state_dict(dtype=torch.float32)
    prefix = "diffusion_model." if arch == "zimage" else "transformer."  # what ComfyUI maps for each
    assert trained.lora_prefix == prefix
    assert rank == 2 and alpha == 2.0 and all(k.startswith(prefix) and ".lora_" in k for k in sd)
    path = save_kohya(sd, tmp_path / "lora.safetensors", rank, alpha, base_model_version=trained.base_model_version)
    x = torch.randn((2, *trained.latent_shape), generator=torch.Generator().manual_seed(2))
    cond = trained.conditioning(["a red circle", "a blue square"])
    with torch.no_grad():
        want = trained.denoiser(4.0)(x, 700.0, cond)

        pipe = load_pipeline(folders[arch])
        base = model_for_pipeline(pipe)
        base.max_sequence_length = SEQ
        before = base.denoiser(4.0)(x, 700.0, cond)
        pipe.load_lora_weights(str(path), adapter_name="exported")
        adapted = {n for n, mod in pipe.transformer.named_modules() if "exported" in getattr(mod, "lora_A", {})}
        assert adapted == {k[len(prefix):].rsplit(".", 2)[0] for k in sd}  # no key left unloaded
        got = base.denoiser(4.0)(x, 700.0, cond)

        ours = _model(folders[arch])
        load_lora(ours.transformer, path, model_version=ours.base_model_version)
        back = ours.denoiser(4.0)(x, 700.0, cond)
    assert (want - before).abs().max() > 1e-3  # the LoRA changes the output
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(back, want, atol=1e-4, rtol=1e-4)


def test_lora_of_another_architecture_is_refused(folders, tmp_path):
    sd3 = _model(folders["sd3"])
    name = "transformer_blocks.0.attn.to_q"  # a module SD3 has too: the header decides
    sd = {f"transformer.{name}.lora_A.weight": torch.zeros(2, 16), f"transformer.{name}.lora_B.weight": torch.zeros(16, 2)}
    path = save_kohya(sd, tmp_path / "flux.safetensors", 2, 2.0, base_model_version="flux1")
    with pytest.raises(InvalidModelFile, match=r"made for FLUX\.1 .* the model is SD3") as err:
        load_lora(sd3.transformer, path, model_version=sd3.base_model_version)
    assert "\n" not in str(err.value)
    assert not hasattr(sd3.transformer, "peft_config") or not sd3.transformer.peft_config


def _train_config(folder, tmp_path, estimator, **kw):
    from rlr_backend.train import TrainConfig

    base = dict(model=str(folder), image_size=32, reward="brightness", estimator=estimator, h=1, fo_steps=1,
                truncation=1, steps=1, batch_size=2, images_per_prompt=2, num_inference_steps=3, guidance_scale=2.0,
                eval_every=0, eval_seeds=1, prompts=(), output_dir=tmp_path, run_name=estimator, lora_rank=2)
    base.update(kw)
    from rlr_backend.train.prompts import PromptSpec

    base["prompts"] = (PromptSpec("a red circle"),)
    return TrainConfig(**base)


@pytest.mark.parametrize("arch,estimator,kw", [("sd3", "rlr", {}), ("sd3", "truncated_bp", {"flow_step": "cps"}),
                                               ("flux_dev", "rlr", {"flow_step": "dance_sde", "flow_eta": 0.3}),
                                               ("zimage", "truncated_bp", {"sde_window": (0, 2)}),
                                               ("zimage", "ddpo", {"flow_step": "cps", "skip_deterministic": True}),
                                               ("qwenimage", "rlr", {})])
def test_one_training_update(folders, tmp_path, arch, estimator, kw):
    """One optimizer update through the trainer changes the LoRA and reports finite metrics; the time ratio to a
    no-grad sample of the same batch is printed (pytest -s), not asserted."""
    from rlr_backend.train import Trainer

    trainer = Trainer(_train_config(folders[arch], tmp_path, estimator, **kw), progress=False)
    assert isinstance(trainer.schedule, FlowSchedule) and trainer.schedule.kind == kw.get("flow_step", "flow_sde")
    before = [p.detach().clone() for p in trainer.params]
    problem = trainer.problem([0, 0])
    x_T = torch.randn((2, *trainer.latent_shape), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    with torch.no_grad():
        sample_chain(trainer.model, trainer.schedule, problem.prompts, x_T, generator=torch.Generator().manual_seed(0))
    t1 = time.perf_counter()
    metrics = trainer.update()
    t2 = time.perf_counter()
    print(f"{arch} {estimator}: update / no-grad sample time = {(t2 - t1) / (t1 - t0):.2f}")
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, trainer.params))
    assert not (tmp_path / estimator).exists()  # update() writes nothing


def test_ddpo_on_a_chain_with_deterministic_steps_needs_skip_deterministic(folders, tmp_path):
    from rlr_backend.choices import ConfigError
    from rlr_backend.train import Trainer

    with pytest.raises(ValueError, match=r"ddpo takes a likelihood ratio at every trained step, but sampler steps "
                                         r"\[2\] are deterministic.*--skip-deterministic"):
        Trainer(_train_config(folders["zimage"], tmp_path, "ddpo", flow_step="cps"), progress=False)
    with pytest.raises(ConfigError, match="skip_deterministic applies to the ddpo estimator, not rlr"):
        _train_config(folders["zimage"], tmp_path, "rlr", skip_deterministic=True)


def test_trained_lora_file_says_its_architecture(folders, tmp_path):
    from rlr_backend.safe_io import load_tensors
    from rlr_backend.train import Trainer

    result = Trainer(_train_config(folders["sd3"], tmp_path, "truncated_bp"), progress=False).run()
    tensors, meta = load_tensors(result.lora_path)
    assert meta["ss_base_model_version"] == "sd3" and all(k.startswith("transformer.") for k in tensors)
    assert not any(k.endswith(".alpha") for k in tensors)
    from rlr_backend.cli import sample_main

    out = tmp_path / "grid.png"
    assert sample_main(["a red circle", "--lora", str(result.lora_path), "--num", "1", "--steps", "3",
                        "--image-size", "32", "--out", str(out), "--model", str(folders["sd3"])]) == 0 and out.is_file()


def test_cli_refuses_ddim_options_on_a_flow_model_and_the_reverse(folders, tmp_path, capsys):
    from rlr_backend.cli import train_main

    out = tmp_path / "runs"
    assert train_main(["--model", str(folders["sd3"]), "--eta", "0.5", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rlr-train: error: eta is a DDIM option") and "\n" not in err
    assert train_main(["--flow-step", "cps", "--output-dir", str(out)]) == 2
    assert "flow_step applies to flow-matching models" in capsys.readouterr().err
    assert train_main(["--model", str(folders["sd3"]), "--sde-window", "2,5", "--num-inference-steps", "4",
                       "--estimator", "truncated_bp", "--output-dir", str(out)]) == 2
    assert "sde_window 2,5" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        train_main(["--model", str(folders["sd3"]), "--flow-step", "ode", "--output-dir", str(out)])
    assert exit_.value.code == 2 and "invalid choice: 'ode'" in capsys.readouterr().err
    assert not out.exists()


def test_flow_folder_missing_a_component_is_named(folders, tmp_path):
    broken = shutil.copytree(folders["flux_dev"], tmp_path / "flux")
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(FileNotFoundError, match=r"\(FluxPipeline\) is incomplete, missing: text_encoder_2/config.json"):
        check_pipeline_dir(broken)
    sd3 = shutil.copytree(folders["sd3"], tmp_path / "sd3")  # a T5 named in model_index.json must be there
    index = json.loads((sd3 / "model_index.json").read_text())
    index["text_encoder_3"] = ["transformers", "T5EncoderModel"]
    (sd3 / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="text_encoder_3/config.json.*tokenizer_3/"):
        check_pipeline_dir(sd3)
    qwen = shutil.copytree(folders["qwenimage"], tmp_path / "qwen")
    shutil.rmtree(qwen / "vae")
    with pytest.raises(FileNotFoundError, match=r"^model folder .*qwen \(QwenImagePipeline\) is incomplete, missing: "
                                                r"vae/config.json, vae/\*.safetensors$"):
        check_pipeline_dir(qwen)


def test_default_flow_name_resolves_with_its_defaults(folders, tmp_path, monkeypatch):
    """``default-flow`` is the assets folder; its rlr_defaults.json sets max_sequence_length, the shift and the
    CLI's defaults for what was not given (tested on a tiny folder put in its place)."""
    from rlr_backend import model_paths
    from rlr_backend.cli import build_config, train_parser

    folder = shutil.copytree(folders["sd3"], tmp_path / "default_flow_model")
    (folder / "rlr_defaults.json").write_text(json.dumps({"max_sequence_length": 8, "num_inference_steps": 6,
                                                          "guidance_scale": 3.0, "shift": 2.0}))
    monkeypatch.setattr(model_paths, "DEFAULT_FLOW_MODEL_DIR", folder)
    config = build_config(train_parser().parse_args(["--model", "default-flow", "--guidance-scale", "5"]))
    assert (config.num_inference_steps, config.guidance_scale) == (6, 5.0)
    m = load_model("default-flow", image_size=32)
    assert m.max_sequence_length == 8 and m.pipe.scheduler.config.shift == 2.0
    assert m.conditioning(["a red circle"]).embeds.shape[1] == 16 + 8  # the CLIPs' 16 tokens + 8 zero T5 rows
    monkeypatch.setattr(model_paths, "DEFAULT_FLOW_MODEL_DIR", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="default-flow: the model folder .* is not installed"):
        build_config(train_parser().parse_args(["--model", "default-flow"]))


@pytest.mark.parametrize("arch,kind,needs", [("sd35", "SD3/SD3.5", "SD3.5 medium takes 2 CLIP .*given: none"),
                                              ("flux_dev", "FLUX.1", "16-wide attention heads; FLUX.1 has 128"),
                                              ("zimage", "Z-Image", "16-wide attention heads; Z-Image has 128")])
def test_a_transformer_only_file_without_its_encoders_is_refused(folders, arch, kind, needs):
    """A ComfyUI diffusion_models file (here diffusers' own transformer file) is recognised by its keys; loaded
    without its text encoder files it is refused with one line naming what it takes, or (these tiny FLUX.1 /
    Z-Image sizes) the head width whose rope axes cannot be resolved (tests/test_flow_single_file.py loads such
    files with their encoders)."""
    from rlr_backend.models.flow_detect import flow_transformer_kind
    from rlr_backend.models.single_file import load_single_file

    path = folders[arch] / "transformer" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(InvalidModelFile, match=needs) as err:
        load_model(path)
    assert "\n" not in str(err.value)
    with pytest.raises(InvalidModelFile, match=f"a {re.escape(kind)} transformer-only file .* --text-encoder FILE"):
        load_single_file(path)
    native = {"SD3/SD3.5": ["model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias"],
              "FLUX.1": ["double_blocks.0.img_attn.norm.key_norm.scale"],
              "Z-Image": ["diffusion_model.layers.0.attention.qkv.weight", "diffusion_model.cap_embedder.0.weight"]}
    assert flow_transformer_kind(native[kind]) == kind
    assert flow_transformer_kind(["model.diffusion_model.input_blocks.0.0.weight"]) is None


def test_training_defaults_per_model_kind_in_the_cli_and_the_app(folders, tmp_path):
    """Each kind's steps and guidance (FLUX.1-schnell: 4 steps, RLR's first-order part shortened to fit), from
    the folder's model_index.json and transformer config; an option given on the command line wins; the app's
    form gets the same values for a folder in its list and passes only the picked family's options."""
    from rlr_app.form import Settings, check_form, form_defaults, model_form_defaults
    from rlr_backend.cli import build_config, train_parser
    from rlr_backend.models.kind_defaults import KIND_DEFAULTS, model_kind

    kinds = {arch: model_kind(folders[arch]) for arch in ARCHS}
    assert kinds == {"sd3": "sd3", "sd35": "sd3", "flux_dev": "flux-dev", "flux_schnell": "flux-schnell",
                     "zimage": "zimage", "qwenimage": "qwen-image"}
    assert model_kind(None) == "sd"
    config = build_config(train_parser().parse_args(["--model", str(folders["flux_schnell"])]))
    assert (config.num_inference_steps, config.guidance_scale, config.fo_steps) == (4, 0.0, 2)
    config = build_config(train_parser().parse_args(["--model", str(folders["qwenimage"])]))
    assert (config.num_inference_steps, config.guidance_scale) == (10, 4.0)
    config = build_config(train_parser().parse_args(["--model", str(folders["sd3"]), "--num-inference-steps", "7"]))
    assert (config.num_inference_steps, config.guidance_scale) == (7, 4.5)
    settings = Settings(tmp_path / "runs", models_dir=folders["sd3"].parent)
    for arch in ("sd3", "flux_dev", "zimage"):
        values = model_form_defaults(arch, settings)
        assert {k: values[k] for k in KIND_DEFAULTS[kinds[arch]]} == KIND_DEFAULTS[kinds[arch]]
    form = {**form_defaults(), **model_form_defaults("flux_dev", settings), "model": "flux_dev", "eta": 0.3,
            "flow_step": "cps", "sde_start": 1, "sde_size": 2, "image_size": 32}
    errors, kw = check_form(form, settings)
    assert not errors and "eta" not in kw  # DDIM's eta is not a flow model's option: not passed
    assert (kw["flow_step"], kw["sde_window"], kw["image_size"], kw["guidance_scale"]) == ("cps", (1, 2), 32, 3.5)
    errors, kw = check_form({**form, "model": "default (embedded)"}, settings)
    assert not errors and not {"flow_step", "sde_window", "image_size"} & set(kw) and kw["eta"] == 0.3
    errors, _ = check_form({**form, "sde_start": 9, "sde_size": 2}, settings)
    assert "must fit the 10 sampling steps" in errors["sde_start"]
