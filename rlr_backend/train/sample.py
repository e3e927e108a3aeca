"""Sampling with a loaded pipeline and an optional LoRA at a strength (``rlr-sample``, the app's compare tab).

A LoRA trained with 'coarse | mid | fine' prompts is sampled with them: ``lora_prompts`` reads the
prompts and split it recorded, and ``resolve_prompt`` (train.prompts) gives a trained fine prompt its
coarse and mid versions, as the trainer's evaluation images have them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch

from ..lora import load_lora, set_lora_scale
from ..models.loader import model_for_pipeline
from ..models.trainable import ScheduledPrompt
from ..models.trainable import sample_images as model_samples
from ..safe_io import load_tensors, nonfinite_count
from .prompts import PromptSpec, schedule_from_metadata


def add_lora_file(pipe, path: str | Path) -> None:
    """Add the LoRA in a ``.safetensors`` file (kohya, diffusers or PEFT keys) to ``pipe``'s UNet and text encoders
    as adapter ``default`` (strength 1); a LoRA made for another architecture (by its header, module names or
    shapes) or in an unknown format is refused unchanged."""
    model = model_for_pipeline(pipe)
    encoders = {} if getattr(model, "flow", False) else model.text_encoders()  # flow LoRAs adapt the transformer
    load_lora(_denoising_module(pipe), path, model_version=model.base_model_version, text_encoders=encoders)


def _denoising_module(pipe):
    """The pipeline's UNet, or its transformer (flow-matching pipelines)."""
    return pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer


def lora_prompts(path: str | Path) -> tuple[tuple[PromptSpec, ...], tuple[float, float, float]]:
    """(the 'coarse | mid | fine' prompts a LoRA file was trained with, their split) from its metadata;
    no prompts (and equal thirds) for a LoRA trained without a prompt schedule or elsewhere."""
    return schedule_from_metadata(load_tensors(path)[1])


def set_lora_strength(pipe, strength: float) -> None:
    """Scale the LoRA added by :func:`add_lora_file`; 0 gives the base model exactly."""
    if not math.isfinite(strength):
        raise ValueError(f"the LoRA strength must be a finite number, got {strength}")
    _denoising_module(pipe).set_adapters(["default"], weights=[float(strength)])
    set_lora_scale([getattr(pipe, n) for n in ("text_encoder", "text_encoder_2") if getattr(pipe, n, None) is not None],
                   "default", strength)


def sample_images(pipe, prompts: Sequence[str | ScheduledPrompt], *, num_per_prompt: int = 1, steps: int = 20,
                  eta: float = 1.0, guidance_scale: float = 4.0, seed: int = 0,
                  prompt_split: Sequence[float] | None = None) -> torch.Tensor:
    """Images (len(prompts) * num_per_prompt, 3, H, W) in [0, 1], prompt-major. A prompt with coarse / mid /
    fine versions (a ``PromptSpec``) uses them on the ``prompt_split`` parts of the chain.

    The initial noise and the DDIM noise come from one generator seeded with ``seed``, so two calls
    with the same arguments differ only by the weights of ``pipe`` (e.g. the LoRA strength).
    """
    if num_per_prompt < 1 or steps < 1:
        raise ValueError(f"num_per_prompt and steps must be >= 1, got {num_per_prompt} and {steps}")
    for name, value in (("eta", eta), ("guidance_scale", guidance_scale)):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}")
    texts = [p for p in prompts for _ in range(num_per_prompt)]
    images = model_samples(model_for_pipeline(pipe), texts, num_steps=steps, eta=eta, guidance_scale=guidance_scale,
                           seed=seed, prompt_split=prompt_split)
    bad = nonfinite_count(images)
    if bad:  # would be saved as black pixels
        raise ValueError(f"sampling produced {bad} NaN/inf pixel values: the model, the LoRA or its strength "
                         "overflows; nothing was written")
    return images
