"""A flow-matching transformer file (ComfyUI ``models/diffusion_models``) -> its diffusers class, config and keys.

The architecture is resolved offline from the file's keys and shapes (no config is looked up anywhere):

1. :func:`~rlr_backend.models.flow_detect.flow_transformer_layout` names the family (SD3/SD3.5, FLUX.1,
   Z-Image), the key prefix (``model.diffusion_model.``, ``diffusion_model.``, none) and the layout
   (original SAI/BFL/Tongyi keys, or diffusers' own).
2. Original keys are converted to diffusers' names: SD3 and Z-Image with diffusers' converters
   (``convert_sd3_transformer_checkpoint_to_diffusers``, ``convert_z_image_transformer_checkpoint_to_diffusers``:
   they read every size from the keys); FLUX.1 here (:func:`convert_flux`, diffusers' converter fixes FLUX.1's
   3072 width), with the fused q/k/v and q/k/v/MLP projections split as views (no copy). A tensor the
   conversion does not use is an error naming it (a scaled-fp8 or otherwise extended file is not silently
   half-read).
3. The config is read from the converted shapes: widths, depths, heads (head size from the qk-norm weights;
   SD3 without qk-norm uses 64, as every SD3 has), text and pooled widths, guidance embedding (FLUX.1-dev vs
   schnell), qk-norm and dual-attention layers (SD3.5 large / medium). What the weights do not hold is fixed by
   the architecture, as in the official configs: FLUX.1's rope axes (16, 56, 56) and Z-Image's (32, 48, 48)
   (both need 128-wide heads), Z-Image's rope theta 256 and axes lengths, SD3's native sample size 128.

Everything runs on meta tensors (the header's shapes) before a byte of weights is read.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import torch

from .flow_detect import flow_transformer_layout
from .single_file import UnsupportedCheckpoint

SUPPORTED_TRANSFORMERS = "an SD3 / SD3.5, FLUX.1 (dev or schnell) or Z-Image transformer file"


@dataclass
class TransformerSpec:
    """A resolved transformer: ``name`` (e.g. "FLUX.1-dev"), ``family`` ("sd3" | "flux" | "zimage"), its diffusers
    class name and config, and ``convert`` (file tensors, full keys -> diffusers state dict)."""

    name: str
    family: str
    class_name: str
    config: dict
    convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def _swap_scale_shift(t: torch.Tensor) -> torch.Tensor:
    shift, scale = t.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


#: FLUX.1 original name -> diffusers name, per block kind ({i}: the block index)
_FLUX_TOP = {"img_in": "x_embedder", "txt_in": "context_embedder", "final_layer.linear": "proj_out",
             "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
             "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
             "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
             "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
             "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
             "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2"}
_FLUX_DOUBLE = {"img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear", "img_attn.proj": "attn.to_out.0",
                "txt_attn.proj": "attn.to_add_out", "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
                "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2",
                "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
                "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
                "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
                "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight"}
_FLUX_SINGLE = {"modulation.lin": "norm.linear", "linear2": "proj_out",
                "norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}
_FLUX_QKV = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
             "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}


def convert_flux(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """FLUX.1 original (BFL) keys -> diffusers ``FluxTransformer2DModel`` keys, for any width; the tensors it uses
    are popped from ``sd`` (what is left was not used)."""
    out: dict[str, torch.Tensor] = {}
    hidden = sd["img_in.weight"].shape[0]

    def move(old: str, new: str) -> None:  # a missing weight raises KeyError naming the file's key
        if old.endswith(".scale"):
            out[new] = sd.pop(old)
            return
        out[f"{new}.weight"] = sd.pop(f"{old}.weight")
        if f"{old}.bias" in sd:
            out[f"{new}.bias"] = sd.pop(f"{old}.bias")

    dev = "guidance_in.in_layer.weight" in sd  # the guidance embedding: FLUX.1-dev, not schnell
    for old, new in _FLUX_TOP.items():
        if dev or not old.startswith("guidance_in."):
            move(old, new)
    for suffix in ("weight", "bias"):
        t = sd.pop(f"final_layer.adaLN_modulation.1.{suffix}")
        out[f"norm_out.linear.{suffix}"] = _swap_scale_shift(t)
    for i in sorted({int(m.group(1)) for k in sd for m in [re.match(r"double_blocks\.(\d+)\.", k)] if m}):
        src, dst = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for old, new in _FLUX_DOUBLE.items():
            move(src + old, dst + new)
        for old, names in _FLUX_QKV.items():
            for suffix in ("weight", "bias"):
                for name, part in zip(names, sd.pop(f"{src}{old}.{suffix}").chunk(3, dim=0)):
                    out[f"{dst}{name}.{suffix}"] = part
    for i in sorted({int(m.group(1)) for k in sd for m in [re.match(r"single_blocks\.(\d+)\.", k)] if m}):
        src, dst = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        for old, new in _FLUX_SINGLE.items():
            move(src + old, dst + new)
        for suffix in ("weight", "bias"):
            fused = sd.pop(f"{src}linear1.{suffix}")
            sizes = (hidden, hidden, hidden, fused.shape[0] - 3 * hidden)
            for name, part in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), fused.split(sizes, dim=0)):
                out[f"{dst}{name}.{suffix}"] = part
    return out


def _sd3_converter(sd: dict) -> dict:
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    return convert_sd3_transformer_checkpoint_to_diffusers(sd)


def _zimage_converter(sd: dict) -> dict:
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    out = convert_z_image_transformer_checkpoint_to_diffusers(sd)
    sd.clear()  # it moves every key (renamed) into its result and drops norm_final: nothing is left unused
    return out


_CONVERTERS = {"SD3/SD3.5": _sd3_converter, "FLUX.1": convert_flux, "Z-Image": _zimage_converter}


def _count(d: dict, prefix: str) -> int:
    rx = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in d for m in [rx.match(k)] if m})


def _heads(hidden: int, head_dim: int, what: str, source: str) -> int:
    if head_dim <= 0 or hidden % head_dim:
        raise UnsupportedCheckpoint(f"{source}: the {what} transformer is {hidden} wide, not a multiple of its "
                                    f"{head_dim}-wide attention heads; expected {SUPPORTED_TRANSFORMERS}")
    return hidden // head_dim


def _rope_axes(head_dim: int, axes: list[int], name: str, source: str) -> list[int]:
    if head_dim != sum(axes):
        raise UnsupportedCheckpoint(f"{source}: a {name} transformer with {head_dim}-wide attention heads; {name} has "
                                    f"{sum(axes)} (its rope axes {axes} are not in the weights, so other sizes are "
                                    "not resolved)")
    return axes


def _sd3_config(d: dict, source: str) -> tuple[str, dict]:
    proj = d["pos_embed.proj.weight"]
    hidden, in_ch, patch = proj.shape[0], proj.shape[1], proj.shape[-1]
    qk = "transformer_blocks.0.attn.norm_q.weight" in d
    head_dim = d["transformer_blocks.0.attn.norm_q.weight"].shape[0] if qk else 64
    layers = _count(d, "transformer_blocks.")
    dual = sorted({int(m.group(1)) for k in d for m in [re.match(r"transformer_blocks\.(\d+)\.attn2\.", k)] if m})
    pos = int(math.isqrt(d["pos_embed.pos_embed"].shape[1]))
    cfg = dict(sample_size=min(128, pos * patch), patch_size=patch, in_channels=in_ch, num_layers=layers,
               attention_head_dim=head_dim, num_attention_heads=_heads(hidden, head_dim, "SD3", source),
               joint_attention_dim=d["context_embedder.weight"].shape[1],
               caption_projection_dim=d["context_embedder.weight"].shape[0],
               pooled_projection_dim=d["time_text_embed.text_embedder.linear_1.weight"].shape[1],
               out_channels=d["proj_out.weight"].shape[0] // patch ** 2, pos_embed_max_size=pos,
               dual_attention_layers=tuple(dual), qk_norm="rms_norm" if qk else None)
    name = "SD3.5 medium" if dual else "SD3.5 large" if qk else "SD3 medium"
    return name, cfg


def _flux_config(d: dict, source: str) -> tuple[str, dict]:
    hidden, in_ch = d["x_embedder.weight"].shape
    head_dim = d["transformer_blocks.0.attn.norm_q.weight"].shape[0]
    guidance = "time_text_embed.guidance_embedder.linear_1.weight" in d
    mlp = d["single_transformer_blocks.0.proj_mlp.weight"].shape[0] if "single_transformer_blocks.0.proj_mlp.weight" \
        in d else 4 * hidden
    if mlp != 4 * hidden:
        raise UnsupportedCheckpoint(f"{source}: a FLUX.1-like transformer with a {mlp}-wide MLP for width {hidden}; "
                                    "FLUX.1's MLP is 4x its width")
    out_ch = d["proj_out.weight"].shape[0]
    cfg = dict(patch_size=1, in_channels=in_ch, out_channels=None if out_ch == in_ch else out_ch,
               num_layers=_count(d, "transformer_blocks."), num_single_layers=_count(d, "single_transformer_blocks."),
               attention_head_dim=head_dim, num_attention_heads=_heads(hidden, head_dim, "FLUX.1", source),
               joint_attention_dim=d["context_embedder.weight"].shape[1],
               pooled_projection_dim=d["time_text_embed.text_embedder.linear_1.weight"].shape[1],
               guidance_embeds=guidance, axes_dims_rope=_rope_axes(head_dim, [16, 56, 56], "FLUX.1", source))
    return ("FLUX.1-dev" if guidance else "FLUX.1-schnell"), cfg


def _zimage_config(d: dict, source: str) -> tuple[str, dict]:
    dim, patch_in = d["all_x_embedder.2-1.weight"].shape
    head_dim = d["layers.0.attention.norm_q.weight"].shape[0]
    if "siglip_embedder.0.weight" in d or any(k.startswith("siglip") for k in d):
        raise UnsupportedCheckpoint(f"{source}: a Z-Image Omni transformer (SigLIP inputs); text-to-image Z-Image "
                                    "files load")
    cfg = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=patch_in // 4, dim=dim,
               n_layers=_count(d, "layers."), n_refiner_layers=_count(d, "noise_refiner."),
               n_heads=_heads(dim, head_dim, "Z-Image", source),
               n_kv_heads=d["layers.0.attention.to_k.weight"].shape[0] // head_dim, qk_norm=True,
               cap_feat_dim=d["cap_embedder.1.weight"].shape[1], rope_theta=256.0, t_scale=1000.0,
               axes_dims=_rope_axes(head_dim, [32, 48, 48], "Z-Image", source), axes_lens=[1024, 512, 512])
    return "Z-Image", cfg


_FAMILIES = {"SD3/SD3.5": ("sd3", "SD3Transformer2DModel", _sd3_config),
             "FLUX.1": ("flux", "FluxTransformer2DModel", _flux_config),
             "Z-Image": ("zimage", "ZImageTransformer2DModel", _zimage_config)}


def resolve_transformer(shapes: dict[str, torch.Tensor], source: str) -> TransformerSpec:
    """The transformer ``shapes`` (a file's tensors as meta tensors) hold, or UnsupportedCheckpoint in one line
    naming what the file is or lacks."""
    from .single_file import _traced

    layout = flow_transformer_layout(shapes)
    if layout is None:
        raise UnsupportedCheckpoint(f"{source}: the transformer's architecture cannot be resolved from its keys (e.g. "
                                    f"{next(iter(shapes), 'no tensors')!r}); expected {SUPPORTED_TRANSFORMERS}")
    family, class_name, infer = _FAMILIES[layout.kind]
    prefix = layout.prefix

    def convert(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if layout.diffusers:
            return sd
        try:
            out = _CONVERTERS[layout.kind](sd)
        except KeyError as e:
            raise UnsupportedCheckpoint(f"{source}: the {layout.kind} transformer lacks {prefix}{e.args[0]}; the file "
                                        "is incomplete or another model's") from None
        if sd:
            raise UnsupportedCheckpoint(f"{source}: {len(sd)} tensor(s) have no place in a {layout.kind} transformer, "
                                        f"e.g. {prefix + sorted(sd)[0]!r} (a scaled-fp8 or otherwise extended file?); "
                                        f"expected {SUPPORTED_TRANSFORMERS}")
        return out

    try:
        name, cfg = infer(convert(_traced(shapes)), source)
    except (KeyError, IndexError) as e:
        key = e.args[0] if isinstance(e, KeyError) and e.args else "a tensor the architecture needs"
        raise UnsupportedCheckpoint(f"{source}: the {layout.kind} transformer lacks {key!r}; expected "
                                    f"{SUPPORTED_TRANSFORMERS}") from None
    return TransformerSpec(name, family, class_name, cfg, convert)
