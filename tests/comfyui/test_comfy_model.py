"""RLR through ComfyUI's own MODEL / CLIP / VAE objects (tiny SD1.x- and SDXL-layout models whose
weights are inference tensors, as Load Checkpoint makes them), in-process."""

import logging

import pytest
import torch

from rlr_backend.safe_io import load_tensors
from rlr_backend.train import PromptSpec, TrainConfig, Trainer

pytestmark = pytest.mark.comfyui


def model_output(patcher, x, sigma, ctx, y=None):
    import comfy.model_management as mm

    mm.load_models_gpu([patcher], force_full_load=True)
    extra = {} if y is None else {"y": y}
    with torch.no_grad():
        return patcher.model.apply_model(x, sigma, c_crossattn=ctx, **extra).clone()


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def trained(request, comfy_inprocess, tmp_path_factory):
    import tiny_comfy
    from comfy_nodes.comfy_source import ComfySource

    kind = request.param
    model, clip, vae = tiny_comfy.build(kind)
    g = torch.Generator().manual_seed(0)
    probe = (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3.0, 3.0]),
             torch.randn(2, 77, 32 if kind == "sd1" else 80, generator=g),
             None if kind == "sd1" else torch.randn(2, 1584, generator=g))
    before = model_output(model, *probe)
    cfg = TrainConfig(steps=2, batch_size=2, images_per_prompt=2, num_inference_steps=4, h=2, fo_steps=1, eval_every=0, eval_seeds=1,
                      ckpt_every=1, lr=5e-2, reward="brightness", prompts=(PromptSpec("a red circle"),),
                      output_dir=tmp_path_factory.mktemp(kind), run_name="run")
    with torch.inference_mode(False):
        cm = ComfySource(model, clip, vae, 64, 64).load()
        result = Trainer(cfg, model=cm, progress=False).run()
        x = torch.randn(2, 4, 8, 8, generator=g)
        cond = cm.conditioning(["a red circle", "a blue square"])
        with torch.no_grad():
            eps_trained = cm.denoiser(3.0)(x, 601, cond)
        sd32, rank, alpha = cm.lora_state_dict(torch.float32)
        cm.release()
    return dict(kind=kind, model=model, clip=clip, vae=vae, probe=probe, before=before, result=result, cm=cm,
                x=x, cond=cond, eps_trained=eps_trained, sd32=sd32, rank=rank, alpha=alpha)


def test_training_changes_the_lora_and_writes_kohya_keys(trained):
    sd, meta = load_tensors(trained["result"].lora_path)
    assert meta["ss_base_model_version"] == ("sd_v1" if trained["kind"] == "sd1" else "sdxl_base_v1-0")
    ups = [v for k, v in sd.items() if k.endswith("lora_up.weight")]
    blocks = [n for n, _ in trained["model"].model.diffusion_model.named_modules() if n.endswith("attn1.to_q")]
    assert len(ups) == 8 * len(blocks) > 0 and all(k.startswith("lora_unet_") for k in sd)  # q, k, v, out x 2
    assert sum(float(u.float().abs().sum()) > 0 for u in ups) == len(ups)  # every adapter received gradient
    assert all(torch.isfinite(v.float()).all() for v in sd.values())


def test_comfyui_loads_every_key_of_the_export(trained, caplog):
    import comfy.lora

    sd, _ = load_tensors(trained["result"].lora_path)
    key_map = comfy.lora.model_lora_keys_unet(trained["model"].model, {})
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(sd, key_map)
    assert len(patches) == len(sd) // 3 > 0
    assert "lora key not loaded" not in caplog.text


def test_export_reproduces_the_trained_model_in_comfyui(trained):
    """The same eps from the training wrappers and from ComfyUI applying the exported file (fp32)."""
    from comfy_nodes.comfy_source import ComfySource

    with torch.inference_mode(False):
        fresh = ComfySource(trained["model"], trained["clip"], trained["vae"], 64, 64).load()
        fresh.load_lora(trained["sd32"], 1.0)
        with torch.no_grad():
            eps = fresh.denoiser(3.0)(trained["x"], 601, trained["cond"])
        fresh.release()
    assert torch.allclose(eps, trained["eps_trained"], atol=1e-4, rtol=1e-4), float((eps - trained["eps_trained"]).abs().max())
    with torch.inference_mode(False):  # and the LoRA matters: without it the output differs
        base = ComfySource(trained["model"], trained["clip"], trained["vae"], 64, 64).load()
        with torch.no_grad():
            eps0 = base.denoiser(3.0)(trained["x"], 601, trained["cond"])
        base.release()
    assert (eps0 - eps).abs().max() > 1e-3


def test_the_users_model_is_unchanged(trained):
    after = model_output(trained["model"], *trained["probe"])
    assert torch.equal(after, trained["before"])
    import comfy.model_management as mm

    assert all(lm.model is not trained["cm"].mp for lm in mm.current_loaded_models)


def test_wrong_base_model_and_wrong_sockets_are_refused(trained, comfy_inprocess):
    import tiny_comfy
    from comfy_nodes.comfy_source import ComfySource

    other = "sdxl" if trained["kind"] == "sd1" else "sd1"
    model, clip, vae = tiny_comfy.build(other)
    with torch.inference_mode(False):
        m = ComfySource(model, clip, vae, 64, 64).load()
        with pytest.raises(ValueError, match="another base model"):
            m.load_lora(trained["sd32"], 1.0)
        m.release()
    with pytest.raises(ValueError, match="not a ComfyUI MODEL"):
        ComfySource(clip, model, vae)
    with pytest.raises(ValueError, match="multiples of 8"):
        ComfySource(model, clip, vae, 100, 64)
