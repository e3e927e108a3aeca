"""Where reward-model weights are looked for, and the error that says where to put them.

Search roots, in order: the ``models_dir`` given by the caller (the ComfyUI nodes pass ComfyUI's
``models/`` folder), then every folder in the environment variable ``RLR_REWARD_MODELS``
(``os.pathsep``-separated). Inside a root ``R``, reward ``name`` owns ``R/<name>/`` or, in a ComfyUI
``models/`` folder, ``R/rewards/<name>/``; CLIP image encoders are also taken from ``R/clip_vision/``
(ComfyUI's folder for them). An explicit ``path=`` bypasses the search. Files are recognised by the
tensor names in their safetensors header, not by their file names.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from ...safe_io import PICKLE_SUFFIXES, InvalidModelFile

REWARD_MODELS_ENV = "RLR_REWARD_MODELS"
DOCS = "docs/rewards.md"


class MissingRewardWeights(FileNotFoundError):
    """A reward model's weights were not found; the message says which files go where."""


def search_roots(models_dir: str | Path | Sequence[str | Path] | None = None) -> list[Path]:
    """Folders searched for reward weights: ``models_dir`` first, then ``$RLR_REWARD_MODELS``."""
    given = [] if models_dir is None else [models_dir] if isinstance(models_dir, (str, Path)) else list(models_dir)
    env = [p for p in os.environ.get(REWARD_MODELS_ENV, "").split(os.pathsep) if p.strip()]
    roots: list[Path] = []
    for p in [*given, *env]:
        path = Path(p).expanduser()
        if path not in roots:
            roots.append(path)
    return roots


def candidate_dirs(name: str, roots: Sequence[Path]) -> list[Path]:
    """``R/<name>`` and ``R/rewards/<name>`` for every root (existing or not)."""
    return [d for r in roots for d in (r / name, r / "rewards" / name)]


def refuse_pickles(folder: Path) -> None:
    """Called when a folder holds no usable safetensors file: name the pickles it holds instead."""
    pickles = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise InvalidModelFile(f"{folder}: found only pickle files ({', '.join(pickles)}); pickles are never loaded. "
                               f"Convert them to .safetensors as shown in {DOCS} ('Converting pickles')")


def missing(reward: str, searched: Sequence[Path], layout: str) -> MissingRewardWeights:
    """The error for absent weights: reward name, expected layout, places searched, how to point at them."""
    if searched:
        where = "searched: " + ", ".join(str(p) for p in searched)
    else:
        where = f"no folder to search: {REWARD_MODELS_ENV} is not set and no models_dir/path was given"
    return MissingRewardWeights(
        f"reward {reward!r} needs local model weights, none found ({where}). Expected in <folder>/{reward}/: "
        f"{layout}. Set {REWARD_MODELS_ENV}=<folder> (or pass models_dir= / path=; in ComfyUI use "
        f"models/rewards/{reward}/). Nothing is downloaded; see {DOCS}.")
