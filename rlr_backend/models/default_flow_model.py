"""The embedded flow-matching default model: location, recommended settings and loader.

A tiny rectified-flow (SD3-style MMDiT) text-to-image model in diffusers
``StableDiffusion3Pipeline`` format, committed under
``rlr_backend/assets/default_flow_model`` and reproduced by
``python -m rlr_backend.models.pretrain_flow``. It shares the UNet default's VAE,
text encoder and tokenizer and draws the same 32x32 coloured shapes. It has no T5,
so plain diffusers loads it as SD3 without T5 is loaded::

    StableDiffusion3Pipeline.from_pretrained(DEFAULT_FLOW_MODEL_DIR, text_encoder_3=None, tokenizer_3=None,
                                             local_files_only=True)

and its prompts are encoded with ``pipe.encode_prompt(..., max_sequence_length=N)``, N from
the folder's ``rlr_defaults.json`` (with the recommended steps, guidance and shift).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..model_paths import DEFAULT_FLOW_MODEL_DIR, read_flow_defaults
from .default_model import check_embedded_dir


#: Files a complete folder must contain (weights in safetensors only).
REQUIRED_FLOW_FILES: tuple[str, ...] = (
    "model_index.json",
    "rlr_defaults.json",
    "scheduler/scheduler_config.json",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    *(f"{c}/{f}" for c in ("text_encoder", "text_encoder_2") for f in ("config.json", "model.safetensors")),
    *(f"{t}/{f}" for t in ("tokenizer", "tokenizer_2") for f in ("vocab.json", "merges.txt")),
)

_DEFAULT_KEYS = ("max_sequence_length", "num_inference_steps", "guidance_scale", "shift")


def _hint(p: Path) -> str:
    return f"rebuild it with: python -m rlr_backend.models.pretrain_flow --out {p}"


def check_flow_model_dir(path: str | Path) -> Path:
    """Check that ``path`` is a complete flow default folder (FileNotFoundError / ValueError naming the problem)."""
    return check_embedded_dir(path, what="flow default model", required=REQUIRED_FLOW_FILES,
                              pipeline="StableDiffusion3Pipeline", script="rlr_backend.models.pretrain_flow")


def flow_sampling_defaults(path: str | Path | None = None) -> dict:
    """The folder's rlr_defaults.json: max_sequence_length, num_inference_steps, guidance_scale, shift."""
    folder = Path(DEFAULT_FLOW_MODEL_DIR if path is None else path)
    p = folder / "rlr_defaults.json"
    try:
        d = read_flow_defaults(folder)
    except ValueError as e:
        raise ValueError(f"{e}; {_hint(folder)}") from e
    missing = [k for k in _DEFAULT_KEYS if not isinstance(d.get(k), (int, float))]
    if missing:
        raise ValueError(f"{p} lacks numeric {', '.join(missing)}; {_hint(p.parent)}")
    return d


def load_flow_pipeline(path: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """The flow default as a diffusers ``StableDiffusion3Pipeline`` (offline, CPU, progress bar off), loaded as
    every flow folder is (:func:`rlr_backend.models.loader.load_pipeline`) after the completeness check."""
    from .loader import load_pipeline

    p = check_flow_model_dir(DEFAULT_FLOW_MODEL_DIR if path is None else path)
    try:
        return load_pipeline(p, dtype=dtype)
    except ValueError as e:
        raise ValueError(f"{e}; {_hint(p)}") from e
