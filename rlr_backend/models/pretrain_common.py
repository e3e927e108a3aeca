"""Pieces shared by the pretraining scripts of the embedded default models.

:mod:`rlr_backend.models.pretrain_default` (the latent-diffusion UNet default) and
:mod:`rlr_backend.models.pretrain_flow` (the rectified-flow transformer default) both
train on batches of the procedural shapes data (training split only), with a
warm-up + cosine learning rate, an EMA of the weights and atomic saves of a
diffusers pipeline folder whose tokenizer holds only ``vocab.json``, ``merges.txt``
and a small ``tokenizer_config.json``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from rlr_backend.data import shapes

logger = logging.getLogger(__name__)

#: CLIP tokens per caption (the text encoder's ``max_position_embeddings``)
MODEL_MAX_LENGTH = 16


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, 3, H, W) float images in [0, 1] -> a tensor in [-1, 1]."""
    return torch.from_numpy(images) * 2.0 - 1.0


def train_batch(rng: np.random.Generator, batch_size: int, cfg_dropout: float) -> tuple[torch.Tensor, list[str]]:
    """A training-split batch: images in [-1, 1] and captions, a ``cfg_dropout`` share of them replaced by ""
    (for classifier-free guidance). Draws from ``rng`` in the same order as the UNet default always has."""
    imgs, caps, _ = shapes.make_batch(rng, batch_size, "train")
    drop = rng.uniform(size=batch_size) < cfg_dropout
    return images_to_tensor(imgs), ["" if d else c for c, d in zip(caps, drop)]


def cosine_lr(step: int, total: int, warmup: int, base: float, floor: float = 0.1) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from ``base`` to ``floor * base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def ema_decay_at(step: int, decay: float) -> float:
    """The EMA decay at ``step`` (0-based): (1 + step) / (10 + step), capped at ``decay``."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm.detach(), 1.0 - decay)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")


def write_tokenizer_folder(tdir: Path, tokenizer_src: Path) -> None:
    """Replace a saved tokenizer folder's files by vocab.json + merges.txt + tokenizer_config.json (the
    3.6 MB tokenizer.json that transformers 5 writes is rebuilt from the two files on load)."""
    for f in tdir.iterdir():
        f.unlink()
    shutil.copy(tokenizer_src / "vocab.json", tdir / "vocab.json")
    shutil.copy(tokenizer_src / "merges.txt", tdir / "merges.txt")
    (tdir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": MODEL_MAX_LENGTH,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "do_lower_case": True,
            },
            indent=2,
        )
    )


@contextmanager
def atomic_folder(out: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``out``; on success it replaces ``out`` (the old one is kept as
    ``out.old`` until the new one is in place), on error it is removed and ``out`` is left as it was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.with_name(out.name + ".old")
            if old.exists():
                shutil.rmtree(old)
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
