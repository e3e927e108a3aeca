"""The committed flow-matching default model (plain diffusers loads it, it samples captions right) and its
pretraining script (a few steps write a loadable folder; an interrupted run resumes bit for bit)."""

import json

import pytest
import torch

from rlr_backend.models.default_flow_model import (
    DEFAULT_FLOW_MODEL_DIR,
    check_flow_model_dir,
    flow_sampling_defaults,
    load_flow_pipeline,
)

PROMPTS = ["a red circle on a blue background", "a white triangle on a black background"]


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusion3Pipeline

    # plain diffusers, as SD3 without T5 is loaded
    return StableDiffusion3Pipeline.from_pretrained(str(DEFAULT_FLOW_MODEL_DIR), text_encoder_3=None, tokenizer_3=None,
                                                    local_files_only=True, use_safetensors=True)


def test_committed_folder_is_complete_small_and_pickle_free():
    check_flow_model_dir(DEFAULT_FLOW_MODEL_DIR)
    files = [f for f in DEFAULT_FLOW_MODEL_DIR.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) < 13_000_000
    assert not [f for f in files if f.suffix in {".bin", ".pt", ".pth", ".ckpt", ".pkl"}]
    index = json.loads((DEFAULT_FLOW_MODEL_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["text_encoder_3"] == [None, None] and index["tokenizer_3"] == [None, None]
    d = flow_sampling_defaults()
    assert set(d) >= {"max_sequence_length", "num_inference_steps", "guidance_scale", "shift"}
    training = json.loads((DEFAULT_FLOW_MODEL_DIR / "rlr_training.json").read_text())
    assert training["steps_done"] > 0 and training["max_sequence_length"] == d["max_sequence_length"]


def test_encode_prompt_gives_the_conditioning_it_was_trained_on(pipe):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    assert isinstance(pipe.transformer, SD3Transformer2DModel)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.transformer.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32
    n = flow_sampling_defaults()["max_sequence_length"]
    assert pipe.scheduler.config.shift == flow_sampling_defaults()["shift"]
    emb, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False, max_sequence_length=n)
    cfg = pipe.transformer.config
    assert emb.shape == (2, pipe.tokenizer.model_max_length + n, cfg.joint_attention_dim)
    assert pooled.shape == (2, cfg.pooled_projection_dim)
    assert (emb[:, -n:] == 0).all() and emb[:, :-n].abs().sum() > 0  # the T5 slots are zeros, CLIP's are not


def test_samples_are_finite_and_show_their_captions(pipe):
    from rlr_backend.models.eval_flow import sample_flow
    from rlr_backend.rewards.alignment import PromptAlignmentReward
    from rlr_backend.sampling.flow import FlowSchedule

    d = flow_sampling_defaults()
    steps = 10
    sched = FlowSchedule.from_diffusers(pipe.scheduler, steps, kind="ode", eta=0.0)
    images = sample_flow(pipe, PROMPTS, [1, 2], sched, d["guidance_scale"], d["max_sequence_length"])
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    # this project's ODE steps are the diffusers pipeline's sampler, to rounding
    lat = torch.cat([torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(s)) for s in (1, 2)])
    ref = pipe(PROMPTS, height=32, width=32, num_inference_steps=steps, guidance_scale=d["guidance_scale"],
               max_sequence_length=d["max_sequence_length"], latents=lat, output_type="pt").images
    torch.testing.assert_close(images, ref, atol=1e-4, rtol=0)
    # chance: the product of the three attribute probabilities is about 1/108 for a model that ignores captions
    reward = PromptAlignmentReward()(images, PROMPTS)
    assert reward.mean() > 0.3, reward


def _tiny(tmp_path, name, **kw):
    from rlr_backend.models.pretrain_flow import FlowConfig, pretrain

    cfg = FlowConfig(steps=3, batch_size=4, warmup=1, num_layers=1, num_heads=1, head_dim=8)
    return pretrain(tmp_path / name, cfg, save_every=0, **kw)


def test_pretraining_writes_a_loadable_folder_and_resumes_bit_for_bit(tmp_path):
    from rlr_backend.models.pretrain_flow import resume_path
    from rlr_backend.safe_io import load_tensors

    weights = "transformer/diffusion_pytorch_model.safetensors"
    straight = _tiny(tmp_path, "straight")
    assert not resume_path(straight).exists()
    p = load_flow_pipeline(straight)
    assert p.transformer.config.num_layers == 1
    assert json.loads((straight / "rlr_training.json").read_text())["steps_done"] == 3

    cut = _tiny(tmp_path, "cut", stop_after=2)
    assert json.loads((cut / "rlr_training.json").read_text())["steps_done"] == 2
    assert resume_path(cut).is_dir()
    c = load_tensors(cut / weights)[0]
    _tiny(tmp_path, "cut", resume=True)
    assert not resume_path(cut).exists()
    a, b = load_tensors(straight / weights)[0], load_tensors(cut / weights)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and the training moved the weights: the 2-step folder differs from the 3-step one
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_bad_settings_are_one_line_errors_before_anything_is_written(tmp_path, capsys):
    from rlr_backend.models.pretrain_flow import FlowConfig, main

    with pytest.raises(ValueError, match="steps=0"):
        FlowConfig(steps=0)
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "m"), "--layers", "0"])
    assert e.value.code == 2 and "num_layers=0" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
