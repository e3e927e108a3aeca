"""Tiny random-weight ComfyUI models (SD1.x- and SDXL-layout UNets, CLIP, VAE) built at test time.

Imported only inside the real-ComfyUI tier (ComfyUI's folder on sys.path). The weights are created
under ``torch.inference_mode()``, as ComfyUI's checkpoint loader makes them, so tests meet the
inference-tensor trap for real.
"""

from __future__ import annotations

import inspect
import math

import torch

UNET_SD1 = {"model_channels": 32, "in_channels": 4, "out_channels": 4, "num_res_blocks": [1, 1],
            "channel_mult": [1, 2], "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
            "transformer_depth_middle": 1, "context_dim": 32, "use_linear_in_transformer": False,
            "adm_in_channels": None, "use_temporal_attention": False, "use_temporal_resblock": False,
            "num_heads": 4, "num_head_channels": -1, "image_size": 32, "use_spatial_transformer": True,
            "legacy": False, "use_checkpoint": False}
CLIP_TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
             "projection_dim": 32}
CLIP_G_TINY = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 2,
               "projection_dim": 48}
# SDXL: context = clip_l 32 + clip_g 48; y = pooled clip_g 48 + 6 x 256 size embeddings
UNET_SDXL = {**UNET_SD1, "model_channels": 64, "context_dim": 80, "adm_in_channels": 48 + 6 * 256, "num_classes": "sequential",
             "use_linear_in_transformer": True, "num_head_channels": 64, "num_heads": -1}  # SDXL: 64 per head
VAE_TINY = {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
            "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}


def random_state(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Small random weights (1/sqrt(fan_in)), unit norm scales, zero biases: finite, non-trivial outputs."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    params = {n for n, _ in module.named_parameters()}
    for name, t in module.state_dict().items():
        if name not in params or t.dtype not in (torch.float32, torch.float16, torch.bfloat16):  # buffers as built
            out[name] = t.clone()
        elif t.dim() >= 2 and t.numel() > 0:
            out[name] = torch.randn(t.shape, generator=g) / math.sqrt(t[0].numel())
        elif name.endswith("bias"):
            out[name] = torch.randn(t.shape, generator=g) * 0.01
        else:
            out[name] = torch.ones(t.shape)
    return out


def build(kind: str = "sd1", seed: int = 0):
    """(MODEL patcher, CLIP, VAE) of the given kind ('sd1' or 'sdxl'), as Load Checkpoint returns them."""
    import comfy.model_patcher
    import comfy.sd
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.supported_models as sm
    import comfy.supported_models_base as smb
    from comfy.ldm.models.autoencoder import AutoencoderKL

    with torch.inference_mode():
        if kind == "sd1":
            config = sm.SD15(dict(UNET_SD1))
            target = smb.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
            options = {"clip_l_model_config": dict(CLIP_TINY)}
        elif kind == "sdxl":
            config = sm.SDXL(dict(UNET_SDXL))
            target = smb.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
            options = {"clip_l_model_config": dict(CLIP_TINY), "clip_g_model_config": dict(CLIP_G_TINY)}
        else:
            raise ValueError(kind)
        config.set_inference_dtype(torch.float32, None)
        base = config.get_model({})
        base.load_state_dict(random_state(base, seed), strict=False)
        model = comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cpu"),
                                                 offload_device=torch.device("cpu"))
        clip = comfy.sd.CLIP(target, model_options={**options, "dtype": torch.float32})
        clip.cond_stage_model.load_state_dict(random_state(clip.cond_stage_model, seed + 1), strict=False)
        params = {"ddconfig": dict(VAE_TINY), "embed_dim": 4}
        vae_sd = random_state(AutoencoderKL(**params), seed + 2)
        vae = comfy.sd.VAE(sd=vae_sd, config={"params": params}, dtype=torch.float32)
    return model, clip, vae


def save_sd15_shaped_checkpoint(path, seed: int = 0) -> int:
    """A random-weight checkpoint that ComfyUI's Load Checkpoint detects as SD1.5 (model_channels 320,
    context 768, SD1 CLIP and VAE at full size; two UNet levels instead of four to stay small).
    Returns the number of UNet parameters."""
    import comfy.model_patcher
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models as sm
    import comfy.supported_models_base as smb
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from safetensors.torch import save_file

    unet = {**UNET_SD1, "model_channels": 320, "context_dim": 768, "num_heads": 8}
    config = sm.SD15(unet)
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({})
    base.load_state_dict(random_state(base, seed), strict=False)
    clip = comfy.sd.CLIP(smb.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel),
                         model_options={"dtype": torch.float32})
    clip.cond_stage_model.load_state_dict(random_state(clip.cond_stage_model, seed + 1), strict=False)
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    vae_model = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    vae_sd = random_state(vae_model, seed + 2)
    # keyword arguments: ComfyUI >= 0.4 added unet_state_dict as the first parameter (the UNet's own keys)
    kw = dict(clip_state_dict=clip.get_sd(), vae_state_dict=vae_sd)
    if "unet_state_dict" in inspect.signature(base.state_dict_for_saving).parameters:
        kw["unet_state_dict"] = base.diffusion_model.state_dict()
    sd = base.state_dict_for_saving(**kw)
    if not any(k.startswith("model.diffusion_model.") for k in sd):
        raise RuntimeError("state_dict_for_saving returned no UNet weights; ComfyUI's signature changed again")
    save_file({k: v.to(torch.float16).contiguous() for k, v in sd.items()}, str(path))
    return sum(p.numel() for p in base.diffusion_model.parameters())


# -- flow-matching models -------------------------------------------------------------------------------
# SD3 (the SD3.5-medium layout: block 0 has the second self-attention): ComfyUI's detection reads depth from
# the hidden size (64 per block); context = CLIP-L 32 padded to 4096 (no CLIP-G / T5 in the file), y = pooled
# CLIP-L 32 + CLIP-G zeros 1280
MMDIT_TINY = {"in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 2, "input_size": None,
              "adm_in_channels": 32 + 1280, "num_patches": 64, "pos_embed_max_size": 8,
              "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
              "pos_embed_scaling_factor": None, "x_block_self_attn_layers": [0]}
# FLUX.1-dev layout (guidance embedding), one double and one single block; y = pooled CLIP-L, context = T5
FLUX_TINY = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "vec_in_dim": 32,
             "context_in_dim": 32, "hidden_size": 128, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1,
             "depth_single_blocks": 1, "axes_dim": [16, 24, 24], "theta": 10000, "qkv_bias": True, "guidance_embed": True}
T5_TINY = {"d_ff": 64, "d_kv": 16, "d_model": 32, "num_heads": 2, "num_layers": 1}
VAE16_TINY = {**VAE_TINY, "z_channels": 16}
SD3_TE_OPTIONS = {"clip_l_model_config": dict(CLIP_TINY)}


def tiny_vae(z_channels: int = 4, seed: int = 2):
    """A tiny ComfyUI VAE (weights made under inference mode, as the loader makes them)."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    with torch.inference_mode():
        params = {"ddconfig": {**VAE_TINY, "z_channels": z_channels}, "embed_dim": z_channels}
        return comfy.sd.VAE(sd=random_state(AutoencoderKL(**params), seed), config={"params": params}, dtype=torch.float32)


def save_sd3_checkpoint(path, seed: int = 0) -> None:
    """A random-weight SD3-layout checkpoint in ComfyUI's single-file layout (``model.diffusion_model.*`` and
    ``text_encoders.clip_l.*``; no VAE: ComfyUI's detection gives any VAE in a checkpoint the full SD size).
    Load it with ``load_sd3_checkpoint``."""
    import comfy.sd
    import comfy.supported_models as sm
    import comfy.supported_models_base as smb
    import comfy.text_encoders.sd3_clip as sd3_clip
    from safetensors.torch import save_file

    config = sm.SD3(dict(MMDIT_TINY))
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({})
    state = random_state(base, seed)
    state["diffusion_model.pos_embed"] = torch.randn(state["diffusion_model.pos_embed"].shape,
                                                     generator=torch.Generator().manual_seed(seed)) * 0.02  # torch.empty
    base.load_state_dict(state, strict=False)
    clip = comfy.sd.CLIP(smb.ClipTarget(sd3_clip.SD3Tokenizer, sd3_clip.sd3_clip(clip_l=True, clip_g=False, t5=False)),
                         model_options={**SD3_TE_OPTIONS, "dtype": torch.float32})
    clip.cond_stage_model.load_state_dict(random_state(clip.cond_stage_model, seed + 1), strict=False)
    kw = dict(clip_state_dict=clip.get_sd())
    if "unet_state_dict" in inspect.signature(base.state_dict_for_saving).parameters:
        kw["unet_state_dict"] = base.diffusion_model.state_dict()
    sd = base.state_dict_for_saving(**kw)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))


def load_sd3_checkpoint(path):
    """(MODEL, CLIP, VAE) of ``save_sd3_checkpoint``'s file through ComfyUI's checkpoint loader (the tiny
    CLIP-L's size as text-encoder options), with a tiny 16-channel VAE."""
    import comfy.sd

    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False,
                                                              te_model_options=dict(SD3_TE_OPTIONS))
    return model, clip, tiny_vae(16)


def build_flux(seed: int = 0):
    """(MODEL, CLIP, VAE) of a tiny FLUX.1-dev-layout model, built in-process under inference mode (ComfyUI's
    detection fixes FLUX's hidden size at 3072, so no tiny file of it loads through the loader)."""
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models as sm
    import comfy.supported_models_base as smb
    import comfy.text_encoders.flux as flux_te

    import dataclasses

    from comfy.ldm.flux.model import FluxParams

    extra = {"txt_ids_dims": []} if "txt_ids_dims" in {f.name for f in dataclasses.fields(FluxParams)} else {}
    with torch.inference_mode():  # newer ComfyUIs (0.33) require txt_ids_dims; FLUX.1's detected value is []
        config = sm.Flux({**FLUX_TINY, **extra})
        config.set_inference_dtype(torch.float32, None)
        base = config.get_model({})
        base.load_state_dict(random_state(base, seed), strict=False)
        model = comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
        clip = comfy.sd.CLIP(smb.ClipTarget(flux_te.FluxTokenizer, flux_te.flux_clip()),
                             model_options={"clip_l_model_config": dict(CLIP_TINY), "t5xxl_model_config": dict(T5_TINY),
                                            "dtype": torch.float32})
        clip.cond_stage_model.load_state_dict(random_state(clip.cond_stage_model, seed + 1), strict=False)
    return model, clip, tiny_vae(16)


# Z-Image layout (ComfyUI's Lumina2 with Z-Image's modulation, which needs dim >= 256); caption features 32 wide
ZIMAGE_TINY = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 256, "cap_feat_dim": 32,
               "n_layers": 1, "n_refiner_layers": 1, "qk_norm": True, "n_heads": 8, "n_kv_heads": 8,
               "axes_dims": [8, 12, 12], "axes_lens": [64, 32, 32], "rope_theta": 256.0,
               "ffn_dim_multiplier": 8.0 / 3.0, "z_image_modulation": True, "time_scale": 1000.0}


def build_zimage(seed: int = 0):
    """MODEL of a tiny Z-Image, built in-process under inference mode (no text encoder: ComfyUI's Qwen3-4B
    has no tiny configuration)."""
    import comfy.model_patcher
    import comfy.supported_models as sm

    with torch.inference_mode():
        config = sm.ZImage(dict(ZIMAGE_TINY))
        config.set_inference_dtype(torch.float32, None)
        base = config.get_model({})
        base.load_state_dict(random_state(base, seed), strict=False)
        return comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
