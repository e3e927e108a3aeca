"""Training: typed config, the loop with callbacks, checkpoints and reports.

The config and the prompt parser are plain Python; the trainer (torch, diffusers) is imported on first
use, so ``from rlr_backend.train import TrainConfig`` stays light (the command line validates its
arguments with it before torch is loaded).
"""

from __future__ import annotations

import importlib

from .config import DEFAULT_PROMPTS, TrainConfig
from .prompts import PromptSpec, parse_prompt, read_prompt_file

_LAZY = {"StepInfo": ".trainer", "Trainer": ".trainer", "TrainResult": ".trainer"}

__all__ = ["DEFAULT_PROMPTS", "PromptSpec", "StepInfo", "TrainConfig", "TrainResult", "Trainer", "parse_prompt",
           "read_prompt_file"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
