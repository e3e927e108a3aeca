"""Flow models from ComfyUI's separate single files (transformer + text encoders + VAE + tokenizer folder), offline.

Tiny random-weight pipelines whose architecture the loader resolves (``benchmarks.flow_export``) are written both
as diffusers folders and as ComfyUI's files (original transformer keys, HF-layout encoders, LDM-layout VAE); the
files must load into the same model as the folder: same conditioning, velocity, decoded image and schedule.
"""

from __future__ import annotations

import re

import pytest
import torch

from benchmarks.flow_export import build_resolvable_pipeline, save_comfy_files
from rlr_backend.models.loader import load_model
from rlr_backend.safe_io import InvalidModelFile, load_tensors, save_tensors

FAMILY_NAMES = {"sd3": "SD3 medium", "sd35": "SD3.5 medium", "flux_dev": "FLUX.1-dev",
                "flux_schnell": "FLUX.1-schnell", "zimage": "Z-Image"}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """family -> (diffusers folder, ComfyUI files); SD3 without T5 (optional), SD3.5 with it and its transformer
    keys under ``model.diffusion_model.``."""
    out = {}
    for fam in FAMILY_NAMES:
        root = tmp_path_factory.mktemp(fam)
        pipe = build_resolvable_pipeline(fam, seed=1, t5=fam != "sd3")
        pipe.save_pretrained(str(root / "diffusers"), safe_serialization=True)
        out[fam] = (root / "diffusers", save_comfy_files(pipe, root / "comfy", fam,
                                                         prefix="model.diffusion_model." if fam == "sd35" else ""))
    return out


def _load_files(files, **kw):
    return load_model(files["transformer"], text_encoders=tuple(reversed(files["text_encoders"])), vae=files["vae"],
                      tokenizer=files["tokenizer"], image_size=32, **kw)


@pytest.mark.parametrize("fam", list(FAMILY_NAMES))
def test_comfy_files_load_as_the_diffusers_folder(made, fam, caplog):
    """The architecture is resolved from the files alone (name logged: dev vs schnell, SD3 vs SD3.5 medium with its
    dual attention), encoders in any order, and the model equals the diffusers folder's: conditioning, velocity
    (atol 1e-5), VAE decode and sampling schedule."""
    folder, files = made[fam]
    with caplog.at_level("INFO", logger="rlr_backend.models.flow_single_file"):
        a = _load_files(files)
    assert f"loaded {FAMILY_NAMES[fam]} from" in caplog.text
    b = load_model(folder, image_size=32)
    assert type(a) is type(b) and a.latent_shape == b.latent_shape
    ca, cb = a.conditioning(["a red circle"]), b.conditioning(["a red circle"])
    for x, y in [(ca.embeds, cb.embeds), (ca.pooled, cb.pooled), (ca.uncond, cb.uncond)]:
        if y is None:
            assert x is None
            continue
        for u, v in zip(x if isinstance(x, list) else [x], y if isinstance(y, list) else [y]):
            torch.testing.assert_close(u, v, atol=1e-6, rtol=0)
    x = torch.randn(1, *b.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        va, vb = a.denoiser(3.5)(x, 700.0, ca), b.denoiser(3.5)(x, 700.0, cb)
        torch.testing.assert_close(va, vb, atol=1e-5, rtol=0)
        assert va.abs().max() > 1e-3  # a real velocity, not zeros
        torch.testing.assert_close(a.decode(x), b.decode(x), atol=1e-5, rtol=0)
    assert a.schedule(4, 0.7).sigmas.tolist() == b.schedule(4, 0.7).sigmas.tolist()


def _train(tmp_path, capsys, *args) -> str:
    from rlr_backend.cli import train_main

    out = tmp_path / "runs"
    rc = train_main([*args, "--steps", "1", "--output-dir", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and not out.exists(), (rc, err)
    return err


def test_bad_flow_files_are_one_line_exit_2_nothing_written(made, tmp_path, capsys):
    """A transformer that cannot be resolved, a missing text encoder, VAE or tokenizer, a VAE of other latent
    channels, encoders without a transformer file: one line each from rlr-train, exit 2, no run folder."""
    from benchmarks.ldm_export import vae_to_ldm
    from rlr_backend.models.tiny_pipelines import _vae

    _, flux = made["flux_dev"]
    clip, t5 = flux["text_encoders"]
    parts = ["--text-encoder", str(clip), "--text-encoder", str(t5), "--vae", str(flux["vae"])]
    tensors, _ = load_tensors(flux["transformer"])
    del tensors["txt_in.weight"]
    broken = tmp_path / "broken.safetensors"
    save_tensors(tensors, broken)
    assert re.search(r"FLUX.1 transformer lacks .*txt_in.weight", _train(tmp_path, capsys, "--model", str(broken), *parts))
    tensors, _ = load_tensors(flux["transformer"])
    narrow = {k: (t[:64] if k.endswith("norm.query_norm.scale") else t) for k, t in tensors.items()}
    save_tensors(narrow, broken)
    err = _train(tmp_path, capsys, "--model", str(broken), "--tokenizer", str(flux["tokenizer"]), *parts)
    assert "64-wide attention heads" in err or "do not match" in err
    unknown = tmp_path / "unknown.safetensors"
    save_tensors({"blocks.0.weight": torch.zeros(2, 2)}, unknown)
    assert "only apply to a flow transformer file" in _train(tmp_path, capsys, "--model", str(unknown), *parts)
    model = ["--model", str(flux["transformer"])]
    err = _train(tmp_path, capsys, *model, "--text-encoder", str(clip), "--vae", str(flux["vae"]))
    assert "FLUX.1-dev takes one CLIP + one T5 (t5xxl)" in err and "given: clip_l.safetensors" in err
    assert "needs its VAE file (--vae" in _train(tmp_path, capsys, *model, *parts[:4])
    assert "needs its tokenizer: --tokenizer DIR" in _train(tmp_path, capsys, *model, *parts)
    wide = tmp_path / "vae8.safetensors"
    save_tensors(vae_to_ldm(_vae(0.3611, latent_channels=8, shift_factor=0.1159)), wide)
    err = _train(tmp_path, capsys, *model, *parts[:4], "--vae", str(wide), "--tokenizer", str(flux["tokenizer"]))
    assert "the VAE has 8 latent channels, the transformer takes 4" in err
    assert "go with a flow transformer file" in _train(tmp_path, capsys, "--vae", str(flux["vae"]))
    err = _train(tmp_path, capsys, *model, "--text-encoder", str(tmp_path / "absent.safetensors"))
    assert "absent.safetensors does not exist" in err
    sd3_folder, sd3 = made["sd3"]
    err = _train(tmp_path, capsys, "--model", str(sd3["transformer"]), "--text-encoder", str(sd3["text_encoders"][0]),
                 "--text-encoder", str(t5), "--vae", str(sd3["vae"]))
    assert "SD3 medium takes 2 CLIP + one T5 (t5xxl) (optional)" in err
    with pytest.raises(InvalidModelFile, match="scaled/quantised file"):
        tensors, _ = load_tensors(t5)
        scaled = tmp_path / "t5_scaled.safetensors"
        save_tensors({**tensors, "scaled_fp8": torch.zeros(1)}, scaled)
        load_model(flux["transformer"], text_encoders=(clip, scaled), vae=flux["vae"], tokenizer=flux["tokenizer"])


def test_a_flow_transformer_file_is_a_flow_model_for_the_cli(made, tmp_path, capsys):
    """rlr-train tells a flow transformer file by its keys before loading: DDIM options are refused (one line)."""
    from rlr_backend.model_paths import is_flow_model

    _, flux = made["flux_schnell"]
    assert is_flow_model(str(flux["transformer"])) and not is_flow_model(str(flux["vae"]))
    err = _train(tmp_path, capsys, "--model", str(flux["transformer"]), "--eta", "0.5")
    assert "eta is a DDIM option" in err
