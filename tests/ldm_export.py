"""Write a diffusers SD1.x/SD2.x/SDXL pipeline as one ComfyUI/A1111-layout ``.safetensors`` (test fixtures).

Adapted from huggingface/diffusers ``scripts/convert_diffusers_to_original_stable_diffusion.py`` and
``convert_diffusers_to_original_sdxl.py`` (Apache-2.0) with the following modifications: block and
layer counts are read from the model's config instead of being hard-coded for the full-size models;
SD2's text encoder gets the extra (unused) last OpenCLIP layer real SD2 checkpoints carry; an optional
``v_pred`` marker key as ComfyUI writes for v-prediction models.
"""

from __future__ import annotations

import re

import torch

from rlr_backend.safe_io import save_tensors


def _unet_map(cfg) -> list[tuple[str, str]]:
    lpb, n = cfg.layers_per_block, len(cfg.block_out_channels)
    attn_down = ["CrossAttn" in t for t in cfg.down_block_types]
    attn_up = ["CrossAttn" in t for t in cfg.up_block_types]
    out = []
    for i in range(n):
        for j in range(lpb):
            out.append((f"input_blocks.{(lpb + 1) * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if attn_down[i]:
                out.append((f"input_blocks.{(lpb + 1) * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(lpb + 1):
            out.append((f"output_blocks.{(lpb + 1) * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if attn_up[i]:
                out.append((f"output_blocks.{(lpb + 1) * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < n - 1:
            out.append((f"input_blocks.{(lpb + 1) * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
            out.append((f"output_blocks.{(lpb + 1) * i + lpb}.{2 if attn_up[i] else 1}.", f"up_blocks.{i}.upsamplers.0."))
    out += [("middle_block.1.", "mid_block.attentions.0."), ("middle_block.0.", "mid_block.resnets.0."),
            ("middle_block.2.", "mid_block.resnets.1.")]
    return out


_UNET_TOP = [("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
             ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out."),
             ("label_emb.0.0.", "add_embedding.linear_1."), ("label_emb.0.2.", "add_embedding.linear_2.")]
_RESNET = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"), ("out_layers.3", "conv2"),
           ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut")]


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    layer_map = _unet_map(unet.config)
    out = {}
    for k, v in unet.state_dict().items():
        name = k
        for sd, hf in _UNET_TOP:
            if name.startswith(hf):
                name = sd + name[len(hf):]
        if "resnets" in name:
            for sd, hf in _RESNET:
                name = name.replace(hf, sd)
        for sd, hf in layer_map:
            if name.startswith(hf):
                name = sd + name[len(hf):]
        out["model.diffusion_model." + name] = v
    return out


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    n = len(vae.config.block_out_channels)
    rules = [("nin_shortcut", "conv_shortcut"), ("norm_out", "conv_norm_out"), ("mid.attn_1.", "mid_block.attentions.0.")]
    for i in range(n):
        for j in range(vae.config.layers_per_block):
            rules.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."))
        for j in range(vae.config.layers_per_block + 1):
            rules.append((f"decoder.up.{n - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}."))
        rules.append((f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."))
        rules.append((f"up.{n - 1 - i}.upsample.", f"up_blocks.{i}.upsamplers.0."))
    for i in range(2):
        rules.append((f"mid.block_{i + 1}.", f"mid_block.resnets.{i}."))
    attn = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")]
    out = {}
    for k, v in vae.state_dict().items():
        name = k
        for sd, hf in rules:
            name = name.replace(hf, sd)
        if "mid.attn_1." in name:
            for sd, hf in attn:
                name = name.replace(hf, sd)
            if v.ndim == 2:
                v = v.reshape(*v.shape, 1, 1)
        out["first_stage_model." + name] = v
    return out


_TE = [("transformer.resblocks.", "text_model.encoder.layers."), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
       (".c_fc.", ".fc1."), (".c_proj.", ".fc2."), (".attn", ".self_attn"), ("ln_final.", "text_model.final_layer_norm."),
       ("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
       ("positional_embedding", "text_model.embeddings.position_embedding.weight")]
_TE_RE = re.compile("|".join(re.escape(hf) for _, hf in _TE))
_TE_SUB = {hf: sd for sd, hf in _TE}


def hf_text_keys(encoder) -> dict[str, torch.Tensor]:
    """The encoder's state dict with transformers' classic ``text_model.`` keys (transformers >= 5.6
    flattened CLIPTextModel), without the position_ids buffer."""
    return {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v
            for k, v in encoder.state_dict().items() if "position_ids" not in k}


def openclip_to_ldm(encoder, extra_layer: bool) -> dict[str, torch.Tensor]:
    sd = hf_text_keys(encoder)
    out, qkv = {}, {}
    for k, v in sd.items():
        m = re.match(r"(.*)\.self_attn\.([qkv])_proj\.(weight|bias)$", k)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = v
            continue
        if k == "text_projection.weight":
            out["text_projection"] = v.t().contiguous()
            continue
        if "position_ids" in k:
            continue
        out[_TE_RE.sub(lambda x: _TE_SUB[x.group(0)], k)] = v
    for (pre, kind), parts in qkv.items():
        name = _TE_RE.sub(lambda x: _TE_SUB[x.group(0)], pre)
        out[f"{name}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    out = {k.replace(".self_attn.out_proj.", ".attn.out_proj."): v for k, v in out.items()}
    if extra_layer:  # real SD2 checkpoints hold all 24 OpenCLIP layers; diffusers (and SD2) use 23
        n = encoder.config.num_hidden_layers
        for k in [k for k in out if k.startswith(f"transformer.resblocks.{n - 1}.")]:
            out[k.replace(f"resblocks.{n - 1}.", f"resblocks.{n}.")] = out[k].clone()
    return out


def pipeline_to_ldm(pipe, v_pred_marker: bool = False) -> dict[str, torch.Tensor]:
    sd = {**unet_to_ldm(pipe.unet), **vae_to_ldm(pipe.vae)}
    te = hf_text_keys(pipe.text_encoder)
    if hasattr(pipe, "text_encoder_2"):
        sd.update({"conditioner.embedders.0.transformer." + k: v for k, v in te.items()})
        sd.update({"conditioner.embedders.1.model." + k: v
                   for k, v in openclip_to_ldm(pipe.text_encoder_2, extra_layer=False).items()})
    elif pipe.text_encoder.config.hidden_act == "gelu":  # SD2.x: OpenCLIP
        sd.update({"cond_stage_model.model." + k: v for k, v in openclip_to_ldm(pipe.text_encoder, True).items()})
    else:
        sd.update({"cond_stage_model.transformer." + k: v for k, v in te.items()})
    if v_pred_marker:
        sd["v_pred"] = torch.tensor([])
    return sd


def save_ldm_checkpoint(pipe, path, v_pred_marker: bool = False):
    save_tensors({k: v.contiguous() for k, v in pipeline_to_ldm(pipe, v_pred_marker).items()}, path)
    return path
