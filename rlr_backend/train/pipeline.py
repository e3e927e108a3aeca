"""Load a local model (the embedded default, a diffusers folder or a single-file .safetensors), offline,
safetensors only; see :mod:`rlr_backend.models.loader`."""

from __future__ import annotations

from ..models.loader import load_model, load_pipeline, model_for_pipeline

__all__ = ["load_model", "load_pipeline", "model_for_pipeline"]
