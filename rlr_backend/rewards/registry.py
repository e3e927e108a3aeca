"""The reward registry used by the CLI, the ComfyUI nodes and the Gradio app.

``make_reward("prompt_alignment")`` or a weighted sum ``make_reward("prompt_alignment=1,brightness=0.2")``.
"""

from __future__ import annotations

from typing import Callable

import torch

from .base import Reward, WeightedSum
from .rules import Brightness, Contrast, Darkness, JpegSize, Saturation, TargetColor


def _alignment(device: str | torch.device = "cpu") -> Reward:
    from .alignment import PromptAlignmentReward  # loads the committed classifier weights

    return PromptAlignmentReward(device=device)


REWARDS: dict[str, Callable[..., Reward]] = {
    "prompt_alignment": _alignment,
    "brightness": lambda device="cpu": Brightness(),
    "darkness": lambda device="cpu": Darkness(),
    "saturation": lambda device="cpu": Saturation(),
    "contrast": lambda device="cpu": Contrast(),
    "red": lambda device="cpu": TargetColor((1.0, 0.0, 0.0)),
    "blue": lambda device="cpu": TargetColor((0.0, 0.0, 1.0)),
    "jpeg_compressibility": lambda device="cpu": JpegSize(-1.0),
    "jpeg_incompressibility": lambda device="cpu": JpegSize(+1.0),
}

REWARD_HELP: dict[str, str] = {
    "prompt_alignment": "probability that the image shows its caption's shape and colours (default model; differentiable)",
    "brightness": "mean pixel value", "darkness": "1 - mean pixel value",
    "saturation": "mean colour saturation", "contrast": "standard deviation of the luma",
    "red": "closeness of the pixels to pure red", "blue": "closeness of the pixels to pure blue",
    "jpeg_compressibility": "minus the JPEG size in kB (DDPO; not differentiable)",
    "jpeg_incompressibility": "the JPEG size in kB (DDPO; not differentiable)",
}


def make_reward(spec: str, device: str | torch.device = "cpu") -> Reward:
    """Build a reward from ``name`` or ``name=weight,name=weight``; unknown names list the choices."""
    spec = (spec or "").strip()
    if not spec:
        raise ValueError(f"no reward given; choose one of {sorted(REWARDS)}")
    parts = []
    for item in spec.split(","):
        name, _, weight = item.strip().partition("=")
        name = name.strip()
        if name not in REWARDS:
            raise ValueError(f"unknown reward {name!r}; choose one of {sorted(REWARDS)}")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"reward weight for {name!r} must be a number, got {weight!r}") from None
        parts.append((REWARDS[name](device=device), w))
    return parts[0][0] if len(parts) == 1 and parts[0][1] == 1.0 else WeightedSum(parts)
