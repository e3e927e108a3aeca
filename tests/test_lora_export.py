"""LoRA export: exported-then-reloaded equals the in-memory adapter; keys match the loaders' patterns."""

import re

import pytest
import torch

from rlr_backend.lora import add_lora, kohya_state_dict, load_lora, save_kohya
from rlr_backend.models.tiny import build_tiny_unet
from rlr_backend.safe_io import InvalidModelFile, load_tensors


def save_lora(unet, path, dtype=torch.float16):
    """The peft adapter of ``unet`` written as a kohya file (what a model's lora_state_dict + save_kohya do)."""
    sd, rank, alpha = kohya_state_dict(unet, dtype=dtype)
    return save_kohya(sd, path, rank, alpha)


def unet_with_trained_lora(alpha=8.0):
    unet = build_tiny_unet(sample_size=8, channels=4, block_out_channels=(16, 32), seed=0)
    params = add_lora(unet, rank=4, alpha=alpha)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)  # non-zero B: otherwise the round trip is vacuous
    return unet


def run(unet):
    g = torch.Generator().manual_seed(0)
    x, emb = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), encoder_hidden_states=emb).sample


def test_round_trip_equals_in_memory_adapter(tmp_path):
    unet = unet_with_trained_lora()
    want = run(unet)
    path = save_lora(unet, tmp_path / "a.safetensors", dtype=torch.float32)
    fresh = build_tiny_unet(sample_size=8, channels=4, block_out_channels=(16, 32), seed=0)
    base = run(fresh)
    load_lora(fresh, path)
    torch.testing.assert_close(run(fresh), want, rtol=1e-5, atol=1e-5)
    assert (want - base).abs().max() > 1e-3  # the adapter does something
    fresh.set_adapters(["default"], weights=[0.0])  # scale 0 gives the base model
    torch.testing.assert_close(run(fresh), base, rtol=1e-6, atol=1e-6)


def test_keys_alpha_and_metadata(tmp_path):
    unet = unet_with_trained_lora(alpha=8.0)
    tensors, meta = load_tensors(save_lora(unet, tmp_path / "b.safetensors"))
    pattern = re.compile(r"^lora_unet_(down_blocks|mid_block|up_blocks)_[a-z0-9_]+_(to_q|to_k|to_v|to_out_0)"
                         r"\.(lora_down\.weight|lora_up\.weight|alpha)$")
    assert tensors and all(pattern.match(k) for k in tensors), [k for k in tensors if not pattern.match(k)][:3]
    alphas = {float(v) for k, v in tensors.items() if k.endswith(".alpha")}
    assert alphas == {8.0}  # the training alpha, not the rank
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8"
    assert all(v.dtype == torch.float16 for v in tensors.values())


def test_diffusers_loads_the_export(tmp_path):
    """diffusers' own kohya loader reads the file and applies the same delta."""
    from diffusers import StableDiffusionPipeline

    unet = unet_with_trained_lora(alpha=8.0)
    want = run(unet)
    path = save_lora(unet, tmp_path / "c.safetensors", dtype=torch.float32)
    fresh = build_tiny_unet(sample_size=8, channels=4, block_out_channels=(16, 32), seed=0)
    sd, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
    StableDiffusionPipeline.load_lora_into_unet(sd, alphas, fresh)
    torch.testing.assert_close(run(fresh), want, rtol=1e-4, atol=1e-4)


def test_pickles_and_corrupt_files_are_refused(tmp_path):
    pt = tmp_path / "evil.pt"
    torch.save({"a": torch.zeros(1)}, pt)
    with pytest.raises(InvalidModelFile, match="safetensors"):
        load_tensors(pt)
    disguised = tmp_path / "evil.safetensors"
    disguised.write_bytes(pt.read_bytes())
    with pytest.raises(InvalidModelFile, match="pickle"):
        load_tensors(disguised)
    good = save_lora(unet_with_trained_lora(), tmp_path / "ok.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:100])
    with pytest.raises(InvalidModelFile):
        load_tensors(cut)
    with pytest.raises(ValueError, match=".safetensors"):
        save_lora(unet_with_trained_lora(), tmp_path / "x.ckpt")


def test_atomic_writes_leave_no_temp_files_and_usual_permissions(tmp_path):
    import os

    path = save_lora(unet_with_trained_lora(), tmp_path / "p.safetensors")
    mask = os.umask(0)
    os.umask(mask)
    assert (path.stat().st_mode & 0o777) == 0o666 & ~mask
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]
