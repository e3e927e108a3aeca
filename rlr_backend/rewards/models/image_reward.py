"""ImageReward (Xu et al. 2023): BLIP's ViT + BERT cross-attention encoder + an MLP, on transformers' BLIP.

The reference is ``ImageReward.score`` / ``score_gard`` at
https://github.com/THUDM/ImageReward/blob/0f5fa3e286577d412aea3e1b02c7fadcdb4d3996/ImageReward/ImageReward.py:

1. image -> BLIP ViT (``blip.visual_encoder``, ViT-L/16 at 224 px) -> all tokens, final LayerNorm;
2. prompt -> BERT tokens (bert-base-uncased, padded/truncated to 35) -> ``blip.text_encoder`` with
   cross-attention to the image tokens (BLIP's "multimodal" mode: bidirectional self-attention);
3. the [CLS] output -> ``mlp`` (the aesthetic-predictor MLP on 768-d) -> ``(r - mean) / std`` with
   ImageReward's constants mean 0.16717362830052426, std 1.0333394966054072.

transformers has the same blocks: ``BlipVisionModel`` (BLIP's ViT, renamed as transformers'
``convert_blip_original_pytorch_to_hf.py`` renames it) and ``BlipTextModel`` (ported from BLIP's
``med.py``: same tensor names; built with ``is_decoder=True`` so it has the cross-attention, called
with ``is_decoder=False`` as ``BlipForImageTextRetrieval`` does).

Accepted weights: ``ImageReward.safetensors``, the ``state_dict`` of THUDM's ``ImageReward.pt``
converted to safetensors with its original names (``blip.visual_encoder.*``, ``blip.text_encoder.*``,
``mlp.layers.*``; other tensors such as ``blip.vision_proj`` are ignored), plus bert-base-uncased's
``vocab.txt`` beside it. The architecture is read from the tensor shapes (64-wide attention heads, as
BLIP's ViT-B/L and BERT-base have). Not supported: ImageReward's ``med_config.json`` variants with
other head widths, and the ReFL training code.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from torch import Tensor, nn

from ...safe_io import InvalidModelFile, check_safetensors
from .aesthetic import AestheticMLP, check_head
from .files import (Shapes, check_shapes, ensure_head_dims, header_shapes, layer_count, load_files, materialize,
                    meta_tensors, module_shapes)
from .local import LocalModelReward
from .locate import candidate_dirs, missing, refuse_pickles
from .preprocess import clip_pixels

MEAN, STD = 0.16717362830052426, 1.0333394966054072
MAX_TOKENS = 35
WEIGHTS_FILE = "ImageReward.safetensors"
LAYOUT = (f"{WEIGHTS_FILE} (the state_dict of THUDM's ImageReward.pt converted to safetensors, original tensor "
          "names) and bert-base-uncased's vocab.txt beside it")
ARCHITECTURE = ("ImageReward: BLIP ViT (blip.visual_encoder.*), BERT encoder with cross-attention "
                "(blip.text_encoder.*), MLP head (mlp.layers.*)")

_VIS, _TXT = "blip.visual_encoder.", "blip.text_encoder."


def _vit_name(name: str) -> str:
    """A BLIP/timm ViT tensor name -> ``BlipVisionModel``'s."""
    fixed = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
             "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
             "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
             "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}
    if name in fixed:
        return fixed[name]
    if name.startswith("blocks."):
        index, _, rest = name[len("blocks."):].partition(".")
        for old, new in (("norm1.", "layer_norm1."), ("norm2.", "layer_norm2."), ("attn.qkv.", "self_attn.qkv."),
                         ("attn.proj.", "self_attn.projection."), ("mlp.", "mlp.")):
            if rest.startswith(old):
                return f"encoder.layers.{index}.{new}{rest[len(old):]}"
    return "?" + name  # unknown: reported as unexpected


def convert_image_reward(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """ImageReward.pt names -> :class:`ImageRewardModel` names (works on meta tensors too).

    Only the three parts the score uses are kept (ImageReward's own loader is ``strict=False``, so
    other tensors in the file, e.g. ``blip.vision_proj``, are not an error); inside them, every
    tensor must fit.
    """
    out = {}
    for key, value in state_dict.items():
        if key.startswith(_VIS):
            out["vision_model." + _vit_name(key[len(_VIS):])] = value
        elif key.startswith(_TXT):
            if not key.endswith("position_ids"):
                out["text_encoder." + key[len(_TXT):]] = value
        elif key.startswith("mlp."):
            out[key] = value
    return out


def is_image_reward(shapes: Shapes) -> bool:
    return _VIS + "patch_embed.proj.weight" in shapes and "mlp.layers.0.weight" in shapes


def infer_configs(shapes: Shapes, source: object):
    """``(BlipVisionConfig, BlipTextConfig)`` from converted tensor shapes."""
    from transformers import BlipTextConfig, BlipVisionConfig

    v, t = "vision_model.", "text_encoder."
    try:
        width, _, patch, _ = shapes[v + "embeddings.patch_embedding.weight"]
        positions = shapes[v + "embeddings.position_embedding"][1]
        vocab, hidden = shapes[t + "embeddings.word_embeddings.weight"]
        cross_in = shapes[t + "encoder.layer.0.crossattention.self.key.weight"][1]
        grid = int(round((positions - 1) ** 0.5))
        ensure_head_dims(width, width // 64, "BLIP ViT", source)
        ensure_head_dims(hidden, hidden // 64, "BERT text encoder", source)
        vision = BlipVisionConfig(hidden_size=width, intermediate_size=shapes[v + "encoder.layers.0.mlp.fc1.weight"][0],
                                  num_hidden_layers=layer_count(shapes, v + "encoder.layers."),
                                  num_attention_heads=width // 64, image_size=grid * patch, patch_size=patch,
                                  layer_norm_eps=1e-6, hidden_act="gelu")  # BLIP's ViT: LayerNorm eps 1e-6
        text = BlipTextConfig(vocab_size=vocab, hidden_size=hidden, encoder_hidden_size=cross_in,
                              intermediate_size=shapes[t + "encoder.layer.0.intermediate.dense.weight"][0],
                              num_hidden_layers=layer_count(shapes, t + "encoder.layer."),
                              num_attention_heads=hidden // 64,
                              max_position_embeddings=shapes[t + "embeddings.position_embeddings.weight"][0],
                              layer_norm_eps=1e-12, hidden_act="gelu", is_decoder=True,
                              bos_token_id=None, eos_token_id=None, sep_token_id=None, pad_token_id=0)
    except (KeyError, ValueError) as e:
        raise InvalidModelFile(f"{source}: not {ARCHITECTURE}: cannot read the architecture ({e!r} missing or odd)") from None
    if grid * grid + 1 != positions:
        raise InvalidModelFile(f"{source}: {positions} image positions is not 1 + a square number of patches")
    return vision, text


class ImageRewardModel(nn.Module):
    """BLIP vision tower + BERT cross-attention encoder + MLP; returns the normalised reward (B,)."""

    def __init__(self, vision_config, text_config):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.vision_model = BlipVisionModel(vision_config)
        self.text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = AestheticMLP(text_config.hidden_size)

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        image_tokens = self.vision_model(pixel_values=pixel_values).last_hidden_state
        text = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                 encoder_hidden_states=image_tokens, is_decoder=False).last_hidden_state
        return ((self.mlp(text[:, 0]) - MEAN) / STD).squeeze(-1)


class ImageReward(LocalModelReward):
    """ImageReward's human-preference score of image and prompt (about -2 to 2); differentiable.

    Args:
        path: ``ImageReward.safetensors`` or a folder holding it and ``vocab.txt`` (default:
            ``<root>/image_reward/``). ``vocab.txt`` is read from the weights' folder or its
            ``tokenizer/`` subfolder.
    """

    name = "image_reward"

    def _find(self) -> Path:
        if self.path is not None and self.path.is_file():
            return check_safetensors(self.path)
        searched = [self.path] if self.path is not None else candidate_dirs(self.name, self.roots())
        for folder in (d for d in searched if d.is_dir()):
            files = sorted(folder.glob("*.safetensors"))
            found = [p for p in files if is_image_reward(header_shapes(p))]
            if len(found) > 1:
                raise InvalidModelFile(f"{folder}: several ImageReward files ({', '.join(p.name for p in found)}); "
                                       "keep one or pass path=")
            if found:
                return found[0]
            refuse_pickles(folder)
            if files:
                raise InvalidModelFile(f"{files[0]}: not {ARCHITECTURE} (no {_VIS}patch_embed.proj.weight and "
                                       "mlp.layers.0.weight tensors)")
        raise missing(self.name, searched, LAYOUT)

    def _check(self) -> SimpleNamespace:
        path = self._find()
        raw = header_shapes(path)
        if not is_image_reward(raw):
            raise InvalidModelFile(f"{path}: not {ARCHITECTURE}")
        shapes = {k: tuple(x.shape) for k, x in convert_image_reward(meta_tensors(raw)).items()}
        vision, text = infer_configs(shapes, path)
        check_head(path, shapes, prefix="mlp.")
        with torch.device("meta"):
            expected = module_shapes(ImageRewardModel(vision, text))
        description = (f"{ARCHITECTURE}, inferred: ViT {vision.num_hidden_layers} layers x {vision.hidden_size} "
                       f"({vision.image_size} px, {vision.patch_size}-px patches), BERT {text.num_hidden_layers} "
                       f"layers x {text.hidden_size}")
        check_shapes(expected, shapes, source=path, architecture=description)
        vocab = next((d / "vocab.txt" for d in (path.parent, path.parent / "tokenizer") if (d / "vocab.txt").is_file()), None)
        if vocab is None:
            raise missing(self.name, [path.parent, path.parent / "tokenizer"],
                          f"bert-base-uncased's vocab.txt beside {path.name}; " + LAYOUT)
        return SimpleNamespace(files={"weights": path, "vocab": vocab}, vision=vision, text=text)

    def _load(self, plan: SimpleNamespace) -> None:
        from transformers import BertTokenizer

        with torch.device("meta"):
            model = ImageRewardModel(plan.vision, plan.text)
        tensors = convert_image_reward(load_files([plan.files["weights"]]))
        self.model = materialize(model, tensors, device=self.device, dtype=self.dtype)
        vocab = plan.files["vocab"]
        self.tokenizer = BertTokenizer.from_pretrained(str(vocab.parent), local_files_only=True)
        if len(self.tokenizer) > plan.text.vocab_size:
            raise InvalidModelFile(f"{vocab}: {len(self.tokenizer)} tokens, more than the model's "
                                   f"{plan.text.vocab_size}; use bert-base-uncased's vocab.txt")

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        tok = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        pixels = clip_pixels(images, int(self._plan.vision.image_size))
        return self.model(pixels, tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)).float()
