"""Rewards computed by pretrained models loaded from local files (nothing is ever downloaded).

==============  ===========================================  ======================================
registry name   class                                        weights (in ``<folder>/<name>/``)
==============  ===========================================  ======================================
aesthetic       :class:`~.aesthetic.AestheticReward`         MLP head .safetensors + CLIP ViT-L/14
clip_score      :class:`~.clip_similarity.ClipScore`         any CLIP
pickscore       :class:`~.clip_similarity.PickScore`         PickScore_v1 transformers folder
hpsv2           :class:`~.clip_similarity.HPSv2`             HPSv2 open_clip .safetensors
image_reward    :class:`~.image_reward.ImageReward`          ImageReward.safetensors + vocab.txt
==============  ===========================================  ======================================

``<folder>`` is ``models_dir=`` or ``$RLR_REWARD_MODELS`` (see :mod:`.locate`); docs/rewards.md has
the full layout and the conversion of the pickled originals. transformers is imported only when a
reward checks or loads its weights.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from ...safe_io import InvalidModelFile
from .local import LocalModelReward
from .locate import REWARD_MODELS_ENV, MissingRewardWeights, search_roots

logger = logging.getLogger(__name__)


def _classes() -> dict[str, type[LocalModelReward]]:
    from .aesthetic import AestheticReward
    from .clip_similarity import ClipScore, HPSv2, PickScore
    from .image_reward import ImageReward

    return {c.name: c for c in (AestheticReward, ClipScore, PickScore, HPSv2, ImageReward)}


#: Registry names of the model rewards, in display order.
MODEL_REWARDS: tuple[str, ...] = ("aesthetic", "clip_score", "pickscore", "hpsv2", "image_reward")


def model_reward(name: str, *, path: str | Path | None = None, models_dir: str | Path | None = None,
                 device: str = "cpu", **kwargs) -> LocalModelReward:
    """An unchecked model reward by registry name (no file is touched until ``check``/``load``/call)."""
    classes = _classes()
    if name not in classes:
        raise ValueError(f"unknown model reward {name!r}; choose one of {list(MODEL_REWARDS)}")
    return classes[name](path, models_dir=models_dir, device=device, **kwargs)


def find_reward_models(models_dir: str | Path | Sequence[str | Path] | None = None) -> dict[str, dict[str, Path]]:
    """Which model rewards have usable weights under ``models_dir`` (and ``$RLR_REWARD_MODELS``).

    Returns ``{reward name: {role: path}}`` for the rewards whose files are found and match their
    architecture (headers only; nothing is loaded). Rewards with missing or invalid files are left
    out; their reason is logged at DEBUG (call ``make_reward`` for the full error).
    """
    found: dict[str, dict[str, Path]] = {}
    for name, cls in _classes().items():
        try:
            found[name] = cls(models_dir=models_dir).check().files()
        except (MissingRewardWeights, InvalidModelFile, OSError) as e:
            logger.debug("reward %s not available: %s", name, e)
    return found


__all__ = ["MODEL_REWARDS", "REWARD_MODELS_ENV", "InvalidModelFile", "LocalModelReward", "MissingRewardWeights",
           "find_reward_models", "model_reward", "search_roots"]
