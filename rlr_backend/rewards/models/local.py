"""What every reward computed by a model from local files shares: lifecycle, device, grad mode.

* construction records where to look and touches no file (the UIs build rewards to read their
  ``name`` and ``differentiable``);
* :meth:`LocalModelReward.check` finds the files, refuses pickles and compares every tensor shape with
  the architecture, reading headers only (``make_reward`` calls it, so a run fails before its model
  loads);
* :meth:`LocalModelReward.load` reads the weights once; the first call does it if nobody did.

A call builds an autograd graph only when it can be used: grad mode is on and the images require
grad (first-order estimators). Otherwise the model runs under ``no_grad`` and keeps no activations.
The model's own weights are frozen either way.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence, Union

import torch
from torch import Tensor

from ..base import check_images
from .locate import search_roots

logger = logging.getLogger(__name__)


class LocalModelReward:
    """Base of the model rewards: images (B, 3, H, W) in [0, 1] + prompts -> (B,) on the images' device.

    Args:
        path: the weights (a file or a folder, as each reward documents); bypasses the folder search.
        models_dir: a folder (or several) to search before ``$RLR_REWARD_MODELS`` (e.g. ComfyUI's ``models/``).
        device, dtype: where and in which precision the reward model runs.
    """

    differentiable = True
    name = "local_model"

    def __init__(self, path: str | Path | None = None, *, models_dir: Union[str, Path, Sequence, None] = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.path = None if path is None else Path(path).expanduser()
        self.models_dir = models_dir
        self.device, self.dtype = torch.device(device), dtype
        self._plan: Any = None
        self._loaded = False

    # ---------------------------------------------------------------- lifecycle
    def roots(self) -> list[Path]:
        return search_roots(self.models_dir)

    def check(self) -> "LocalModelReward":
        """Find and validate the weights without loading them (idempotent)."""
        if self._plan is None:
            self._plan = self._check()
        return self

    def load(self) -> "LocalModelReward":
        """Load the weights (once)."""
        if not self._loaded:
            self.check()
            self._load(self._plan)
            self._loaded = True
            logger.info("reward %s loaded from %s", self.name, self.files())
        return self

    def files(self) -> dict[str, Path]:
        """The weight files/folders in use, by role (after :meth:`check`)."""
        return dict(self.check()._plan.files)

    # ---------------------------------------------------------------- call
    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        check_images(images)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"reward {self.name!r}: got {images.shape[0]} images but {len(prompts)} prompts")
        self.load()
        with torch.set_grad_enabled(torch.is_grad_enabled() and images.requires_grad):
            scores = self._score(images.to(device=self.device, dtype=self.dtype), prompts)
        out_dtype = images.dtype if images.dtype.is_floating_point else torch.float32
        return scores.reshape(-1).to(device=images.device, dtype=out_dtype)

    # ---------------------------------------------------------------- for subclasses
    def _check(self) -> Any:
        """Return a plan with a ``files`` mapping (role -> path); raise on missing or invalid weights."""
        raise NotImplementedError

    def _load(self, plan: Any) -> None:
        raise NotImplementedError

    def _score(self, pixels: Tensor, prompts: list[str]) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        state = "loaded" if self._loaded else "checked" if self._plan is not None else "not checked"
        return f"{type(self).__name__}(name={self.name!r}, path={self.path}, device={self.device}, {state})"


def load_weights(reward) -> int:
    """Load the weights of every model part of ``reward`` (weighted sums included) now; returns how many.
    The trainer calls it before it writes anything, so damaged weights are refused with nothing written."""
    parts = [r for r, _ in getattr(reward, "parts", [(reward, 1.0)])]
    models = [p for p in parts if isinstance(p, LocalModelReward)]
    for part in models:
        part.load()
    return len(models)
