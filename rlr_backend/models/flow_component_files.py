"""Text encoder and VAE files of a flow model (ComfyUI ``models/text_encoders`` and ``models/vae``), offline.

Each file's kind and config are read from its keys and shapes:

* **CLIP** (HF transformers layout, ``text_model.*``, as ComfyUI's ``clip_l.safetensors`` /
  ``clip_g.safetensors``): width, depth, MLP, positions, vocabulary, projection from the shapes; 64-wide heads.
  Of two CLIP files (SD3 / SD3.5) the narrower is CLIP-L (OpenAI, quick_gelu, 768 wide) and the wider CLIP-G
  (OpenCLIP bigG, gelu, 1280 wide), whatever order they are given in.
* **T5** encoder (``encoder.block.*`` + ``shared``, as ``t5xxl_fp16.safetensors``; fp8 files are cast up):
  widths and depth from the shapes, heads from the relative-attention table, gated-GELU (T5 v1.1) when the MLP
  has ``wi_0``/``wi_1``. Its ``wo`` projections stay float32 when the encoder is loaded in fp16 (as transformers
  does: T5 overflows in fp16).
* **Qwen3** (``model.layers.*``, as Z-Image's ``qwen_3_4b.safetensors``): widths, depth, heads from the q/k
  norms; rope theta 1e6 (Qwen3's).
* **VAE**: the original layout (``encoder.down.*``, FLUX's ``ae.safetensors``, optionally under
  ``first_stage_model.`` / ``vae.``) or diffusers' (``encoder.down_blocks.*``); widths, depth and latent channels
  from the shapes; scaling and shift factors are the transformer's family's (SD3 1.5305 / 0.0609, FLUX.1 and
  Z-Image 0.3611 / 0.1159).

ComfyUI's scaled-fp8 files (a ``scale_weight`` per tensor) are refused: their weights are not usable
without the scales.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .single_file import UnsupportedCheckpoint, _count, _text_config, _vae_config

TEXT_KINDS = {"clip": "CLIP", "t5": "T5", "qwen3": "Qwen3"}
#: family -> (VAE scaling factor, shift factor)
VAE_FACTORS = {"sd3": (1.5305, 0.0609), "flux": (0.3611, 0.1159), "zimage": (0.3611, 0.1159)}
_SCALED = ("scale_weight", "scaled_fp8", "weight_scale", "comfy_quant")


@dataclass
class ComponentFile:
    """One component read from ``path`` (keys under ``prefix``): its ``kind`` (clip, t5, qwen3, vae), transformers
    or diffusers ``config``, ``build`` (config -> module) and ``convert`` (file tensors -> module state)."""

    path: Path
    kind: str
    prefix: str
    config: Any
    build: Callable[[], torch.nn.Module]
    convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
    #: what the pipeline uses it as ("CLIP-L", "CLIP-G", "T5", "Qwen3", "VAE"); CLIPs: with the projection head
    role: str = ""
    with_projection: bool = False

    @property
    def width(self) -> int:
        cfg = self.config
        return int(getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model"))


def refuse_scaled(shapes: dict, source: str) -> None:
    """ComfyUI's scaled-fp8 / quantised files carry scales the plain weights need: refused, naming the key."""
    key = next((k for k in shapes if k.rsplit(".", 1)[-1] in _SCALED), None)
    if key is not None:
        raise UnsupportedCheckpoint(f"{source}: a scaled/quantised file ({key!r}); these weights are not usable "
                                    "without ComfyUI's scaling: use the fp16, bf16 or plain fp8 version of the file")


def _strip(tensors: dict, prefix: str, drop: tuple[str, ...] = ()) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix) and not k[len(prefix):].startswith(drop)}


def _clip(t: dict, path: Path, prefix: str) -> ComponentFile:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from .single_file import _text_state

    cfg = _text_config(t, prefix + "text_model.", "clip", "")
    proj = t.get(prefix + "text_projection.weight")
    cfg.projection_dim = proj.shape[0] if proj is not None else cfg.hidden_size
    built: list[torch.nn.Module] = []

    def build() -> torch.nn.Module:
        if out.with_projection and proj is None:
            raise UnsupportedCheckpoint(f"{path}: the {out.role} text encoder has no text_projection.weight, which "
                                        "SD3 / SD3.5 need; use the file that ships with the model")
        built.append((CLIPTextModelWithProjection if out.with_projection else CLIPTextModel)(cfg))
        return built[-1]

    def convert(tensors: dict) -> dict:
        sd = _text_state(tensors, prefix + "text_model.", "clip", built[-1], cfg)
        if out.with_projection:
            sd["text_projection.weight"] = tensors[prefix + "text_projection.weight"]
        return sd
    out = ComponentFile(path, "clip", prefix, cfg, build, convert)
    return out


def _t5(t: dict, path: Path, prefix: str) -> ComponentFile:
    from transformers import T5Config, T5EncoderModel

    p = prefix + "encoder.block.0.layer."
    bias = t[p + "0.SelfAttention.relative_attention_bias.weight"]
    gated = p + "1.DenseReluDense.wi_0.weight" in t
    emb = t.get(prefix + "shared.weight", t.get(prefix + "encoder.embed_tokens.weight"))
    if emb is None:
        raise KeyError(prefix + "shared.weight")
    heads = bias.shape[1]
    cfg = T5Config(vocab_size=emb.shape[0], d_model=emb.shape[1], d_kv=t[p + "0.SelfAttention.q.weight"].shape[0] // heads,
                   d_ff=t[p + ("1.DenseReluDense.wi_0.weight" if gated else "1.DenseReluDense.wi.weight")].shape[0],
                   num_layers=_count(t, re.escape(prefix + "encoder.block.") + r"(\d+)\."), num_heads=heads,
                   relative_attention_num_buckets=bias.shape[0], feed_forward_proj="gated-gelu" if gated else "relu",
                   is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)

    def convert(tensors: dict) -> dict:
        sd = _strip(tensors, prefix)
        shared = sd.get("shared.weight", sd.get("encoder.embed_tokens.weight"))
        sd["shared.weight"] = sd["encoder.embed_tokens.weight"] = shared  # tied in T5EncoderModel
        return sd
    return ComponentFile(path, "t5", prefix, cfg, lambda: T5EncoderModel(cfg), convert, role="T5")


def _qwen3(t: dict, path: Path, prefix: str) -> ComponentFile:
    from transformers import Qwen3Config, Qwen3Model

    p = prefix + "layers.0.self_attn."
    head_dim = t[p + "q_norm.weight"].shape[0]
    emb = t[prefix + "embed_tokens.weight"]
    cfg = Qwen3Config(vocab_size=emb.shape[0], hidden_size=emb.shape[1],
                      intermediate_size=t[prefix + "layers.0.mlp.gate_proj.weight"].shape[0],
                      num_hidden_layers=_count(t, re.escape(prefix + "layers.") + r"(\d+)\."),
                      num_attention_heads=t[p + "q_proj.weight"].shape[0] // head_dim,
                      num_key_value_heads=t[p + "k_proj.weight"].shape[0] // head_dim, head_dim=head_dim,
                      max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=True,
                      rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                      attention_bias=p + "q_proj.bias" in t)
    return ComponentFile(path, "qwen3", prefix, cfg, lambda: Qwen3Model(cfg),
                         lambda tensors: _strip(tensors, prefix, drop=("lm_head.",)), role="Qwen3")


#: kind -> (key that marks it, relative to a prefix; prefixes tried; reader)
_TEXT_LAYOUTS = {"clip": ("text_model.encoder.layers.0.mlp.fc1.weight", ("", "transformer."), _clip),
                 "t5": ("encoder.block.0.layer.0.SelfAttention.q.weight", ("", "transformer."), _t5),
                 "qwen3": ("layers.0.self_attn.q_norm.weight", ("model.", ""), _qwen3)}


def read_text_encoder(shapes: dict[str, torch.Tensor], path: Path, prefix: str = "") -> ComponentFile:
    """The text encoder in ``shapes`` (a file's tensors as meta tensors, keys under ``prefix``), or
    UnsupportedCheckpoint naming the file."""
    refuse_scaled(shapes, str(path))
    for kind, (marker, prefixes, reader) in _TEXT_LAYOUTS.items():
        for p in prefixes:
            if prefix + p + marker in shapes:
                try:
                    return reader(shapes, path, prefix + p)
                except (KeyError, IndexError) as e:
                    key = e.args[0] if isinstance(e, KeyError) and e.args else "a tensor"
                    raise UnsupportedCheckpoint(f"{path}: the {TEXT_KINDS[kind]} text encoder lacks {key!r}; the "
                                                "file is incomplete") from None
    raise UnsupportedCheckpoint(f"{path}: not a text encoder file this loader reads (CLIP-L / CLIP-G, T5 or Qwen3 in "
                                "the HF transformers layout, as ComfyUI's models/text_encoders files); its first key "
                                f"is {next(iter(shapes), 'none')!r}")


def mark_clip_roles(clips: list[ComponentFile]) -> None:
    """Give one CLIP (FLUX.1: CLIP-L) or two (SD3: the narrower CLIP-L, the wider CLIP-G) their activations."""
    for i, c in enumerate(sorted(clips, key=lambda c: c.width)):
        c.config.hidden_act = "gelu" if i == 1 else "quick_gelu"
        c.role = "CLIP-G" if i == 1 else "CLIP-L"


def read_vae(shapes: dict[str, torch.Tensor], path: Path, family: str, image_size: int) -> ComponentFile:
    """The VAE in ``shapes`` (original or diffusers layout, see the module docstring), with ``family``'s factors."""
    from diffusers import AutoencoderKL

    refuse_scaled(shapes, str(path))
    prefix = next((p for p in ("", "first_stage_model.", "vae.") if p + "encoder.conv_in.weight" in shapes), None)
    if prefix is None:
        raise UnsupportedCheckpoint(f"{path}: not a VAE file (no encoder.conv_in.weight); its first key is "
                                    f"{next(iter(shapes), 'none')!r}")
    diffusers_layout = prefix + "encoder.down_blocks.0.resnets.0.conv1.weight" in shapes
    try:
        if diffusers_layout:
            n = _count(shapes, re.escape(prefix + "encoder.down_blocks.") + r"(\d+)\.")
            widths = [shapes[prefix + f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(n)]
            cfg = dict(in_channels=shapes[prefix + "encoder.conv_in.weight"].shape[1],
                       out_channels=shapes[prefix + "decoder.conv_out.weight"].shape[0], block_out_channels=widths,
                       down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
                       latent_channels=shapes[prefix + "decoder.conv_in.weight"].shape[1],
                       layers_per_block=_count(shapes, re.escape(prefix + "encoder.down_blocks.0.resnets.") + r"(\d+)\."),
                       norm_num_groups=min(32, widths[0]), sample_size=image_size)
        else:
            cfg = _vae_config(shapes, "", image_size, prefix)
    except (KeyError, IndexError) as e:
        key = e.args[0] if isinstance(e, KeyError) and e.args else "a tensor"
        raise UnsupportedCheckpoint(f"{path}: the VAE lacks {key!r}; the file is incomplete") from None
    cfg["scaling_factor"], cfg["shift_factor"] = VAE_FACTORS[family]
    cfg["use_quant_conv"] = prefix + "quant_conv.weight" in shapes
    cfg["use_post_quant_conv"] = prefix + "post_quant_conv.weight" in shapes

    def convert(tensors: dict) -> dict:
        if diffusers_layout:
            return _strip(tensors, prefix)
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        return convert_ldm_vae_checkpoint({k: v for k, v in tensors.items() if k.startswith(prefix)}, cfg)
    return ComponentFile(path, "vae", prefix, cfg, lambda: AutoencoderKL.from_config(cfg), convert, role="VAE")
