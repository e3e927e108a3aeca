"""RLR through ComfyUI's flow-matching MODELs: a tiny SD3-layout checkpoint loaded by ComfyUI's checkpoint
loader (SD3.5-medium layout: block 0 has the second self-attention) and a tiny FLUX.1-dev-layout model
(built in-process: ComfyUI's detection fixes FLUX's width at 3072), both with weights that are inference
tensors, as the loader makes them. One update through the trainer, then the export checked in ComfyUI."""

import logging

import pytest
import torch

from rlr_backend.safe_io import load_tensors
from rlr_backend.train import PromptSpec, TrainConfig, Trainer

pytestmark = pytest.mark.comfyui

SIZE = 64  # pixels: an 8x8 latent, 4x4 tokens


@pytest.fixture(scope="module")
def sd3_file(comfy_inprocess, tmp_path_factory):
    import tiny_comfy

    path = tmp_path_factory.mktemp("sd3") / "sd3_tiny.safetensors"
    tiny_comfy.save_sd3_checkpoint(path)
    return path


def _build(kind, sd3_file):
    import tiny_comfy

    return tiny_comfy.load_sd3_checkpoint(sd3_file) if kind == "sd3" else tiny_comfy.build_flux()


@pytest.fixture(scope="module", params=["sd3", "flux"])
def trained(request, comfy_inprocess, sd3_file, tmp_path_factory):
    from comfy_nodes.comfy_source import ComfySource

    kind = request.param
    model, clip, vae = _build(kind, sd3_file)
    cfg = TrainConfig(steps=1, batch_size=2, images_per_prompt=2, num_inference_steps=3, eval_every=0, eval_seeds=1,
                      ckpt_every=1, lr=5e-2, reward="brightness", estimator="truncated_bp", truncation=2,
                      prompts=(PromptSpec("a red circle"),), guidance_scale=3.0,
                      output_dir=tmp_path_factory.mktemp(kind), run_name="run")
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode(False):
        source = ComfySource(model, clip, vae, SIZE, SIZE)
        cm = source.load()
        x = torch.randn(2, *cm.latent_shape, generator=g)
        cond = cm.conditioning(["a red circle", "a blue square"])
        with torch.no_grad():
            v_before = cm.denoiser(3.0)(x, 600.0, cond)
        with source.training():  # what logic.train enters (ComfyUI 0.33's fused kernels have no backward otherwise)
            result = Trainer(cfg, model=cm, progress=False).run()
        with torch.no_grad():
            v_trained = cm.denoiser(3.0)(x, 600.0, cond)
        sd32, rank, alpha = cm.lora_state_dict(torch.float32)
        cm.release()
    return dict(kind=kind, model=model, clip=clip, vae=vae, source=source, cm=cm, x=x, cond=cond, result=result,
                v_before=v_before, v_trained=v_trained, sd32=sd32, rank=rank, alpha=alpha)


def _fresh(t):
    from comfy_nodes.comfy_source import ComfySource

    return ComfySource(t["model"], t["clip"], t["vae"], SIZE, SIZE).load()


def test_one_update_trains_every_adapter_and_exports_diffusers_keys(trained):
    sd, meta = load_tensors(trained["result"].lora_path)
    version, prefix = {"sd3": ("sd3", "transformer."), "flux": ("flux1", "transformer.")}[trained["kind"]]
    assert meta["ss_base_model_version"] == version and meta["ss_network_alpha"] == meta["ss_network_dim"]
    assert all(k.startswith(prefix) and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in sd)
    ups = {k: v for k, v in sd.items() if k.endswith("lora_B.weight")}
    # SD3's last block is context-pre-only: its text query feeds nothing, so it gets no gradient (as in diffusers)
    unused = {"transformer.transformer_blocks.1.attn.add_q_proj.lora_B.weight"} if trained["kind"] == "sd3" else set()
    trained_ups = {k for k, u in ups.items() if float(u.float().abs().sum()) > 0}
    # SD3: blocks 0 and 1 x (q, k, v, out) + block 0's attn2 (4) + text (add_q/k/v, to_add_out; block 1 has no
    # to_add_out); FLUX: the double block's 8 + the single block's q, k, v
    assert len(ups) == {"sd3": 19, "flux": 11}[trained["kind"]]
    assert trained_ups == set(ups) - unused, sorted(set(ups) - trained_ups)
    if trained["kind"] == "sd3":  # the second self-attention of SD3.5 medium's block 0 is trained too
        assert "transformer.transformer_blocks.0.attn2.to_q.lora_B.weight" in trained_ups
    else:  # FLUX's single blocks: q / k / v are row blocks of ComfyUI's fused linear1
        assert "transformer.single_transformer_blocks.0.attn.to_v.lora_B.weight" in trained_ups
    assert (trained["v_trained"] - trained["v_before"]).abs().max() > 1e-4


def test_comfyui_maps_every_key_of_the_export(trained, caplog):
    import comfy.lora

    sd, _ = load_tensors(trained["result"].lora_path)
    key_map = comfy.lora.model_lora_keys_unet(trained["model"].model, {})
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(sd, key_map)
    assert len(patches) == len(sd) // 2 > 0
    assert "lora key not loaded" not in caplog.text
    print(f"[{trained['kind']}] ComfyUI maps {len(patches)} of {len(sd) // 2} LoRA modules")


def test_export_reproduces_the_trained_model_in_comfyui(trained):
    """ComfyUI applying the exported file (through its LoRA loader, fused-qkv row blocks included) gives the
    velocity of the training wrappers; without it the velocity differs."""
    with torch.inference_mode(False):
        fresh = _fresh(trained)
        fresh.load_lora(trained["sd32"], 1.0)
        with torch.no_grad():
            v = fresh.denoiser(3.0)(trained["x"], 600.0, trained["cond"])
        fresh.release()
        base = _fresh(trained)
        with torch.no_grad():
            v0 = base.denoiser(3.0)(trained["x"], 600.0, trained["cond"])
        base.release()
    assert torch.allclose(v, trained["v_trained"], atol=1e-4, rtol=1e-4), float((v - trained["v_trained"]).abs().max())
    assert torch.equal(v0, trained["v_before"])  # the user's model is unchanged
    assert (v0 - v).abs().max() > 1e-4


def test_the_chain_is_comfyuis_simple_schedule_with_the_models_shift(trained):
    """The sigmas of the chain are ComfyUI's "simple" scheduler's on the MODEL's sampling, also after a
    ModelSamplingSD3 / ModelSamplingFlux node replaced it (an object patch)."""
    import comfy.model_sampling
    import comfy.samplers

    model = trained["model"]
    patched = model.clone()
    ms = type(model.get_model_object("model_sampling"))(model.model.model_config)
    if isinstance(ms, comfy.model_sampling.ModelSamplingFlux):
        ms.set_parameters(shift=0.9)
    else:
        ms.set_parameters(shift=5.0)
    patched.add_object_patch("model_sampling", ms)
    for patcher in (model, patched):
        with torch.inference_mode(False):
            cm = trained["source"].__class__(patcher, trained["clip"], trained["vae"], SIZE, SIZE).load()
        ours = cm.schedule(10, 0.7).sigmas.float()
        theirs = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "simple", 10)
        assert torch.allclose(ours, theirs, atol=1e-5), (ours, theirs)
    assert not torch.allclose(cm.schedule(10, 0.7).sigmas, _fresh(trained).schedule(10, 0.7).sigmas)


def test_a_model_of_another_kind_is_refused_naming_it(comfy_inprocess, trained):
    import comfy.model_patcher
    import comfy.supported_models as sm

    from comfy_nodes.comfy_source import ComfySource

    config = sm.WAN21_T2V({"image_model": "wan2.1", "model_type": "t2v", "dim": 32, "ffn_dim": 64, "num_heads": 2,
                           "num_layers": 1, "in_dim": 16, "out_dim": 16, "text_dim": 32, "freq_dim": 32})
    config.set_inference_dtype(torch.float32, None)
    video = comfy.model_patcher.ModelPatcher(config.get_model({}), torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(ValueError, match=r"this MODEL is a WAN21 \(WAN21_T2V\) with ModelSamplingDiscreteFlow"):
        ComfySource(video, trained["clip"], trained["vae"], SIZE, SIZE)
    with pytest.raises(ValueError, match="multiples of 16"):
        ComfySource(trained["model"], trained["clip"], trained["vae"], 72, 64)


def test_zimage_trains_through_comfyui_and_its_export_loads_there(comfy_inprocess, caplog):
    """Z-Image (ComfyUI's Lumina2 class): gradients reach every adapter, captions of different lengths run in
    separate calls with the same result as alone, ComfyUI maps every key of the ``diffusion_model.`` export
    and applying it gives the trained velocity. Caption features are random (no tiny Qwen3 text encoder)."""
    import comfy.lora
    import tiny_comfy

    from comfy_nodes.comfy_source import ComfySource
    from rlr_backend.models.flow_model import FlowConditioning

    model, (_, clip, vae) = tiny_comfy.build_zimage(), tiny_comfy.build_flux()  # CLIP, VAE: only the sockets
    g = torch.Generator().manual_seed(1)
    rows = [{"c_crossattn": torch.randn(1, n, 32, generator=g), "num_tokens": n} for n in (7, 5)]
    empty = {"c_crossattn": torch.randn(1, 3, 32, generator=g), "num_tokens": 3}
    cond = FlowConditioning(rows, None, [empty] * 2, None)
    source = ComfySource(model, clip, vae, SIZE, SIZE)
    assert source.kind.name == "Z-Image"
    with torch.inference_mode(False):
        cm = source.load()
        params = cm.add_lora(2, None, 0)
        with torch.no_grad():
            for _, p in params[1::2]:
                p.normal_(generator=g)
        x = torch.randn(2, *cm.latent_shape, generator=g)
        with source.training():
            v = cm.denoiser(2.0)(x, 700.0, cond)
            (v**2).mean().backward()
        assert all(float(p.grad.abs().sum()) > 0 for _, p in params) and len(params) == 24  # 3 blocks x q, k, v, out
        with torch.no_grad():
            alone = cm.denoiser(2.0)(x[1:], 700.0, FlowConditioning(rows[1:], None, [empty], None))
        assert torch.allclose(alone, v[1:].detach(), atol=1e-5)
        sd, _, _ = cm.lora_state_dict(torch.float32)
        cm.release()
        assert cm.base_model_version == "zimage" and all(k.startswith("diffusion_model.") for k in sd)
        key_map = comfy.lora.model_lora_keys_unet(model.model, {})
        with caplog.at_level(logging.WARNING):
            assert len(comfy.lora.load_lora(sd, key_map)) == len(sd) // 2 == 12
        assert "lora key not loaded" not in caplog.text
        fresh = source.load()
        fresh.load_lora(sd, 1.0)
        with torch.no_grad():
            v_file = fresh.denoiser(2.0)(x, 700.0, cond)
        fresh.release()
    assert torch.allclose(v_file, v.detach(), atol=1e-4, rtol=1e-4)


def test_comfyuis_training_switch_is_on_only_while_a_run_trains(comfy_inprocess, monkeypatch):
    """ComfyUI >= 0.33 reads comfy.model_management.in_training to skip fused kernels without a backward;
    the switch is set for the run and restored after it, also when the run fails."""
    import comfy.model_management as mm

    from comfy_nodes.comfy_source import comfy_training

    monkeypatch.setattr(mm, "in_training", False, raising=False)
    with comfy_training():
        assert mm.in_training is True
    assert mm.in_training is False
    with pytest.raises(KeyError), comfy_training():
        raise KeyError("failed run")
    assert mm.in_training is False
