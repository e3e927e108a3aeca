"""Write a diffusers SD1.x / SD2.x / SDXL pipeline as one LDM-layout ``.safetensors`` file (test fixtures).

The LDM ("original Stable Diffusion") single-file layout that ComfyUI and A1111 read:

* UNet under ``model.diffusion_model.`` (``input_blocks`` / ``middle_block`` / ``output_blocks``),
* VAE under ``first_stage_model.`` (``encoder.down`` / ``decoder.up`` / ``mid``),
* text encoders: SD1.x ``cond_stage_model.transformer.`` (OpenAI CLIP, HF layout); SD2.x
  ``cond_stage_model.model.`` (OpenCLIP layout); SDXL ``conditioner.embedders.0.transformer.`` (CLIP-L,
  HF layout) and ``conditioner.embedders.1.model.`` (OpenCLIP bigG layout),
* optionally ComfyUI's empty ``v_pred`` marker for v-prediction models.

This is our own implementation of those key layouts. Each component is renamed through a table of
module-prefix rules (diffusers prefix -> LDM prefix, plus renames inside the module) that is built from
the model's config, so the tiny test models convert exactly as full-size ones would. A key that no rule
covers raises instead of being dropped silently.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlr_backend.safe_io import save_tensors

# diffusers module prefix -> (LDM module prefix, renames of the first name(s) inside that module)
Rules = dict[str, tuple[str, dict[str, str]]]
KEEP: dict[str, str] = {}


def _rename(state: dict[str, torch.Tensor], rules: Rules) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in state.items():
        prefix = max((p for p in rules if key.startswith(p)), key=len, default=None)
        if prefix is None:
            raise KeyError(f"no LDM name for {key!r}")
        new_prefix, inner = rules[prefix]
        rest = key[len(prefix):]
        for old, new in inner.items():
            if rest.startswith(old + "."):
                rest = new + rest[len(old):]
                break
        out[new_prefix + rest] = tensor
    return out


# ---------------------------------------------------------------- UNet

UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_FIXED: Rules = {
    "conv_in.": ("input_blocks.0.0.", KEEP),
    "time_embedding.linear_1.": ("time_embed.0.", KEEP),
    "time_embedding.linear_2.": ("time_embed.2.", KEEP),
    "add_embedding.linear_1.": ("label_emb.0.0.", KEEP),  # SDXL size/crop conditioning
    "add_embedding.linear_2.": ("label_emb.0.2.", KEEP),
    "mid_block.resnets.0.": ("middle_block.0.", UNET_RESNET),
    "mid_block.attentions.0.": ("middle_block.1.", KEEP),
    "mid_block.resnets.1.": ("middle_block.2.", UNET_RESNET),
    "conv_norm_out.": ("out.0.", KEEP),
    "conv_out.": ("out.2.", KEEP),
}


def unet_rules(cfg) -> Rules:
    """Rules for a UNet2DConditionModel config.

    LDM numbers the UNet's layers consecutively: ``input_blocks.0`` is conv_in, then each down block
    contributes one input block per layer (resnet ``.0``, attention ``.1``) and, except the last, one
    for its downsampler. Up blocks have one layer more each (they also take the skip from the
    downsampler / conv_in); a block's upsampler joins its last output block, after the attention if any.
    """
    rules = dict(UNET_FIXED)
    n = len(cfg.block_out_channels)
    per_block = cfg.layers_per_block
    layers = list(per_block) if isinstance(per_block, (list, tuple)) else [per_block] * n

    k = 1
    for i, kind in enumerate(cfg.down_block_types):
        for j in range(layers[i]):
            rules[f"down_blocks.{i}.resnets.{j}."] = (f"input_blocks.{k}.0.", UNET_RESNET)
            if "CrossAttn" in kind:
                rules[f"down_blocks.{i}.attentions.{j}."] = (f"input_blocks.{k}.1.", KEEP)
            k += 1
        if i < n - 1:
            rules[f"down_blocks.{i}.downsamplers.0.conv."] = (f"input_blocks.{k}.0.op.", KEEP)
            k += 1

    k = 0
    for i, kind in enumerate(cfg.up_block_types):
        attention = "CrossAttn" in kind
        for j in range(layers[n - 1 - i] + 1):
            rules[f"up_blocks.{i}.resnets.{j}."] = (f"output_blocks.{k}.0.", UNET_RESNET)
            if attention:
                rules[f"up_blocks.{i}.attentions.{j}."] = (f"output_blocks.{k}.1.", KEEP)
            k += 1
        if i < n - 1:
            rules[f"up_blocks.{i}.upsamplers.0."] = (f"output_blocks.{k - 1}.{2 if attention else 1}.", KEEP)
    return rules


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    return _rename(unet.state_dict(), unet_rules(unet.config))


# ---------------------------------------------------------------- VAE

VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_rules(cfg) -> Rules:
    """Rules for an AutoencoderKL config. LDM numbers the decoder's up blocks by resolution like the
    encoder's (``decoder.up.0`` is the full-resolution one); diffusers numbers them in the order they run."""
    n = len(cfg.block_out_channels)
    rules: Rules = {p: (p, KEEP) for p in ("quant_conv.", "post_quant_conv.")}
    for part in ("encoder", "decoder"):
        rules.update({
            f"{part}.conv_in.": (f"{part}.conv_in.", KEEP),
            f"{part}.conv_out.": (f"{part}.conv_out.", KEEP),
            f"{part}.conv_norm_out.": (f"{part}.norm_out.", KEEP),
            f"{part}.mid_block.resnets.0.": (f"{part}.mid.block_1.", VAE_RESNET),
            f"{part}.mid_block.attentions.0.": (f"{part}.mid.attn_1.", VAE_ATTENTION),
            f"{part}.mid_block.resnets.1.": (f"{part}.mid.block_2.", VAE_RESNET),
        })
    for i in range(n):
        up = n - 1 - i
        for j in range(cfg.layers_per_block):
            rules[f"encoder.down_blocks.{i}.resnets.{j}."] = (f"encoder.down.{i}.block.{j}.", VAE_RESNET)
        for j in range(cfg.layers_per_block + 1):
            rules[f"decoder.up_blocks.{i}.resnets.{j}."] = (f"decoder.up.{up}.block.{j}.", VAE_RESNET)
        if i < n - 1:
            rules[f"encoder.down_blocks.{i}.downsamplers.0."] = (f"encoder.down.{i}.downsample.", KEEP)
            rules[f"decoder.up_blocks.{i}.upsamplers.0."] = (f"decoder.up.{up}.upsample.", KEEP)
    return rules


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    out = _rename(vae.state_dict(), vae_rules(vae.config))
    # LDM's mid-block attention projects with 1x1 convolutions, diffusers' with linear layers
    return {k: t[..., None, None] if ".mid.attn_1." in k and t.ndim == 2 else t for k, t in out.items()}


# ---------------------------------------------------------------- text encoders


def _clip_state(encoder) -> dict[str, torch.Tensor]:
    """CLIP text model tensors keyed ``embeddings.`` / ``encoder.`` / ``final_layer_norm.`` (and
    ``text_projection.``), whether or not this transformers version nests them under ``text_model.``."""
    return {k.removeprefix("text_model."): t for k, t in encoder.state_dict().items()}


def hf_clip_to_ldm(encoder) -> dict[str, torch.Tensor]:
    """OpenAI CLIP as LDM stores it: the HF module tree under ``transformer.text_model.``."""
    return {f"transformer.text_model.{k}": t for k, t in _clip_state(encoder).items()}


OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                  "self_attn": "attn"}


def openclip_to_ldm(encoder, extra_layer: bool = False) -> dict[str, torch.Tensor]:
    """An HF CLIP text model in OpenCLIP's layout: fused ``attn.in_proj_*`` (q, k, v stacked), ``resblocks``,
    ``ln_final`` and ``text_projection`` as a (width, projection) matrix.

    ``extra_layer``: real SD2.x checkpoints carry OpenCLIP-H's last layer although SD2 reads the
    penultimate one's output, so the diffusers model has one layer fewer; a copy of the last layer
    stands in for it.
    """
    n = encoder.config.num_hidden_layers
    state = _clip_state(encoder)
    for i in range(n):
        attn = f"encoder.layers.{i}.self_attn."
        for kind in ("weight", "bias"):
            state[f"{attn}in_proj_{kind}"] = torch.cat([state.pop(f"{attn}{x}_proj.{kind}") for x in "qkv"])
    if "text_projection.weight" in state:
        state["text_projection"] = state.pop("text_projection.weight").T

    rules: Rules = {
        "embeddings.token_embedding.": ("token_embedding.", KEEP),
        "embeddings.position_embedding.weight": ("positional_embedding", KEEP),
        "final_layer_norm.": ("ln_final.", KEEP),
        "text_projection": ("text_projection", KEEP),
    }
    rules.update({f"encoder.layers.{i}.": (f"transformer.resblocks.{i}.", OPENCLIP_LAYER) for i in range(n)})
    out = _rename(state, rules)
    if extra_layer:
        last, extra = f"transformer.resblocks.{n - 1}.", f"transformer.resblocks.{n}."
        out.update({extra + k[len(last):]: t.clone() for k, t in out.items() if k.startswith(last)})
    return out


# ---------------------------------------------------------------- whole pipeline


def pipeline_to_ldm(pipe, v_pred_marker: bool = False) -> dict[str, torch.Tensor]:
    """All of ``pipe``'s weights under their LDM single-file names."""
    parts = {"model.diffusion_model.": unet_to_ldm(pipe.unet), "first_stage_model.": vae_to_ldm(pipe.vae)}
    if getattr(pipe, "text_encoder_2", None) is not None:  # SDXL: CLIP-L + OpenCLIP bigG
        parts["conditioner.embedders.0."] = hf_clip_to_ldm(pipe.text_encoder)
        parts["conditioner.embedders.1.model."] = openclip_to_ldm(pipe.text_encoder_2)
    elif pipe.text_encoder.config.hidden_act == "gelu":  # SD2.x: OpenCLIP-H (OpenAI's CLIP uses quick_gelu)
        parts["cond_stage_model.model."] = openclip_to_ldm(pipe.text_encoder, extra_layer=True)
    else:  # SD1.x: OpenAI CLIP-L
        parts["cond_stage_model."] = hf_clip_to_ldm(pipe.text_encoder)
    out = {prefix + k: t for prefix, tensors in parts.items() for k, t in tensors.items()}
    if v_pred_marker:
        out["v_pred"] = torch.tensor([])  # ComfyUI: the key's presence marks a v-prediction model
    return out


def save_ldm_checkpoint(pipe, path, v_pred_marker: bool = False) -> Path:
    """Write ``pipe`` as one LDM-layout ``.safetensors`` file at ``path`` and return the path."""
    save_tensors(pipeline_to_ldm(pipe, v_pred_marker), path)
    return Path(path)
