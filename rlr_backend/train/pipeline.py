"""Load a local StableDiffusionPipeline folder (or the embedded default), offline, safetensors only."""

from __future__ import annotations

import os
from pathlib import Path

from ..safe_io import PICKLE_SUFFIXES, InvalidModelFile


def load_pipeline(model: str | Path | None = None):
    from ..models.default_model import check_model_dir, load_default_pipeline

    if model is None:
        return load_default_pipeline()
    p = Path(model)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise InvalidModelFile(f"{p}: pickle-based checkpoints (.ckpt/.pt/.bin) are not accepted; use a diffusers "
                               "folder with .safetensors weights")
    check_model_dir(p)
    pickles = [f.name for f in p.rglob("*") if f.suffix.lower() in PICKLE_SUFFIXES]
    if pickles:
        raise InvalidModelFile(f"{p} contains pickle weights ({', '.join(pickles[:3])}); only .safetensors is accepted")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return load_default_pipeline(p)
