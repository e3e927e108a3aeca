"""CLIP models from local files, in the three layouts users have, run by transformers' CLIP classes.

Accepted:

* a **transformers folder**: ``config.json`` (``model_type`` ``clip`` or ``clip_vision_model``) +
  ``model.safetensors`` (or a sharded ``model.safetensors.index.json``), optionally tokenizer files
  (``vocab.json`` + ``merges.txt`` or ``tokenizer.json``) and ``preprocessor_config.json``;
* a **single .safetensors file with transformers tensor names** (``vision_model.*``,
  ``visual_projection.weight``, optionally ``text_model.*``, ``text_projection.weight``), e.g. a
  ComfyUI ``clip_vision`` file; the architecture is read from the tensor shapes;
* a **single .safetensors file with open_clip / OpenAI tensor names** (``visual.conv1.weight``,
  ``visual.transformer.resblocks.*``, ``transformer.resblocks.*``, ``token_embedding.weight``, ...),
  e.g. HPSv2's checkpoint converted to safetensors; renamed to transformers names on load
  (:func:`convert_open_clip`), architecture read from the shapes.

Shape inference assumes what OpenAI and open_clip ViTs use: 64-wide attention heads, except the
image towers of ViT-H/g/bigG (widths 1280/1408/1664: 16 heads). The activation cannot be read from
shapes: callers say it (``quick_gelu`` for OpenAI's models, ``gelu`` for open_clip's LAION models);
when they do not, widths 768/1024 (OpenAI ViT-B/L) get ``quick_gelu`` and others ``gelu``. A
``config.json`` always wins over inference. Without tokenizer files beside the weights, the CLIP BPE
vocabulary shipped with this package is used (it is the same for OpenAI, LAION, PickScore and HPSv2
models: 49408 tokens); a model with another vocabulary size needs its own tokenizer files.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ...safe_io import InvalidModelFile, check_safetensors
from .files import (Shapes, check_shapes, ensure_head_dims, folder_weight_files, header_shapes, layer_count,
                    load_files, materialize, meta_tensors, module_shapes, shapes_of)
from .preprocess import CLIP_MEAN, CLIP_STD

logger = logging.getLogger(__name__)

#: The CLIP BPE tokenizer files shipped with the embedded default model (OpenAI CLIP's vocabulary).
PACKAGED_TOKENIZER = Path(__file__).resolve().parents[2] / "assets" / "default_model" / "tokenizer"
CLIP_VOCAB_SIZE = 49408
#: Image-tower widths whose attention heads are not 64 wide (open_clip ViT-H/14, ViT-g/14, ViT-bigG/14).
VISION_HEADS = {1280: 16, 1408: 16, 1664: 16}
OPENAI_WIDTHS = (768, 1024)

_V, _T = "vision_model.", "text_model."


# ------------------------------------------------------------------------------------ open_clip names
_BLOCK_NAMES = {"ln_1.": "layer_norm1.", "ln_2.": "layer_norm2.", "mlp.c_fc.": "mlp.fc1.",
                "mlp.c_proj.": "mlp.fc2.", "attn.out_proj.": "self_attn.out_proj."}


def _convert_block(out: dict[str, Tensor], prefix: str, rest: str, value: Tensor, original: str) -> None:
    index, _, name = rest.partition(".")
    p = f"{prefix}{index}."
    if name in ("attn.in_proj_weight", "attn.in_proj_bias"):  # nn.MultiheadAttention packs q, k, v
        kind = name.rsplit("_", 1)[1]
        for part, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
            out[f"{p}self_attn.{part}.{kind}"] = chunk
        return
    for old, new in _BLOCK_NAMES.items():
        if name.startswith(old):
            out[p + new + name[len(old):]] = value
            return
    out[original] = value  # unknown: reported as unexpected by the shape check


def convert_open_clip(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """open_clip / OpenAI CLIP tensor names -> transformers ``CLIPModel`` names (projections transposed).

    The mapping of transformers' ``convert_clip_original_pytorch_to_hf.py``; works on ``meta``
    tensors too (used to check shapes from a header).
    """
    out: dict[str, Tensor] = {}
    simple = {"visual.class_embedding": _V + "embeddings.class_embedding",
              "visual.positional_embedding": _V + "embeddings.position_embedding.weight",
              "visual.conv1.weight": _V + "embeddings.patch_embedding.weight",
              "token_embedding.weight": _T + "embeddings.token_embedding.weight",
              "positional_embedding": _T + "embeddings.position_embedding.weight",
              "logit_scale": "logit_scale"}
    for key, value in state_dict.items():
        if key in simple:
            out[simple[key]] = value
        elif key == "visual.proj":
            out["visual_projection.weight"] = value.t()
        elif key == "text_projection":
            out["text_projection.weight"] = value.t()
        elif key.startswith(("visual.ln_pre.", "visual.ln_post.", "ln_final.")):
            head, _, tail = key.rpartition(".")
            new = {"visual.ln_pre": _V + "pre_layrnorm", "visual.ln_post": _V + "post_layernorm",
                   "ln_final": _T + "final_layer_norm"}[head]
            out[f"{new}.{tail}"] = value
        elif key.startswith("visual.transformer.resblocks."):
            _convert_block(out, _V + "encoder.layers.", key[len("visual.transformer.resblocks."):], value, key)
        elif key.startswith("transformer.resblocks."):
            _convert_block(out, _T + "encoder.layers.", key[len("transformer.resblocks."):], value, key)
        elif key == "attn_mask":  # the causal mask buffer, rebuilt by transformers
            continue
        else:
            out[key] = value
    return out


# ------------------------------------------------------------------------------------ configs
def file_layout(shapes: Shapes) -> str | None:
    if _V + "embeddings.patch_embedding.weight" in shapes:
        return "transformers"
    if "visual.conv1.weight" in shapes:
        return "open_clip"
    return None


def infer_clip_config(shapes: Shapes, *, hidden_act: str | None, source: object):
    """A ``CLIPConfig`` from transformers-named tensor shapes (see the module docstring for the rules)."""
    from transformers import CLIPConfig

    width, _, patch, _ = shapes[_V + "embeddings.patch_embedding.weight"]
    positions = shapes[_V + "embeddings.position_embedding.weight"][0]
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1:
        raise InvalidModelFile(f"{source}: {positions} image positions is not 1 + a square number of patches")
    if "visual_projection.weight" not in shapes:
        raise InvalidModelFile(f"{source}: CLIP image tower without visual_projection.weight (a CLIPVisionModel "
                               "without projection); image embeddings need the projection")
    projection = shapes["visual_projection.weight"][0]
    heads = VISION_HEADS.get(width, width // 64)
    ensure_head_dims(width, heads, "image tower", source)
    act = hidden_act or ("quick_gelu" if width in OPENAI_WIDTHS else "gelu")
    vision = dict(hidden_size=width, intermediate_size=shapes[_V + "encoder.layers.0.mlp.fc1.weight"][0],
                  num_hidden_layers=layer_count(shapes, _V + "encoder.layers."), num_attention_heads=heads,
                  image_size=grid * patch, patch_size=patch, projection_dim=projection, hidden_act=act)
    text = {}
    if _T + "embeddings.token_embedding.weight" in shapes:
        vocab, twidth = shapes[_T + "embeddings.token_embedding.weight"]
        ensure_head_dims(twidth, twidth // 64, "text tower", source)
        text = dict(vocab_size=vocab, hidden_size=twidth,
                    intermediate_size=shapes[_T + "encoder.layers.0.mlp.fc1.weight"][0],
                    num_hidden_layers=layer_count(shapes, _T + "encoder.layers."), num_attention_heads=twidth // 64,
                    max_position_embeddings=shapes[_T + "embeddings.position_embedding.weight"][0],
                    projection_dim=projection, hidden_act=act, eos_token_id=CLIP_VOCAB_SIZE - 1)
    return CLIPConfig(text_config=text or None, vision_config=vision, projection_dim=projection)


def _folder_config(folder: Path):
    from transformers import CLIPConfig, CLIPVisionConfig

    try:
        raw = json.loads((folder / "config.json").read_text())
    except ValueError as e:
        raise InvalidModelFile(f"{folder}/config.json: not JSON ({e})") from None
    kind = raw.get("model_type")
    if kind == "clip":
        return CLIPConfig.from_pretrained(str(folder), local_files_only=True)
    if kind == "clip_vision_model":
        vision = CLIPVisionConfig.from_pretrained(str(folder), local_files_only=True)
        return CLIPConfig(vision_config=vision.to_dict(), projection_dim=vision.projection_dim)
    raise InvalidModelFile(f"{folder}/config.json describes a {kind!r} model; a CLIP model "
                           "(model_type 'clip' or 'clip_vision_model') is expected")


def describe(config, vision_only: bool = False) -> str:
    v, t = config.vision_config, config.text_config
    text = "" if vision_only else f" and a {t.num_hidden_layers}-layer, {t.hidden_size}-wide text tower"
    return (f"CLIP with a {v.num_hidden_layers}-layer, {v.hidden_size}-wide ViT ({v.patch_size}-px patches, "
            f"{v.image_size} px, {v.hidden_act}){text}, {config.projection_dim}-d embeddings")


def build(config, vision_only: bool) -> nn.Module:
    """transformers ``CLIPModel``, or ``CLIPVisionModelWithProjection`` for image features only."""
    from transformers import CLIPModel, CLIPVisionModelWithProjection

    if vision_only:
        vision = copy.deepcopy(config.vision_config)
        vision.projection_dim = config.projection_dim
        return CLIPVisionModelWithProjection(vision)
    return CLIPModel(config)


# ------------------------------------------------------------------------------------ one model
@dataclass
class ClipPlan:
    """A checked CLIP source: what to load and how to run it."""

    path: Path
    weight_files: list[Path]
    layout: str
    config: object
    vision_only: bool
    tokenizer_dir: Path
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def image_size(self) -> int:
        return int(self.config.vision_config.image_size)


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())


def inspect(path: Path, *, need_text: bool, hidden_act: str | None = None) -> ClipPlan:
    """Check a CLIP folder or file against its architecture, reading headers only."""
    mean, std = CLIP_MEAN, CLIP_STD
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InvalidModelFile(f"{path}: a CLIP folder needs config.json and model.safetensors (transformers format)")
        config = _folder_config(path)
        weight_files = folder_weight_files(path)
        shapes = shapes_of(weight_files)
        layout = "transformers"
        pre = path / "preprocessor_config.json"
        if pre.is_file():
            raw = json.loads(pre.read_text())
            mean, std = tuple(raw.get("image_mean", mean)), tuple(raw.get("image_std", std))
        tokenizer_dir = path if _has_tokenizer(path) else None
    else:
        weight_files = [check_safetensors(path)]
        shapes = header_shapes(path)
        layout = file_layout(shapes)
        if layout is None:
            raise InvalidModelFile(f"{path}: not a CLIP model: expected tensors named vision_model.* (transformers) "
                                   f"or visual.conv1.weight, visual.transformer.* (open_clip); found e.g. {sorted(shapes)[:3]}")
        if layout == "open_clip":
            shapes = {k: tuple(t.shape) for k, t in convert_open_clip(meta_tensors(shapes)).items()}
        config = infer_clip_config(shapes, hidden_act=hidden_act, source=path)
        tokenizer_dir = path.parent if _has_tokenizer(path.parent) else None
    has_text = _T + "embeddings.token_embedding.weight" in shapes
    if need_text and not has_text:
        raise InvalidModelFile(f"{path}: holds only CLIP's image tower; this reward needs the text tower too "
                               "(a full CLIP model)")
    vision_only = not need_text
    if vision_only:
        shapes = {k: s for k, s in shapes.items() if k.startswith(_V) or k == "visual_projection.weight"}
    with torch.device("meta"):
        expected = module_shapes(build(config, vision_only))
    check_shapes(expected, shapes, source=path, architecture=describe(config, vision_only),
                 ignore=lambda k: k.endswith("position_ids"))
    if need_text and tokenizer_dir is None and config.text_config.vocab_size != CLIP_VOCAB_SIZE:
        raise InvalidModelFile(f"{path}: the text tower has {config.text_config.vocab_size} tokens, not CLIP's "
                               f"{CLIP_VOCAB_SIZE}; put its tokenizer files (vocab.json + merges.txt) beside it")
    return ClipPlan(path=path, weight_files=weight_files, layout=layout, config=config, vision_only=vision_only,
                    tokenizer_dir=tokenizer_dir or PACKAGED_TOKENIZER, mean=mean, std=std)


def load(plan: ClipPlan, device: torch.device, dtype: torch.dtype) -> nn.Module:
    with torch.device("meta"):
        model = build(plan.config, plan.vision_only)
    tensors = load_files(plan.weight_files)
    if plan.layout == "open_clip":
        tensors = convert_open_clip(tensors)
    wanted = model.state_dict().keys()
    return materialize(model, {k: v for k, v in tensors.items() if k in wanted}, device=device, dtype=dtype)


def tokenizer(plan: ClipPlan):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(plan.tokenizer_dir), local_files_only=True)
    tok.model_max_length = int(plan.config.text_config.max_position_embeddings)
    if len(tok) > plan.config.text_config.vocab_size:
        raise InvalidModelFile(f"{plan.tokenizer_dir}: tokenizer has {len(tok)} tokens but the model only "
                               f"{plan.config.text_config.vocab_size}")
    return tok


def image_embeds(model: nn.Module, pixels: Tensor) -> Tensor:
    """Projected image embeddings (not normalised) of ``CLIPModel`` or ``CLIPVisionModelWithProjection``."""
    return model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)


def text_embeds(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    return model.text_projection(model.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output)


# ------------------------------------------------------------------------------------ finding CLIPs
def summary(path: Path) -> dict | None:
    """Cheap facts about a CLIP candidate (folder or file) from its config/header; None if not CLIP."""
    try:
        if path.is_dir():
            if not (path / "config.json").is_file():
                return None
            raw = json.loads((path / "config.json").read_text())
            if raw.get("model_type") not in ("clip", "clip_vision_model"):
                return None
            vision = raw.get("vision_config", raw)
            return {"has_text": raw.get("model_type") == "clip",
                    "projection": raw.get("projection_dim", vision.get("projection_dim")),
                    "image_size": vision.get("image_size", 224)}
        if path.suffix.lower() != ".safetensors":
            return None
        shapes = header_shapes(path)
    except (InvalidModelFile, OSError, ValueError):
        return None
    layout = file_layout(shapes)
    if layout == "transformers":
        proj = shapes.get("visual_projection.weight", (None,))[0]
        has_text = _T + "embeddings.token_embedding.weight" in shapes
        patch, positions = shapes[_V + "embeddings.patch_embedding.weight"][2], shapes[_V + "embeddings.position_embedding.weight"][0]
    elif layout == "open_clip":
        proj = shapes.get("visual.proj", (None, None))[1]
        has_text = "token_embedding.weight" in shapes
        patch, positions = shapes["visual.conv1.weight"][2], shapes["visual.positional_embedding"][0]
    else:
        return None
    return {"has_text": has_text, "projection": proj, "image_size": math.isqrt(max(positions - 1, 0)) * patch}


def candidates(folder: Path, *, need_text: bool, exclude: tuple[Path, ...] = ()) -> list[Path]:
    """CLIP models in ``folder``: the folder itself if it is a transformers folder, else its CLIP
    subfolders and CLIP .safetensors files (recognised by their tensor names)."""
    if not folder.is_dir():
        return []
    if (folder / "config.json").is_file():
        found = [folder]
    else:
        found = sorted(p for p in folder.iterdir() if p not in exclude and (p.is_dir() or p.suffix.lower() == ".safetensors"))
    out = []
    for p in found:
        s = summary(p)
        if s is not None and (s["has_text"] or not need_text):
            out.append(p)
    return out


def find(reward: str, explicit: Path | None, roots: list[Path], *, need_text: bool, layout: str,
         hidden_act: str | None = None) -> ClipPlan:
    """The one CLIP model of a reward: ``explicit`` (a CLIP folder/file, or a folder to search), else
    the reward's folders under ``roots``. Several candidates in one folder are an error (keep one)."""
    from .locate import candidate_dirs, missing, refuse_pickles

    if explicit is not None:
        if explicit.is_file() or (explicit / "config.json").is_file():
            return inspect(explicit, need_text=need_text, hidden_act=hidden_act)
        searched = [explicit]
    else:
        searched = candidate_dirs(reward, roots)
    for folder in (d for d in searched if d.is_dir()):
        found = candidates(folder, need_text=need_text)
        if len(found) > 1:
            raise InvalidModelFile(f"{folder}: several CLIP models ({', '.join(p.name for p in found)}); keep one "
                                   f"for reward {reward!r} or pass path=")
        if found:
            return inspect(found[0], need_text=need_text, hidden_act=hidden_act)
        if (folder / "config.json").is_file():  # a transformers folder of another model: let inspect say which
            inspect(folder, need_text=need_text, hidden_act=hidden_act)
        refuse_pickles(folder)
        others = sorted(folder.glob("*.safetensors"))
        if others:  # a file that is not (the right) CLIP: let inspect say why
            inspect(others[0], need_text=need_text, hidden_act=hidden_act)
    raise missing(reward, searched, layout)
