"""Rewards that are a scaled cosine similarity of CLIP image and prompt embeddings.

=============  ======================================  =========================================
reward         model                                   value
=============  ======================================  =========================================
clip_score     any CLIP                                ``scale * cos`` (``scale`` 2.5: CLIPScore of
                                                       Hessel et al. 2021, without its clamp at 0)
pickscore      PickScore_v1 (CLIP ViT-H/14 fine-tuned  ``logit_scale.exp() * cos`` (PickScore's
               on Pick-a-Pic)                          README; about 18-23 for real images)
hpsv2          HPS v2 / v2.1 (open_clip ViT-H/14       ``cos`` (``hpsv2.score``: normalised features,
               fine-tuned on HPD v2)                   no logit scale; about 0.2-0.3)
=============  ======================================  =========================================

Images go through CLIP's resize/centre-crop/normalise (:mod:`.preprocess`); prompts through the
CLIP tokenizer, truncated at the model's 77 positions. Prompt embeddings never need a gradient and
are cached per prompt (each prompt is encoded alone, so its embedding does not depend on the batch).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from . import clip
from .local import LocalModelReward
from .preprocess import clip_pixels

_CACHE_LIMIT = 4096


class ClipSimilarity(LocalModelReward):
    """Base: ``scale * cos(image embedding, prompt embedding)``; subclasses set the scale and layout."""

    #: activation assumed for single-file weights without config.json (None: by width, see ``clip``)
    hidden_act: str | None = None
    #: what the folder should hold (for the missing-weights error)
    layout = "a CLIP model"

    def _check(self) -> clip.ClipPlan:
        plan = clip.find(self.name, self.path, self.roots(), need_text=True, layout=self.layout,
                         hidden_act=self.hidden_act)
        plan.files = {"clip": plan.path}
        return plan

    def _load(self, plan: clip.ClipPlan) -> None:
        self.model = clip.load(plan, self.device, self.dtype)
        self.tokenizer = clip.tokenizer(plan)
        self._text_cache: dict[str, Tensor] = {}

    def scale(self) -> Tensor | float:
        raise NotImplementedError

    def text_features(self, prompts: list[str]) -> Tensor:
        """Unit-norm prompt embeddings (B, D), float32, no gradient."""
        new = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if len(self._text_cache) + len(new) > _CACHE_LIMIT:
            self._text_cache.clear()
            new = list(dict.fromkeys(prompts))
        with torch.no_grad():
            for p in new:
                tok = self.tokenizer([p], truncation=True, max_length=self.tokenizer.model_max_length,
                                     return_tensors="pt")
                emb = clip.text_embeds(self.model, tok["input_ids"].to(self.device),
                                       tok["attention_mask"].to(self.device))
                self._text_cache[p] = F.normalize(emb.float(), dim=-1)[0]
        return torch.stack([self._text_cache[p] for p in prompts])

    def image_features(self, images: Tensor) -> Tensor:
        """Unit-norm image embeddings (B, D), float32; differentiable in ``images`` (in [0, 1])."""
        plan = self._plan
        pixels = clip_pixels(images, plan.image_size, plan.mean, plan.std)
        return F.normalize(clip.image_embeds(self.model, pixels).float(), dim=-1)

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        cos = (self.image_features(images) * self.text_features(prompts)).sum(-1)
        return self.scale() * cos


class ClipScore(ClipSimilarity):
    """CLIP score of any local CLIP model: ``scale * cos`` (default scale 2.5, as CLIPScore).

    ``path``: a transformers CLIP folder, or one .safetensors file with transformers or open_clip
    tensor names (single files: the activation is guessed from the width, see :mod:`.clip`).
    """

    name = "clip_score"
    layout = ("a CLIP model: a transformers folder (config.json + model.safetensors [+ vocab.json, merges.txt]), "
              "e.g. openai/clip-vit-large-patch14, or one .safetensors file with transformers or open_clip tensor names")

    def __init__(self, path: str | Path | None = None, *, scale: float = 2.5, **kwargs):
        super().__init__(path, **kwargs)
        self._scale = float(scale)

    def scale(self) -> float:
        return self._scale


class PickScore(ClipSimilarity):
    """PickScore (Kirstain et al. 2023): ``logit_scale.exp() * cos`` with the model's own logit scale.

    ``path``: the transformers folder of ``yuvalkirstain/PickScore_v1`` (config.json +
    model.safetensors; tokenizer files optional, CLIP's BPE is the default).
    """

    name = "pickscore"
    layout = ("PickScore_v1 as a transformers folder: config.json + model.safetensors (of "
              "yuvalkirstain/PickScore_v1; tokenizer files optional)")

    def scale(self) -> Tensor:
        return self.model.logit_scale.detach().float().exp()


class HPSv2(ClipSimilarity):
    """Human Preference Score v2 / v2.1 (Wu et al. 2023): ``cos`` of open_clip ViT-H/14 features.

    ``path``: ``HPS_v2.1_compressed.safetensors`` (or v2), the open_clip ``state_dict`` of HPSv2's
    checkpoint converted to safetensors (docs/rewards.md), or a transformers CLIP folder of it.
    Single files are read as open_clip ViT-H/14 (GELU, as HPSv2's ``create_model('ViT-H-14')``).
    """

    name = "hpsv2"
    hidden_act = "gelu"
    layout = ("HPS_v2.1_compressed.safetensors (HPSv2's open_clip checkpoint converted to safetensors, see the "
              "docs) or a transformers CLIP folder (config.json + model.safetensors) converted from it")

    def scale(self) -> float:
        return 1.0
