"""The embedded default text-to-image model: location and loader.

The model is a tiny latent-diffusion model in diffusers ``StableDiffusionPipeline``
format, committed under ``rlr_backend/assets/default_model`` and reproduced by
``python -m rlr_backend.models.pretrain_default``.  It draws 32x32 images of
coloured shapes from captions such as ``"a red circle on a blue background"``
(grammar: :mod:`rlr_backend.data.shapes`).

Any diffusers tool can load it::

    StableDiffusionPipeline.from_pretrained(DEFAULT_MODEL_DIR, local_files_only=True)
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

#: Folder of the committed default model (inside the installed package).
DEFAULT_MODEL_DIR: Path = Path(__file__).resolve().parent.parent / "assets" / "default_model"

#: Files a complete model folder must contain (weights in safetensors only).
REQUIRED_FILES: tuple[str, ...] = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
)

#: Default sampler settings used for the model's quality figures.
DEFAULT_HEIGHT = DEFAULT_WIDTH = 32
DEFAULT_NUM_STEPS = 30
DEFAULT_GUIDANCE = 4.0


#: the ``ss_base_model_version`` of LoRAs trained on the embedded default: its own id, so that tools and
#: ComfyUI's loaders never take such a LoRA for an SD1.x one (the default has the SD1 layout, 32x32 px)
BASE_MODEL_VERSION = "rlr_default_shapes32_v1"

def check_embedded_dir(path: str | Path, *, what: str, required: tuple[str, ...], pipeline: str, script: str) -> Path:
    """Check that ``path`` is a complete embedded-model folder (``what`` in messages; ``required`` files, a
    ``model_index.json`` naming ``pipeline``); return it as a Path. The messages say how to rebuild it with
    ``python -m <script> --out <path>``.

    Raises:
        FileNotFoundError: the folder or a required file is missing (the message lists the missing files).
        ValueError: ``model_index.json`` is not valid JSON or names another pipeline.
    """
    p = Path(path)
    hint = f"rebuild it with: python -m {script} --out {p}"
    if not p.is_dir():
        raise FileNotFoundError(f"{what} folder {p} does not exist; {hint}")
    missing = [f for f in required if not (p / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{what} folder {p} is incomplete, missing: {', '.join(missing)}; {hint}")
    try:
        index = json.loads((p / "model_index.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{p / 'model_index.json'} is not valid JSON ({e}); {hint}") from e
    if not isinstance(index, dict) or index.get("_class_name") != pipeline:
        raise ValueError(f"{p / 'model_index.json'} is not a {pipeline} index; {hint}")
    return p


def check_model_dir(path: str | Path) -> Path:
    """Check that ``path`` is a complete default-model folder (:func:`check_embedded_dir`); return it."""
    return check_embedded_dir(path, what="default model", required=REQUIRED_FILES, pipeline="StableDiffusionPipeline",
                              script="rlr_backend.models.pretrain_default")


def load_default_pipeline(path: str | Path | None = None, device: str | torch.device = "cpu",
                          dtype: torch.dtype | dict[str, torch.dtype] = torch.float32):
    """Load the default model as a diffusers ``StableDiffusionPipeline``, offline.

    Args:
        path: model folder; default :data:`DEFAULT_MODEL_DIR`.
        device: torch device to move the pipeline to.
        dtype: parameter dtype (float32 recommended on CPU), or diffusers' component -> dtype dict
            (``"default"`` for the others).

    Returns:
        The pipeline, with ``safety_checker=None`` and the progress bar disabled.

    Raises:
        FileNotFoundError / ValueError: see :func:`check_model_dir`; ValueError also when
            a file is corrupt and diffusers cannot load it.
    """
    from diffusers import StableDiffusionPipeline

    p = check_model_dir(DEFAULT_MODEL_DIR if path is None else path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            str(p),
            local_files_only=True,
            use_safetensors=True,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            dtype=dtype,
        )
    except Exception as e:  # corrupt weights or configs: diffusers/safetensors raise many types
        raise ValueError(
            f"could not load the default model from {p} ({type(e).__name__}: {e}); "
            f"rebuild it with: python -m rlr_backend.models.pretrain_default --out {p}"
        ) from e
    if torch.device(device).type != "cpu":  # loaded on the CPU (diffusers warns about fp16 on a .to("cpu"))
        pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.rlr_base_model_version = BASE_MODEL_VERSION  # read by DiffusersModel
    logger.debug("loaded default model from %s", p)
    return pipe
