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
