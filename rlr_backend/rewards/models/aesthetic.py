"""LAION aesthetic predictor: an MLP on unit-norm CLIP ViT-L/14 image embeddings (DDPO, AlignProp).

The head is improved-aesthetic-predictor's ``MLP`` as DDPO's ``aesthetic_scorer.py`` uses it
(https://github.com/kvablack/ddpo-pytorch/blob/1958463f020112c9a7bc85768d296daacc2e1b4b/ddpo_pytorch/aesthetic_scorer.py):
linear layers with dropout and no activations, weights ``sac+logos+ava1-l14-linearMSE.pth`` (keys
``layers.{0,2,4,6,7}.{weight,bias}``), applied to the L2-normalised projected image embedding of
OpenAI CLIP ViT-L/14 (224 px). The value is on the AVA scale (about 1-10; ~5-6 for ordinary photos).
The prompt is ignored.

Files: the head as a .safetensors file in ``<folder>/aesthetic/`` (converted from the .pth, see
docs/rewards.md) and OpenAI CLIP ViT-L/14 either beside it (a transformers folder such as
``clip-vit-large-patch14/``, or a single .safetensors file) or in ``<folder>/clip_vision/``
(ComfyUI), where it is recognised by its embedding size (the head's input, 768).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...safe_io import InvalidModelFile, check_safetensors
from . import clip
from .files import Shapes, check_shapes, header_shapes, load_files, materialize, module_shapes
from .local import LocalModelReward
from .locate import candidate_dirs, missing, refuse_pickles
from .preprocess import clip_pixels

logger = logging.getLogger(__name__)

HEAD_FILE = "sac+logos+ava1-l14-linearMSE.safetensors"
HEAD_ARCHITECTURE = ("the improved-aesthetic-predictor MLP head: layers.0 Linear(D, 1024), Dropout(0.2), layers.2 "
                     "Linear(1024, 128), Dropout(0.2), layers.4 Linear(128, 64), Dropout(0.1), layers.6 Linear(64, 16), "
                     "layers.7 Linear(16, 1); D = 768 for CLIP ViT-L/14")
LAYOUT = (f"the MLP head as a .safetensors file ({HEAD_FILE}, converted from the .pth of "
          "christophschuhmann/improved-aesthetic-predictor) and OpenAI CLIP ViT-L/14 beside it (a transformers folder "
          "clip-vit-large-patch14/ with config.json + model.safetensors, or one .safetensors file) or in "
          "<folder>/clip_vision/")


class AestheticMLP(nn.Module):
    """improved-aesthetic-predictor's head (also ImageReward's): no activations between the layers."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def head_shapes(input_size: int) -> Shapes:
    with torch.device("meta"):
        return module_shapes(AestheticMLP(input_size))


def is_head(shapes: Shapes) -> bool:
    return "layers.0.weight" in shapes and all(k.startswith("layers.") for k in shapes)


def check_head(path: Path, shapes: Shapes, prefix: str = "") -> int:
    """Validate a head's tensors (named ``prefix + layers.*``); return its input size D."""
    first = shapes.get(prefix + "layers.0.weight")
    if first is None or len(first) != 2:
        raise InvalidModelFile(f"{path}: no {prefix}layers.0.weight of shape (1024, D): not {HEAD_ARCHITECTURE}")
    expected = {prefix + k: s for k, s in head_shapes(first[1]).items()}
    check_shapes(expected, {k: s for k, s in shapes.items() if k.startswith(prefix)}, source=path,
                 architecture=HEAD_ARCHITECTURE)
    return int(first[1])


class AestheticReward(LocalModelReward):
    """LAION aesthetic score of the images (prompts ignored); differentiable.

    Args:
        path: the head file, or a folder holding it (default: ``<root>/aesthetic/`` under the roots).
        clip: OpenAI CLIP ViT-L/14 (transformers folder or .safetensors file); default: found beside
            the head, else in ``<root>/clip_vision/``.
    """

    name = "aesthetic"

    def __init__(self, path: str | Path | None = None, *, clip: str | Path | None = None, **kwargs):
        super().__init__(path, **kwargs)
        self.clip_path = None if clip is None else Path(clip).expanduser()

    # ---------------------------------------------------------------- finding the files
    def _find_head(self) -> Path:
        if self.path is not None and self.path.is_file():
            return check_safetensors(self.path)
        searched = [self.path] if self.path is not None else candidate_dirs(self.name, self.roots())
        for folder in (d for d in searched if d.is_dir()):
            heads = [p for p in sorted(folder.glob("*.safetensors")) if is_head(header_shapes(p))]
            if len(heads) > 1:
                preferred = [p for p in heads if p.name == HEAD_FILE]
                if not preferred:
                    raise InvalidModelFile(f"{folder}: several aesthetic heads ({', '.join(p.name for p in heads)}); "
                                           "keep one or pass path=")
                heads = preferred
            if heads:
                return heads[0]
            refuse_pickles(folder)
        raise missing(self.name, searched, LAYOUT)

    def _find_clip(self, head: Path, input_size: int) -> clip.ClipPlan:
        if self.clip_path is not None:
            return clip.inspect(self.clip_path, need_text=False, hidden_act="quick_gelu")
        beside = clip.candidates(head.parent, need_text=False, exclude=(head,))
        if len(beside) > 1:
            raise InvalidModelFile(f"{head.parent}: several CLIP models ({', '.join(p.name for p in beside)}); keep "
                                   "one or pass clip=")
        if beside:
            return clip.inspect(beside[0], need_text=False, hidden_act="quick_gelu")
        searched = [head.parent]
        for root in self.roots():
            folder = root / "clip_vision"
            searched.append(folder)
            matches = [p for p in clip.candidates(folder, need_text=False)
                       if (s := clip.summary(p)) and s["projection"] == input_size]
            if matches:  # prefer 224 px (ViT-L/14 rather than ViT-L/14-336)
                matches.sort(key=lambda p: (clip.summary(p)["image_size"] != 224, p.name))
                logger.info("aesthetic: using the CLIP image encoder %s", matches[0])
                return clip.inspect(matches[0], need_text=False, hidden_act="quick_gelu")
        raise missing(self.name, searched, f"OpenAI CLIP ViT-L/14 ({input_size}-d image embeddings) for the head {head.name}; "
                                           + LAYOUT)

    def _check(self) -> clip.ClipPlan:
        head = self._find_head()
        input_size = check_head(head, header_shapes(head))
        plan = self._find_clip(head, input_size)
        if plan.config.projection_dim != input_size:
            raise InvalidModelFile(f"{plan.path}: gives {plan.config.projection_dim}-d image embeddings but the head "
                                   f"{head} takes {input_size}-d ones; the LAION aesthetic head needs OpenAI CLIP ViT-L/14 (768)")
        plan.files = {"head": head, "clip": plan.path}
        return plan

    # ---------------------------------------------------------------- running
    def _load(self, plan: clip.ClipPlan) -> None:
        self.clip_model = clip.load(plan, self.device, self.dtype)
        with torch.device("meta"):
            head = AestheticMLP(plan.config.projection_dim)
        self.head = materialize(head, load_files([plan.files["head"]]), device=self.device, dtype=self.dtype)

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        plan = self._plan
        embeds = clip.image_embeds(self.clip_model, clip_pixels(images, plan.image_size, plan.mean, plan.std))
        embeds = F.normalize(embeds, dim=-1)
        return self.head(embeds).squeeze(-1).float()
