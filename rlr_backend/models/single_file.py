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
   extra tensor, or one of another shape, is an error naming the file's key and the diffusers one, never
   silently random-initialised.

All of this runs on the header's shapes (meta tensors) before any data is read; then the modules,
built on the meta device, receive each tensor read and cast to its target dtype on its own
(:mod:`rlr_backend.models.weights`), so the load's peak memory is about the loaded model's size.

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

from ..safe_io import InvalidModelFile
from .weights import assign_weights, check_memory, empty_weights, header_tensors, read_tensors, tensor_bytes

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
        from .flow_detect import flow_transformer_kind

        flow = flow_transformer_kind(tensors)
        if flow:
            raise UnsupportedCheckpoint(f"{source}: a {flow} transformer-only file (ComfyUI models/diffusion_models "
                                        "layout): load it with its text encoder and VAE files (models.loader, "
                                        "--text-encoder FILE --vae FILE), or give the model's diffusers folder")
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


def _vae_config(t: dict, arch: str, image_size: int, prefix: str = VAE) -> dict:
    n = _count(t, re.escape(prefix + "encoder.down.") + r"(\d+)\.block\.0\.conv1\.weight")
    widths = [t[prefix + f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(n)]
    return dict(in_channels=t[prefix + "encoder.conv_in.weight"].shape[1], out_channels=t[prefix + "decoder.conv_out.weight"].shape[0],
                block_out_channels=widths, down_block_types=["DownEncoderBlock2D"] * n,
                up_block_types=["UpDecoderBlock2D"] * n, latent_channels=t[prefix + "decoder.conv_in.weight"].shape[1],
                layers_per_block=_count(t, re.escape(prefix + "encoder.down.0.block.") + r"(\d+)\."),
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


class _Traced(torch.Tensor):
    """A meta tensor that remembers the file key it came from through any operation (slicing, transposes,
    splits, copies), so a converted diffusers key can be traced back to the key in the user's file."""

    src: str

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = super().__torch_function__(func, types, args, kwargs)
        flat = [b for a in (*args, *kwargs.values()) for b in (a if isinstance(a, (list, tuple)) else (a,))]
        src = next((b.src for b in flat if isinstance(b, _Traced) and hasattr(b, "src")), None)
        if src is not None:
            for o in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(o, _Traced):
                    o.src = src
        return out


def _traced(shapes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in shapes.items():
        t = v.as_subclass(_Traced)
        t.src = k
        out[k] = t
    return out


def _text_state(t: dict, prefix: str, kind: str, model, cfg) -> dict[str, torch.Tensor]:
    """A text encoder's tensors under ``model``'s names, without the ones SD checkpoints carry but the model
    does not use (SD2's last OpenCLIP layer, OpenCLIP's logit scale and unused projection, position ids)."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    if kind == "clip":
        sd = {"text_model." + k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)}
    else:
        sd = convert_open_clip_checkpoint(model, t, prefix=prefix)
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    expected = model.state_dict()

    def unused(k: str) -> bool:
        m = re.search(r"layers\.(\d+)\.", k)
        return bool(m and int(m.group(1)) >= cfg.num_hidden_layers) or k.endswith(("position_ids", "logit_scale")) \
            or k.startswith("text_projection")
    return {k: v for k, v in sd.items() if k in expected or not unused(k)}


class _Part:
    """One component of a single-file checkpoint: its module (built on the meta device), the file prefix
    its tensors live under, and how its keys convert to the module's."""

    def __init__(self, name: str, module: torch.nn.Module, prefix: str, convert, dtype: torch.dtype,
                 expected: str = f"an {SUPPORTED}", fp32_keys: tuple[str, ...] = ()):
        self.name, self.module, self.prefix, self.convert, self.dtype = name, module, prefix, convert, dtype
        self.expected = expected
        #: module keys containing one of these stay float32 in fp16 (T5's ``wo``, as transformers keeps them)
        self.fp32_keys = fp32_keys if dtype == torch.float16 else ()

    def dtype_of(self, key: str) -> torch.dtype:
        return torch.float32 if any(f in key for f in self.fp32_keys) else self.dtype

    def check(self, traced: dict[str, torch.Tensor], source: str) -> dict[str, str]:
        """Check every key and shape on the meta tensors (nothing read yet); returns module key -> file key.
        Errors name the file's key, the module's key and the shapes."""
        state = self.convert(traced)
        expected = self.module.state_dict()
        extra = sorted(k for k in state if k not in expected)
        missing = sorted(k for k in expected if k not in state)
        if missing or extra:
            what = []
            if missing:
                what.append(f"{len(missing)} {self.name} tensor(s) have no tensor in the file, e.g. {missing[0]!r}")
            if extra:
                what.append(f"{len(extra)} tensor(s) of the file have no place in the {self.name}, e.g. "
                            f"{state[extra[0]].src!r} (as {extra[0]!r})")
            raise UnsupportedCheckpoint(f"{source}: the {self.name} weights do not match the architecture inferred "
                                        f"from them ({'; '.join(what)}); expected {self.expected}")
        for key, t in state.items():
            want = tuple(expected[key].shape)
            if tuple(t.shape) != want:
                file_shape = list(traced[t.src].shape)
                conv = f", converted to {list(t.shape)}" if list(t.shape) != file_shape else ""
                raise UnsupportedCheckpoint(f"{source}: tensor {t.src!r} has shape {file_shape}{conv}, but the "
                                            f"{self.name} needs {list(want)} there ({self.name} {key!r}); the file is "
                                            "damaged or mixes parts of different models")
        return {k: t.src for k, t in state.items()}

    def load(self, path: Path, sources: dict[str, str]) -> None:
        """Read this part's tensors (in its dtype), convert them and hand them to the module."""
        real = read_tensors(path, {src: self.dtype_of(key) for key, src in sources.items()})
        state = self.convert(real)
        del real  # tensors the conversion copied (OpenCLIP's fused q/k/v) are freed once assigned
        assign_weights(self.module, {k: state[k] for k in sources})


def _tokenizer(kind: str, max_length: int):
    from transformers import CLIPTokenizer

    from .default_model import DEFAULT_MODEL_DIR

    d = DEFAULT_MODEL_DIR / "tokenizer"
    kw = {"pad_token": "!"} if kind == "openclip" else {}
    return CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=max_length, **kw)


def load_single_file(path: str | Path, *, dtype: torch.dtype = torch.float32, text_encoder_dtype: torch.dtype | None = None,
                     prediction_type: str | None = None, image_size: int | None = None):
    """A StableDiffusionPipeline / StableDiffusionXLPipeline from one ``.safetensors`` checkpoint.

    The UNet and the VAE are loaded in ``dtype``, the text encoders in ``text_encoder_dtype`` (default:
    ``dtype``), each tensor read and cast on its own (:mod:`rlr_backend.models.weights`): peak memory is
    the loaded model plus one tensor. Every key and shape is checked against the inferred architecture
    before any data is read, and the memory the load needs against the memory available.
    ``image_size`` (pixels) sets the training/sampling resolution (default: the architecture's native
    size); ``prediction_type`` ("epsilon" | "v_prediction") overrides the rule in the module docstring.
    Raises InvalidModelFile (pickle, corrupt file), UnsupportedCheckpoint (naming the architecture or the
    file's tensor that does not fit) or NotEnoughMemory."""
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    p = Path(path)
    if p.suffix.lower() != ".safetensors":
        raise InvalidModelFile(f"{p}: single-file checkpoints must be .safetensors")
    shapes = header_tensors(p)  # refuses pickles and damaged files; no data read
    arch = detect_architecture(shapes, str(p))
    if prediction_type is None:
        prediction_type = "v_prediction" if ("v_pred" in shapes or arch == "sd2") else "epsilon"
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    size = image_size or (NATIVE_SIZE[arch] if arch != "sd2" or prediction_type == "v_prediction" else 512)
    text_dtype = text_encoder_dtype or dtype

    encoders = TEXT_ENCODERS[arch]
    try:
        text_cfgs = [_text_config(shapes, pre, kind, arch) for pre, kind in encoders]
        vae_cfg = _vae_config(shapes, arch, size)
        vae_factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
        unet_cfg = _unet_config(shapes, arch, text_cfgs, size, vae_factor)
    except (KeyError, StopIteration, IndexError) as e:
        key = e.args[0] if isinstance(e, KeyError) and e.args else "a tensor the architecture needs"
        raise UnsupportedCheckpoint(f"{p}: the {ARCH_NAMES[arch]} checkpoint lacks {key!r}; expected an "
                                    f"{SUPPORTED}") from None

    with empty_weights():
        unet = UNet2DConditionModel.from_config(unet_cfg)
        vae = AutoencoderKL.from_config(vae_cfg)
        text = [(CLIPTextModelWithProjection if arch == "sdxl" and i == 1 else CLIPTextModel)(cfg)
                for i, cfg in enumerate(text_cfgs)]
    parts = [_Part("UNet", unet, U, lambda t: convert_ldm_unet_checkpoint(t, dict(unet.config)), dtype),
             _Part("VAE", vae, VAE, lambda t: convert_ldm_vae_checkpoint(t, dict(vae.config)), dtype)]
    for i, ((pre, kind), cfg) in enumerate(zip(encoders, text_cfgs)):
        name = "text encoder" if len(encoders) == 1 else f"text encoder {i + 1}"
        parts.append(_Part(name, text[i], pre, lambda t, pre=pre, kind=kind, m=text[i], cfg=cfg:
                           _text_state(t, pre, kind, m, cfg), text_dtype))
    traced = _traced(shapes)
    sources = [part.check(traced, str(p)) for part in parts]
    needed = sum(tensor_bytes((shapes[k] for k in set(src.values())), lambda t, d=part.dtype: d)
                 for part, src in zip(parts, sources))
    check_memory(needed, f"{p.name} ({ARCH_NAMES[arch]}, {needed / 1e9:.1f} GB of weights)")
    for part, src in zip(parts, sources):
        part.load(p, src)

    toks = [_tokenizer(kind, cfg.max_position_embeddings) for (_, kind), cfg in zip(encoders, text_cfgs)]
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
    pipe.set_progress_bar_config(disable=True)
    logger.info("loaded %s single-file checkpoint %s (%s, %d px; UNet/VAE %s, text encoders %s)", ARCH_NAMES[arch], p,
                prediction_type, size, str(dtype).split(".")[-1], str(text_dtype).split(".")[-1])
    return pipe
