"""The reward registry used by the CLI, the ComfyUI nodes and the Gradio app.

``make_reward("prompt_alignment")`` or a weighted sum ``make_reward("prompt_alignment=1,brightness=0.2")``;
rewards with an argument take it after a colon (``position:left``, ``size:0.3=2``).

Every factory takes ``(device="cpu", models_dir=None)``. Building a model reward from ``REWARDS`` touches
no file (the UIs do it to read ``name`` and ``differentiable``); ``make_reward`` also checks the weights
of model rewards (``aesthetic``, ``clip_score``, ``pickscore``, ``hpsv2``, ``image_reward``), so a
missing or wrong file fails before anything else loads. Their weights come from ``models_dir`` and
``$RLR_REWARD_MODELS`` (see :mod:`rlr_backend.rewards.models` and docs/rewards.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence, Union

import torch

from ..choices import REWARD_ARGS, REWARD_HELP, parse_reward_spec
from .base import Reward, WeightedSum
from .rules import Brightness, Contrast, Darkness, JpegSize, Saturation, TargetColor
from .structure import ShapePosition, ShapeSize


ModelsDir = Union[str, Path, Sequence[Union[str, Path]], None]


def _alignment(device: str | torch.device = "cpu", models_dir: ModelsDir = None) -> Reward:
    from .alignment import PromptAlignmentReward  # loads the committed classifier weights

    return PromptAlignmentReward(device=device)


def _model(name: str) -> Callable[..., Reward]:
    def factory(device: str | torch.device = "cpu", models_dir: ModelsDir = None) -> Reward:
        from .models import model_reward  # transformers is imported only when the weights are checked

        return model_reward(name, models_dir=models_dir, device=device)

    factory.__name__ = f"make_{name}"
    return factory


REWARDS: dict[str, Callable[..., Reward]] = {
    "prompt_alignment": _alignment,
    "brightness": lambda device="cpu", models_dir=None: Brightness(),
    "darkness": lambda device="cpu", models_dir=None: Darkness(),
    "saturation": lambda device="cpu", models_dir=None: Saturation(),
    "contrast": lambda device="cpu", models_dir=None: Contrast(),
    "red": lambda device="cpu", models_dir=None: TargetColor((1.0, 0.0, 0.0)),
    "blue": lambda device="cpu", models_dir=None: TargetColor((0.0, 0.0, 1.0)),
    "jpeg_compressibility": lambda device="cpu", models_dir=None: JpegSize(-1.0),
    "jpeg_incompressibility": lambda device="cpu", models_dir=None: JpegSize(+1.0),
    "aesthetic": _model("aesthetic"),
    "clip_score": _model("clip_score"),
    "pickscore": _model("pickscore"),
    "hpsv2": _model("hpsv2"),
    "image_reward": _model("image_reward"),
    "position": lambda device="cpu", models_dir=None, arg=REWARD_ARGS["position"]: ShapePosition(arg),
    "size": lambda device="cpu", models_dir=None, arg=REWARD_ARGS["size"]: ShapeSize(arg),
}

assert sorted(REWARDS) == sorted(REWARD_HELP), "choices.REWARD_HELP and REWARDS disagree"


def make_reward(spec: str, device: str | torch.device = "cpu", models_dir: ModelsDir = None) -> Reward:
    """Build a reward from ``name`` or ``name=weight,name=weight``; unknown names list the choices.

    Model rewards look for their weights in ``models_dir`` (a folder or several, e.g. ComfyUI's
    ``models/``), then ``$RLR_REWARD_MODELS``; they are checked here (headers only) and loaded on the
    first call. Raises ``MissingRewardWeights`` (a ``FileNotFoundError``) or ``InvalidModelFile``.
    """
    parts = []
    for name, w, arg in parse_reward_spec(spec):
        extra = {} if arg is None else {"arg": arg}
        reward = REWARDS[name](device=device, models_dir=models_dir, **extra)
        check = getattr(reward, "check", None)
        if callable(check):
            check()
        parts.append((reward, w))
    return parts[0][0] if len(parts) == 1 and parts[0][1] == 1.0 else WeightedSum(parts)
