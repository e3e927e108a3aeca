"""Flow models from ComfyUI's separate single files (transformer + text encoders + VAE + tokenizer folder), offline.

Tiny random-weight pipelines whose architecture the loader resolves (``benchmarks.flow_export``) are written as
ComfyUI's files (original transformer keys, HF-layout encoders, LDM-layout VAE); the files must load into the
model the pipeline is (what its diffusers folder loads as: tests/test_flow_models.py): same conditioning,
velocity, decoded image and schedule. The pipelines are compared in memory (saving and loading five diffusers
folders would add seconds to the suite for no other check).
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
    """family -> (pipeline in eval mode, ComfyUI files); SD3 without T5 (optional), SD3.5 with it and its
    transformer keys under ``model.diffusion_model.``."""
    out = {}
    for fam in FAMILY_NAMES:
        root = tmp_path_factory.mktemp(fam)
        pipe = build_resolvable_pipeline(fam, seed=1, t5=fam != "sd3")
        for comp in pipe.components.values():
            if isinstance(comp, torch.nn.Module):
                comp.eval()  # as from_pretrained leaves them (T5's dropout off)
        pipe.rlr_image_size = 32
        out[fam] = (pipe, save_comfy_files(pipe, root, fam, prefix="model.diffusion_model." if fam == "sd35" else ""))
    return out


def _load_files(files, **kw):
    return load_model(files["transformer"], text_encoders=tuple(reversed(files["text_encoders"])), vae=files["vae"],
                      tokenizer=files["tokenizer"], image_size=32, **kw)


@pytest.mark.parametrize("fam", list(FAMILY_NAMES))
def test_comfy_files_load_as_the_diffusers_model(made, fam, caplog):
    """The architecture is resolved from the files alone (name logged: dev vs schnell, SD3 vs SD3.5 medium with its
    dual attention), encoders in any order, and the model equals the diffusers pipeline's: conditioning, velocity
    (atol 1e-5), VAE decode and sampling schedule."""
    from rlr_backend.models.loader import model_for_pipeline

    pipe, files = made[fam]
    with caplog.at_level("INFO", logger="rlr_backend.models.flow_single_file"):
        a = _load_files(files)
    assert f"loaded {FAMILY_NAMES[fam]} from" in caplog.text
    b = model_for_pipeline(pipe)
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
    _, sd3 = made["sd3"]
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
    from rlr_backend.models.flow_detect import is_flow_model

    _, flux = made["flux_schnell"]
    assert is_flow_model(str(flux["transformer"])) and not is_flow_model(str(flux["vae"]))
    err = _train(tmp_path, capsys, "--model", str(flux["transformer"]), "--eta", "0.5")
    assert "eta is a DDIM option" in err
    from rlr_backend.models.kind_defaults import model_kind  # the kind's training defaults apply to files too

    kinds = {fam: model_kind(str(files["transformer"])) for fam, (_, files) in made.items()}
    assert kinds == {"sd3": "sd3", "sd35": "sd3", "flux_dev": "flux-dev", "flux_schnell": "flux-schnell",
                     "zimage": "zimage"}
    assert model_kind(str(flux["vae"])) == "sd"


OFFICIAL = {  # the released models' diffusers configs (their model repositories' transformer/config.json)
    "SD3 medium": ("SD3Transformer2DModel", dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24,
                   attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)),
    "SD3.5 large": ("SD3Transformer2DModel", dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38,
                    attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                    pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm")),
    "SD3.5 medium": ("SD3Transformer2DModel", dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24,
                     attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                     caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                     qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))),
    "FLUX.1-dev": ("FluxTransformer2DModel", dict(guidance_embeds=True)),
    "FLUX.1-schnell": ("FluxTransformer2DModel", dict(guidance_embeds=False)),
    "Z-Image": ("ZImageTransformer2DModel", {}),
}


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_released_architectures_resolve_to_their_configs(name):
    """At the released models' sizes (on the meta device: shapes only), the original-layout keys resolve to the
    official configs: depth, widths, heads, qk-norm, SD3.5 medium's 13 dual-attention layers, dev vs schnell."""
    import diffusers

    from benchmarks.flow_export import flux_to_original, sd3_to_original, zimage_to_original
    from rlr_backend.models.flow_transformer_file import resolve_transformer

    cls_name, kw = OFFICIAL[name]
    with torch.device("meta"):
        model = getattr(diffusers, cls_name)(**kw)
    to_original = {"SD3Transformer2DModel": sd3_to_original, "FluxTransformer2DModel": flux_to_original,
                   "ZImageTransformer2DModel": zimage_to_original}[cls_name]
    spec = resolve_transformer(to_original(model), name)
    assert spec.name == name and spec.class_name == cls_name
    same = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    want = {k: same(v) for k, v in dict(model.config).items() if not k.startswith("_")}
    got = {k: same(v) for k, v in spec.config.items()}
    assert set(got) <= set(want) and {k: want[k] for k in got} == got


def test_released_text_encoder_sizes_resolve():
    """CLIP-L / CLIP-G / T5-XXL / Qwen3-4B files at their real sizes (meta) resolve to the released configs, and
    two CLIPs get their roles by width whatever their order."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, Qwen3Config, Qwen3Model, T5Config, T5EncoderModel

    from benchmarks.flow_export import clip_file
    from rlr_backend.models.flow_component_files import mark_clip_roles, read_text_encoder

    with torch.device("meta"):
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                            num_attention_heads=20, projection_dim=1280))
        clip_l = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                            num_attention_heads=12, projection_dim=768))
        t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                     feed_forward_proj="gated-gelu"))
        qwen = Qwen3Model(Qwen3Config(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                                      num_attention_heads=32, num_key_value_heads=8, head_dim=128))
    g, l = (read_text_encoder(clip_file(m), m.__class__.__name__) for m in (clip_g, clip_l))
    mark_clip_roles([g, l])
    assert (g.role, g.config.hidden_act, g.config.num_hidden_layers, g.config.num_attention_heads) == ("CLIP-G", "gelu", 32, 20)
    assert (l.role, l.config.hidden_act, l.config.max_position_embeddings, l.config.projection_dim) == ("CLIP-L", "quick_gelu", 77, 768)
    c = read_text_encoder(dict(t5.state_dict()), "t5xxl").config
    assert (c.d_model, c.num_heads, c.d_kv, c.d_ff, c.num_layers, c.is_gated_act) == (4096, 64, 64, 10240, 24, True)
    q = read_text_encoder({"model." + k: v for k, v in qwen.state_dict().items()}, "qwen_3_4b").config
    assert (q.hidden_size, q.num_attention_heads, q.num_key_value_heads, q.head_dim, q.num_hidden_layers,
            q.intermediate_size) == (2560, 32, 8, 128, 36, 9728)


def test_an_sd3_file_with_its_vae_inside_needs_no_vae_file(made, tmp_path):
    """SD3 / SD3.5 checkpoints may carry the VAE (``first_stage_model.*``) beside the transformer: it is used when
    no --vae is given, and decodes as the pipeline's VAE."""
    from rlr_backend.models.loader import model_for_pipeline

    pipe, files = made["sd35"]
    tensors, _ = load_tensors(files["transformer"])
    vae, _ = load_tensors(files["vae"])
    both = tmp_path / "sd35_with_vae.safetensors"
    save_tensors({**tensors, **{"first_stage_model." + k: t for k, t in vae.items()}}, both)
    m = load_model(both, text_encoders=tuple(files["text_encoders"][:2]), image_size=32)
    x = torch.randn(1, *m.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(m.decode(x), model_for_pipeline(pipe).decode(x), atol=1e-5, rtol=0)
    assert m.pipe.text_encoder_3 is None  # T5 left out: optional for SD3
