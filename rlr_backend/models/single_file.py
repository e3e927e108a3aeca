"""Single-file ``.safetensors`` checkpoints (ComfyUI / A1111 layout) -> a diffusers pipeline, offline.

diffusers' ``from_single_file`` needs the diffusers configs of the architecture: it looks them up on
the Hub (``stable-diffusion-v1-5/...``, ``stabilityai/...``) or in the local HF cache, and with
``local_files_only=True`` and an empty cache it fails. Instead this module resolves the architecture
from the state dict alone and writes no file:

1. **detect**: the key layout names the family: ``cond_stage_model.transformer.*`` (OpenAI CLIP) ->
   SD1.x; ``cond_stage_model.model.*`` (OpenCLIP) -> SD2.x; ``conditioner.embedders.0.transformer`` +
   ``conditioner.embedders.1.model`` + ``label_emb`` -> SDXL base. Anything else (SDXL refiner,
   inpainting / 9-channel UNets, SD3, Flux, UNet-only or LoRA files...) is refused with the name
   diffusers' own detector gives it.
2. **infer configs from tensor shapes**: UNet widths, levels, layers per level, transformer depth,
   cross-attention width, linear vs conv projections, SDXL's added-embedding sizes; VAE widths and
   latent channels; CLIP width, depth, MLP width, context length, projection width. What weights do
   not determine is fixed by the architecture, as in the official configs: attention heads (SD1.x 8;
   SD2.x/SDXL width/64), GroupNorm groups (32, or the narrowest width if smaller), activation
   (quick_gelu for OpenAI CLIP, gelu for OpenCLIP), VAE scaling factor (0.18215; SDXL 0.13025), SD2's
   penultimate text layer, the native image size (512; SD2-v 768; SDXL 1024) and the DDIM schedule
   (scaled-linear betas 0.00085..0.012, 1000 steps, leading spacing, offset 1).
3. **convert** keys with diffusers' converters (``convert_ldm_unet_checkpoint``,
   ``convert_ldm_vae_checkpoint``, ``convert_open_clip_checkpoint``) and load strictly: a missing or
   extra tensor is an error, never silently random-initialised.

Prediction type: ``prediction_type=`` if given; else v-prediction when the file carries ComfyUI's
``v_pred`` marker key, or for SD2.x (SD2.x-768 is v; SD2-base 512 checkpoints need
``prediction_type="epsilon"``); else epsilon. Tokenizers use the CLIP BPE vocabulary shipped with the
embedded default model (identical ids to OpenAI CLIP; OpenCLIP pads with ``!``).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from ..safe_io import InvalidModelFile, load_tensors

logger = logging.getLogger(__name__)

U, VAE = "model.diffusion_model.", "first_stage_model."
#: where each architecture keeps its text encoders: (prefix, kind) per encoder
TEXT_ENCODERS = {
    "sd1": (("cond_stage_model.transformer.text_model.", "clip"),),
    "sd2": (("cond_stage_model.model.", "openclip"),),
    "sdxl": (("conditioner.embedders.0.transformer.text_model.", "clip"), ("conditioner.embedders.1.model.", "openclip")),
}
ARCH_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL base"}
NATIVE_SIZE = {"sd1": 512, "sd2": 768, "sdxl": 1024}
SUPPORTED = "SD1.x, SD2.x or SDXL base checkpoint with its text encoder(s) and VAE (ComfyUI/A1111 layout)"


class UnsupportedCheckpoint(InvalidModelFile):
    """A single-file checkpoint whose architecture this loader cannot build."""


def _diffusers_guess(tensors: dict) -> str:
    try:
        from diffusers.loaders.single_file_utils import infer_diffusers_model_type

        return f"diffusers identifies it as {infer_diffusers_model_type(tensors)!r}"
    except Exception as e:  # the detector itself fails on layouts it does not know
        return f"not a known diffusion checkpoint layout ({type(e).__name__})"


def detect_architecture(tensors: dict[str, torch.Tensor], source: str = "checkpoint") -> str:
    """"sd1" | "sd2" | "sdxl" from the key layout; UnsupportedCheckpoint naming what it is otherwise."""
    def refuse(what: str):
        raise UnsupportedCheckpoint(f"{source}: unsupported architecture: {what}; expected an {SUPPORTED}. Other "
                                    "models: convert them to a diffusers folder of a supported pipeline")

    if U + "input_blocks.0.0.weight" not in tensors:
        if any(k.startswith(("lora_", "lora_unet_")) or ".lora_" in k for k in tensors):
            refuse("this is a LoRA, not a model checkpoint")
        refuse(f"no Stable Diffusion UNet keys ({U}input_blocks.*); {_diffusers_guess(tensors)}")
    in_ch = tensors[U + "input_blocks.0.0.weight"].shape[1]
    if in_ch != 4:
        refuse(f"the UNet takes {in_ch} input channels (inpainting / instruct-pix2pix / upscaler?), "
               f"text-to-image needs 4; {_diffusers_guess(tensors)}")
    has = lambda prefix: any(k.startswith(prefix) for k in tensors)  # noqa: E731
    if has("conditioner.embedders.1.model.transformer.") and has("conditioner.embedders.0.transformer.") \
            and U + "label_emb.0.0.weight" in tensors:
        return "sdxl"
    if has("conditioner.embedders.0.model."):
        refuse("SDXL refiner (one OpenCLIP encoder, aesthetic-score conditioning)")
    if has("cond_stage_model.model.transformer."):
        return "sd2"
    if has("cond_stage_model.transformer.text_model."):
        return "sd1"
    refuse(f"the UNet has no text encoder beside it (UNet-only file?); {_diffusers_guess(tensors)}")


def _count(tensors: dict, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in tensors for m in [rx.match(k)] if m})


def _unet_config(t: dict, arch: str, text_cfgs: list, image_size: int, vae_factor: int) -> dict:
    conv_in = t[U + "input_blocks.0.0.weight"]
    levels: list[list[tuple[int, int]]] = [[]]
    i = 1
    while True:
        if U + f"input_blocks.{i}.0.op.weight" in t:
            levels.append([])
        elif U + f"input_blocks.{i}.0.out_layers.3.weight" in t:
            depth = _count(t, re.escape(U + f"input_blocks.{i}.1.transformer_blocks.") + r"(\d+)\.")
            levels[-1].append((t[U + f"input_blocks.{i}.0.out_layers.3.weight"].shape[0], depth))
        else:
            break
        i += 1
    if len({len(lv) for lv in levels}) != 1 or any(len({d for _, d in lv}) != 1 for lv in levels):
        raise UnsupportedCheckpoint("UNet levels differ in their number of layers; not an SD1.x/SD2.x/SDXL UNet")
    widths = [lv[0][0] for lv in levels]
    multiple = vae_factor * 2 ** (len(levels) - 1)
    if image_size % multiple:
        raise ValueError(f"image_size {image_size} must be a multiple of {multiple} for this model")
    depths = [lv[0][1] for lv in levels]
    mid_depth = _count(t, re.escape(U + "middle_block.1.transformer_blocks.") + r"(\d+)\.")
    attn_k = next(v for k, v in t.items() if k.startswith(U) and k.endswith("attn2.to_k.weight"))
    proj_in = next(v for k, v in t.items() if k.startswith(U) and k.endswith(".proj_in.weight"))
    cfg = dict(
        sample_size=image_size // vae_factor, in_channels=conv_in.shape[1], out_channels=t[U + "out.2.weight"].shape[0],
        layers_per_block=len(levels[0]), block_out_channels=widths, norm_num_groups=min(32, widths[0]),
        down_block_types=["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths],
        up_block_types=["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depths)],
        cross_attention_dim=attn_k.shape[1], use_linear_projection=proj_in.dim() == 2,
        attention_head_dim=8 if arch == "sd1" else [max(1, w // 64) for w in widths],
        transformer_layers_per_block=[d or 1 for d in depths[:-1]] + [mid_depth or 1],
        upcast_attention=arch == "sd2",
    )
    if depths[-1] and depths[-1] != mid_depth:
        raise UnsupportedCheckpoint("the UNet's last level and middle block differ in transformer depth")
    if arch == "sdxl":
        adm_in = t[U + "label_emb.0.0.weight"].shape[1]
        pooled = text_cfgs[1].projection_dim
        cfg.update(addition_embed_type="text_time", addition_time_embed_dim=(adm_in - pooled) // 6,
                   projection_class_embeddings_input_dim=adm_in)
    return cfg


def _vae_config(t: dict, arch: str, image_size: int) -> dict:
    n = _count(t, re.escape(VAE + "encoder.down.") + r"(\d+)\.block\.0\.conv1\.weight")
    widths = [t[VAE + f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(n)]
    return dict(in_channels=t[VAE + "encoder.conv_in.weight"].shape[1], out_channels=t[VAE + "decoder.conv_out.weight"].shape[0],
                block_out_channels=widths, down_block_types=["DownEncoderBlock2D"] * n,
                up_block_types=["UpDecoderBlock2D"] * n, latent_channels=t[VAE + "decoder.conv_in.weight"].shape[1],
                layers_per_block=_count(t, re.escape(VAE + "encoder.down.0.block.") + r"(\d+)\."),
                norm_num_groups=min(32, widths[0]), sample_size=image_size,
                scaling_factor=0.13025 if arch == "sdxl" else 0.18215)


def _text_config(t: dict, prefix: str, kind: str, arch: str):
    from transformers import CLIPTextConfig

    if kind == "clip":
        tok = t[prefix + "embeddings.token_embedding.weight"]
        layers = _count(t, re.escape(prefix + "encoder.layers.") + r"(\d+)\.")
        mlp = t[prefix + "encoder.layers.0.mlp.fc1.weight"].shape[0]
        positions = t[prefix + "embeddings.position_embedding.weight"].shape[0]
        proj = tok.shape[1]
    else:
        tok = t[prefix + "token_embedding.weight"]
        layers = _count(t, re.escape(prefix + "transformer.resblocks.") + r"(\d+)\.")
        mlp = t[prefix + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        positions = t[prefix + "positional_embedding"].shape[0]
        proj = t[prefix + "text_projection"].shape[1] if prefix + "text_projection" in t else tok.shape[1]
        if arch == "sd2":
            layers -= 1  # SD2 conditions on OpenCLIP's penultimate layer (diffusers' SD2 configs: 23 of 24)
    hidden = tok.shape[1]
    return CLIPTextConfig(vocab_size=tok.shape[0], hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                          num_attention_heads=max(1, hidden // 64), max_position_embeddings=positions,
                          hidden_act="quick_gelu" if kind == "clip" else "gelu", projection_dim=proj,
                          bos_token_id=49406, eos_token_id=49407, pad_token_id=49407 if kind == "clip" else 0)


def _load_strict(module: torch.nn.Module, sd: dict, what: str, source: str) -> None:
    expected = set(module.state_dict())
    bad_extra = {k for k in sd if k not in expected}
    missing = expected - set(sd)
    if missing or bad_extra:
        raise UnsupportedCheckpoint(
            f"{source}: the {what} weights do not match the architecture inferred from them ("
            f"{len(missing)} missing, e.g. {sorted(missing)[:2]}; {len(bad_extra)} unexpected, e.g. {sorted(bad_extra)[:2]}); "
            f"expected an {SUPPORTED}")
    module.load_state_dict({k: v for k, v in sd.items() if k in expected}, strict=True)


def _text_encoder(t: dict, prefix: str, kind: str, cfg, with_projection: bool, source: str):
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)
    if kind == "clip":
        sd = {"text_model." + k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)}
    else:
        sd = convert_open_clip_checkpoint(model, t, prefix=prefix)
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    def unused(k: str) -> bool:  # SD2's last OpenCLIP layer, OpenCLIP's logit scale / unused projection
        m = re.search(r"layers\.(\d+)\.", k)
        return bool(m and int(m.group(1)) >= cfg.num_hidden_layers) or k.endswith(("position_ids", "logit_scale")) \
            or k.startswith("text_projection")
    _load_strict(model, {k: v for k, v in sd.items() if k in model.state_dict() or not unused(k)}, "text encoder",
                 source)
    return model


def _tokenizer(kind: str, max_length: int):
    from transformers import CLIPTokenizer

    from .default_model import DEFAULT_MODEL_DIR

    d = DEFAULT_MODEL_DIR / "tokenizer"
    kw = {"pad_token": "!"} if kind == "openclip" else {}
    return CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=max_length, **kw)


def load_single_file(path: str | Path, *, dtype: torch.dtype = torch.float32, prediction_type: str | None = None,
                     image_size: int | None = None):
    """A StableDiffusionPipeline / StableDiffusionXLPipeline from one ``.safetensors`` checkpoint.

    ``image_size`` (pixels) sets the training/sampling resolution (default: the architecture's native
    size); ``prediction_type`` ("epsilon" | "v_prediction") overrides the rule in the module docstring.
    Raises InvalidModelFile (pickle, corrupt file) or UnsupportedCheckpoint (naming the architecture)."""
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    p = Path(path)
    if p.suffix.lower() != ".safetensors":
        raise InvalidModelFile(f"{p}: single-file checkpoints must be .safetensors")
    tensors, _ = load_tensors(p)  # refuses pickles and corrupt files
    arch = detect_architecture(tensors, str(p))
    if prediction_type is None:
        prediction_type = "v_prediction" if ("v_pred" in tensors or arch == "sd2") else "epsilon"
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    size = image_size or (NATIVE_SIZE[arch] if arch != "sd2" or prediction_type == "v_prediction" else 512)

    encoders = TEXT_ENCODERS[arch]
    text_cfgs = [_text_config(tensors, pre, kind, arch) for pre, kind in encoders]
    vae_cfg = _vae_config(tensors, arch, size)
    vae_factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    unet_cfg = _unet_config(tensors, arch, text_cfgs, size, vae_factor)

    unet = UNet2DConditionModel.from_config(unet_cfg)
    _load_strict(unet, convert_ldm_unet_checkpoint(tensors, dict(unet.config)), "UNet", str(p))
    vae = AutoencoderKL.from_config(vae_cfg)
    _load_strict(vae, convert_ldm_vae_checkpoint(tensors, dict(vae.config)), "VAE", str(p))
    text = [_text_encoder(tensors, pre, kind, cfg, arch == "sdxl" and i == 1, str(p))
            for i, ((pre, kind), cfg) in enumerate(zip(encoders, text_cfgs))]
    toks = [_tokenizer(kind, cfg.max_position_embeddings) for (_, kind), cfg in zip(encoders, text_cfgs)]
    del tensors
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                          steps_offset=1, clip_sample=False, set_alpha_to_one=False, timestep_spacing="leading",
                          prediction_type=prediction_type)
    if arch == "sdxl":
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text[0], text_encoder_2=text[1], tokenizer=toks[0],
                                         tokenizer_2=toks[1], unet=unet, scheduler=sched,
                                         force_zeros_for_empty_prompt=True, add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text[0], tokenizer=toks[0], unet=unet, scheduler=sched,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if dtype != torch.float32:
        pipe = pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    logger.info("loaded %s single-file checkpoint %s (%s, %d px)", ARCH_NAMES[arch], p, prediction_type, size)
    return pipe
