"""Write a diffusers flow pipeline as ComfyUI's separate single files (test fixtures), and tiny pipelines to write.

ComfyUI's layout of a flow model: the transformer in the original (SAI / BFL / Tongyi) key layout
(``models/diffusion_models``), each text encoder in the HF transformers layout (``models/text_encoders``:
``clip_l``, ``clip_g``, ``t5xxl``, ``qwen_3_4b``) and the VAE in the LDM layout (``models/vae``, FLUX's
``ae.safetensors``: no prefix). This is our own implementation of the inverse key maps, written apart from the
loader's (``rlr_backend.models.flow_transformer_file``), so a test that loads these files checks one against the
other.

The tiny pipelines of :func:`build_resolvable_pipeline` follow the rules the loader resolves an architecture by
(64-wide SD3 heads without qk-norm, 128-wide FLUX.1 / Z-Image heads with their rope axes, a CLIP-G wider than
the CLIP-L, Qwen3's rope theta), unlike ``rlr_backend.models.tiny_flow_pipelines``' smaller ones.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from benchmarks.ldm_export import vae_to_ldm

def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A plain safetensors write (fixtures: no atomic rename or fsync, which cost seconds on a busy disk)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(path))


FAMILIES = ("sd3", "sd35", "flux_dev", "flux_schnell", "zimage")


def _swap(t: torch.Tensor) -> torch.Tensor:  # diffusers (scale, shift) <-> original (shift, scale)
    a, b = t.chunk(2)
    return torch.cat([b, a])


def _blocks(sd: dict, prefix: str) -> list[int]:
    return sorted({int(m.group(1)) for k in sd for m in [re.match(re.escape(prefix) + r"(\d+)\.", k)] if m})


def _linear(out: dict, sd: dict, new: str, old: str) -> None:
    for s in ("weight", "bias"):
        if f"{old}.{s}" in sd:
            out[f"{new}.{s}"] = sd.pop(f"{old}.{s}")


def _fused(out: dict, sd: dict, new: str, olds: list[str]) -> None:
    for s in ("weight", "bias"):
        if f"{olds[0]}.{s}" in sd:
            out[f"{new}.{s}"] = torch.cat([sd.pop(f"{o}.{s}") for o in olds])


def sd3_to_original(transformer) -> dict[str, torch.Tensor]:
    sd, out = dict(transformer.state_dict()), {}
    out["pos_embed"] = sd.pop("pos_embed.pos_embed")
    for new, old in (("x_embedder.proj", "pos_embed.proj"), ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
                     ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
                     ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
                     ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"), ("context_embedder", "context_embedder"),
                     ("final_layer.linear", "proj_out")):
        _linear(out, sd, new, old)
    for s in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{s}"] = _swap(sd.pop(f"norm_out.linear.{s}"))
    blocks = _blocks(sd, "transformer_blocks.")
    for i in blocks:
        d, x, c = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
        _fused(out, sd, x + "attn.qkv", [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"])
        _fused(out, sd, c + "attn.qkv", [d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"])
        _fused(out, sd, x + "attn2.qkv", [d + "attn2.to_q", d + "attn2.to_k", d + "attn2.to_v"])
        for new, old in (("attn.ln_q", "attn.norm_q"), ("attn.ln_k", "attn.norm_k"), ("attn2.ln_q", "attn2.norm_q"),
                         ("attn2.ln_k", "attn2.norm_k"), ("attn.proj", "attn.to_out.0"), ("attn2.proj", "attn2.to_out.0"),
                         ("adaLN_modulation.1", "norm1.linear"), ("mlp.fc1", "ff.net.0.proj"), ("mlp.fc2", "ff.net.2")):
            _linear(out, sd, x + new, d + old)
        for new, old in (("attn.ln_q", "attn.norm_added_q"), ("attn.ln_k", "attn.norm_added_k"),
                         ("attn.proj", "attn.to_add_out"), ("mlp.fc1", "ff_context.net.0.proj"),
                         ("mlp.fc2", "ff_context.net.2")):
            _linear(out, sd, c + new, d + old)
        last = i == blocks[-1]
        for s in ("weight", "bias"):  # the last block's context modulation is a final-layer style (shift, scale) one
            t = sd.pop(f"{d}norm1_context.linear.{s}")
            out[f"{c}adaLN_modulation.1.{s}"] = _swap(t) if last else t
    assert not sd, sorted(sd)[:5]
    return out


def flux_to_original(transformer) -> dict[str, torch.Tensor]:
    sd, out = dict(transformer.state_dict()), {}
    hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    for new, old in (("img_in", "x_embedder"), ("txt_in", "context_embedder"), ("final_layer.linear", "proj_out"),
                     ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
                     ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
                     ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
                     ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
                     ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
                     ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")):
        _linear(out, sd, new, old)
    for s in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{s}"] = _swap(sd.pop(f"norm_out.linear.{s}"))
    for i in _blocks(sd, "transformer_blocks."):
        d, o = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        _fused(out, sd, o + "img_attn.qkv", [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"])
        _fused(out, sd, o + "txt_attn.qkv", [d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"])
        for new, old in (("img_mod.lin", "norm1.linear"), ("txt_mod.lin", "norm1_context.linear"),
                         ("img_attn.proj", "attn.to_out.0"), ("txt_attn.proj", "attn.to_add_out"),
                         ("img_mlp.0", "ff.net.0.proj"), ("img_mlp.2", "ff.net.2"),
                         ("txt_mlp.0", "ff_context.net.0.proj"), ("txt_mlp.2", "ff_context.net.2")):
            _linear(out, sd, o + new, d + old)
        for new, old in (("img_attn.norm.query_norm", "attn.norm_q"), ("img_attn.norm.key_norm", "attn.norm_k"),
                         ("txt_attn.norm.query_norm", "attn.norm_added_q"), ("txt_attn.norm.key_norm", "attn.norm_added_k")):
            out[f"{o}{new}.scale"] = sd.pop(f"{d}{old}.weight")
    for i in _blocks(sd, "single_transformer_blocks."):
        d, o = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        _fused(out, sd, o + "linear1", [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v", d + "proj_mlp"])
        _linear(out, sd, o + "modulation.lin", d + "norm.linear")
        _linear(out, sd, o + "linear2", d + "proj_out")
        out[o + "norm.query_norm.scale"] = sd.pop(d + "attn.norm_q.weight")
        out[o + "norm.key_norm.scale"] = sd.pop(d + "attn.norm_k.weight")
    assert not sd and out["img_in.weight"].shape[0] == hidden, sorted(sd)[:5]
    return out


def zimage_to_original(transformer) -> dict[str, torch.Tensor]:
    sd, out = dict(transformer.state_dict()), {}
    for k in [k for k in sd if ".attention.to_q." in k]:
        base = k.split(".attention.to_q.")[0] + ".attention."
        _fused(out, sd, base + "qkv", [base + "to_q", base + "to_k", base + "to_v"])
    for k, t in sd.items():
        k = k.replace("all_x_embedder.2-1.", "x_embedder.").replace("all_final_layer.2-1.", "final_layer.")
        k = k.replace(".attention.to_out.0.", ".attention.out.").replace(".attention.norm_q.", ".attention.q_norm.")
        out[k.replace(".attention.norm_k.", ".attention.k_norm.")] = t
    return out


def clip_file(encoder) -> dict[str, torch.Tensor]:
    """A CLIP text encoder as ComfyUI's clip_l / clip_g files: ``text_model.*`` (+ ``text_projection.weight``)."""
    return {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): t
            for k, t in encoder.state_dict().items() if not k.endswith("position_ids")}


def save_comfy_files(pipe, folder: str | Path, name: str, prefix: str = "") -> dict[str, object]:
    """Write ``pipe`` as ComfyUI's files under ``folder`` (diffusion_models/, text_encoders/, vae/, and the T5 /
    Qwen3 tokenizer in tokenizer/); returns {"transformer": path, "text_encoders": [paths], "vae": path,
    "tokenizer": folder or None}. ``prefix`` goes in front of the transformer's keys (e.g. ``model.diffusion_model.``)."""
    folder = Path(folder)
    kind = type(pipe.transformer).__name__
    convert = {"SD3Transformer2DModel": sd3_to_original, "FluxTransformer2DModel": flux_to_original,
               "ZImageTransformer2DModel": zimage_to_original}[kind]
    files: dict[str, object] = {"transformer": folder / "diffusion_models" / f"{name}.safetensors", "text_encoders": []}
    save_tensors({prefix + k: t for k, t in convert(pipe.transformer).items()}, files["transformer"])
    tokenizer = None
    for attr in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        enc = getattr(pipe, attr, None)
        if enc is None:
            continue
        cls = type(enc).__name__
        if cls.startswith("CLIP"):
            fname, tensors = ("clip_g" if attr == "text_encoder_2" and cls.endswith("Projection") else "clip_l"), clip_file(enc)
        elif cls.startswith("T5"):
            fname, tensors = "t5xxl", {k: t for k, t in enc.state_dict().items() if k != "encoder.embed_tokens.weight"}
        else:  # Qwen3: ComfyUI's qwen_3_4b keeps the causal-LM names
            fname, tensors = "qwen_3_4b", {"model." + k: t for k, t in enc.state_dict().items()}
        if not cls.startswith("CLIP"):
            tokenizer = folder / "tokenizer"
            getattr(pipe, attr.replace("text_encoder", "tokenizer")).save_pretrained(str(tokenizer))
        path = folder / "text_encoders" / f"{fname}.safetensors"
        save_tensors({k: t.contiguous() for k, t in tensors.items()}, path)
        files["text_encoders"].append(path)
    files["vae"] = folder / "vae" / "ae.safetensors"
    save_tensors(vae_to_ldm(pipe.vae), files["vae"])
    files["tokenizer"] = tokenizer
    return files


def build_resolvable_pipeline(family: str, seed: int = 0, t5: bool = True):
    """A tiny random-init pipeline of ``family`` (``FAMILIES``) whose architecture the single-file loader resolves
    from its weights (see the module docstring); 32x32 images, VAE factor 2."""
    import diffusers
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, Qwen3Config, Qwen3Model, T5Config, T5EncoderModel

    from rlr_backend.models.flow_single_file import ZIMAGE_CHAT_TEMPLATE
    from rlr_backend.models.tiny_flux import WORDS, word_tokenizer
    from rlr_backend.models.tiny_pipelines import _text_config, _tokenizer, _vae

    torch.manual_seed(seed)
    sched = diffusers.FlowMatchEulerDiscreteScheduler

    def t5_encoder(width: int):
        return T5EncoderModel(T5Config(vocab_size=len(WORDS) + 3, d_model=width, d_kv=16, d_ff=2 * width, num_layers=2,
                                       num_heads=2, feed_forward_proj="gated-gelu", decoder_start_token_id=0,
                                       pad_token_id=0, eos_token_id=2))
    if family in ("sd3", "sd35"):
        extra = dict(dual_attention_layers=(0,), qk_norm="rms_norm") if family == "sd35" else {}
        tr = diffusers.SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                             attention_head_dim=32 if extra else 64, num_attention_heads=2 if extra else 1,
                                             joint_attention_dim=96, caption_projection_dim=64, pooled_projection_dim=96,
                                             pos_embed_max_size=16, **extra)
        pipe = diffusers.StableDiffusion3Pipeline(
            transformer=tr, scheduler=sched(shift=3.0), vae=_vae(1.5305, shift_factor=0.0609),
            text_encoder=CLIPTextModelWithProjection(_text_config(32, "quick_gelu", projection_dim=32)),
            tokenizer=_tokenizer(), tokenizer_2=_tokenizer("!"),
            text_encoder_2=CLIPTextModelWithProjection(_text_config(64, "gelu", projection_dim=64)),
            text_encoder_3=t5_encoder(96) if t5 else None, tokenizer_3=word_tokenizer(16) if t5 else None)
    elif family in ("flux_dev", "flux_schnell"):
        dev = family == "flux_dev"
        tr = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                              attention_head_dim=128, num_attention_heads=1, joint_attention_dim=32,
                                              pooled_projection_dim=32, axes_dims_rope=[16, 56, 56], guidance_embeds=dev)
        pipe = diffusers.FluxPipeline(
            transformer=tr, vae=_vae(0.3611, shift_factor=0.1159), text_encoder=CLIPTextModel(_text_config(32, "quick_gelu")),
            tokenizer=_tokenizer(), text_encoder_2=t5_encoder(32), tokenizer_2=word_tokenizer(16),
            scheduler=sched(shift=3.0 if dev else 1.0, use_dynamic_shifting=dev, base_shift=0.5, max_shift=1.15,
                            base_image_seq_len=256, max_image_seq_len=4096))
    elif family == "zimage":
        tr = diffusers.ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=128,
                                                n_layers=1, n_refiner_layers=1, n_heads=1, n_kv_heads=1, qk_norm=True,
                                                cap_feat_dim=16)
        with torch.no_grad():
            tr.x_pad_token.fill_(1.0)
            tr.cap_pad_token.fill_(1.0)
        qwen = Qwen3Model(Qwen3Config(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=2, head_dim=8, vocab_size=len(WORDS) + 3,
                                      max_position_embeddings=40960, tie_word_embeddings=True,
                                      rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}))
        tok = word_tokenizer(16)
        tok.chat_template = ZIMAGE_CHAT_TEMPLATE
        pipe = diffusers.ZImagePipeline(scheduler=sched(shift=3.0), vae=_vae(0.3611, shift_factor=0.1159),
                                        text_encoder=qwen, tokenizer=tok, transformer=tr)
    else:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")
    pipe.set_progress_bar_config(disable=True)
    return pipe
