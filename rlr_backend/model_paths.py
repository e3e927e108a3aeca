"""Model paths a user gives or picks, checked in one place (plain Python, no torch).

* ``check_model_path``: a path (or a model name, ``default-flow``) typed on the command line (exists, not a
  pickle); ``resolve_model_name`` turns a name into its folder; ``is_flow_folder`` tells a flow-matching
  pipeline folder by its model_index.json.
* ``diffusers_folders``: the diffusers pipeline folders under a models folder, for a list to pick from
  (the Gradio app's model list, ComfyUI's RLR Load Model).
* ``resolve_model_folder`` / ``resolve_checkpoint``: a picked name back to a path inside its folders,
  refusing traversal, links out of the folder, other formats and missing files.

The loader (``models.loader``) then checks the contents. Errors a user can fix are ``ConfigError``
(field ``model``), ``FileNotFoundError`` or ``InvalidModelFile``, each one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from .choices import ConfigError

#: the flow-matching default model (a small StableDiffusion3Pipeline folder), chosen by the name ``default-flow``
DEFAULT_FLOW_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "default_flow_model"
#: model names a user may give instead of a path -> the module attribute holding the folder (read at call time,
#: so a test can point it elsewhere)
MODEL_ALIASES: dict[str, str] = {"default-flow": "DEFAULT_FLOW_MODEL_DIR"}
#: diffusers pipelines that sample on a flow-matching chain (``models.flow_model``)
FLOW_PIPELINES: tuple[str, ...] = ("StableDiffusion3Pipeline", "FluxPipeline", "ZImagePipeline", "QwenImagePipeline")
#: a flow folder's own defaults (max_sequence_length, num_inference_steps, guidance_scale, shift), read when present
FLOW_DEFAULTS_FILE = "rlr_defaults.json"


def resolve_model_name(model: str | Path | None) -> str | Path | None:
    """A model name (``default-flow``) -> its folder; a path or None unchanged."""
    if isinstance(model, str) and model in MODEL_ALIASES:
        return globals()[MODEL_ALIASES[model]]
    return model


def read_model_index(path: str | Path) -> dict | None:
    """A diffusers folder's model_index.json as a dict, or None when ``path`` is not such a folder or the file is
    not a JSON object (plain Python: the CLI checks options against the architecture before importing torch)."""
    index_path = Path(path) / "model_index.json"
    if not index_path.is_file():
        return None
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return index if isinstance(index, dict) else None


def is_flow_folder(path: str | Path | None) -> bool:
    """Whether ``path`` (or a model name) is a diffusers folder of a flow-matching pipeline (model_index.json's
    ``_class_name``)."""
    path = resolve_model_name(path)
    index = read_model_index(path) if path is not None else None
    return index is not None and index.get("_class_name") in FLOW_PIPELINES


def check_flow_files(model: str | None, text_encoders: Sequence[str] = (), vae: str | None = None,
                     tokenizer: str | None = None) -> None:
    """The files a flow transformer file is loaded with must exist (``.safetensors``; the tokenizer a folder) and a
    model file must be given; the loader checks their contents."""
    from .safe_io import InvalidModelFile

    given = [f"--{n}" for n, v in (("text-encoder", text_encoders), ("vae", vae), ("tokenizer", tokenizer)) if v]
    if not given:
        return
    if model is None or Path(str(resolve_model_name(model))).is_dir():
        raise ConfigError("model", f"{', '.join(given)} go with a flow transformer file (--model "
                                   "models/diffusion_models/FILE.safetensors); a diffusers folder or the default "
                                   "model has its own")
    for what, f in [("text-encoder", f) for f in text_encoders] + ([("vae", vae)] if vae else []):
        p = Path(f)
        if p.suffix.lower() != ".safetensors":
            raise InvalidModelFile(f"--{what} {p}: only .safetensors files are read (no pickles)")
        if not p.is_file():
            raise FileNotFoundError(f"--{what} {p} does not exist")
    if tokenizer and not Path(tokenizer).is_dir():
        raise FileNotFoundError(f"--tokenizer {tokenizer}: no such folder (give the T5 / Qwen3 tokenizer's folder)")


def read_flow_defaults(path: str | Path) -> dict:
    """A flow folder's ``rlr_defaults.json`` ({} without one); ValueError naming a damaged file."""
    f = Path(resolve_model_name(path)) / FLOW_DEFAULTS_FILE
    if not f.is_file():
        return {}
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{f} is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{f} must hold a JSON object, got {type(data).__name__}")
    return data


def check_model_path(path: str | None, field: str = "model") -> None:
    """A model given by path must exist and must not be a pickle (the loader checks its contents)."""
    if path is None:
        return
    from .safe_io import PICKLE_SUFFIXES, InvalidModelFile

    if path in MODEL_ALIASES:
        folder = resolve_model_name(path)
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"--{field} {path}: the model folder {folder} is not installed")
        return
    p = Path(path)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise InvalidModelFile(f"{p}: pickle-based checkpoints (.ckpt/.pt/.bin) are not accepted; use a diffusers "
                               "folder or a single-file checkpoint with .safetensors weights")
    if not p.exists():
        raise ConfigError(field, f"--{field} {p} does not exist; give a diffusers folder or a single-file "
                                 ".safetensors checkpoint")


def diffusers_folders(root: str | Path | None, depth: int = 1) -> dict[str, Path]:
    """Label (the folder's path relative to ``root``, '/'-separated) -> folder, for every diffusers pipeline
    folder (one with model_index.json) at most ``depth`` levels below ``root``; hidden folders are skipped."""
    out: dict[str, Path] = {}
    base = Path(root) if root is not None else None
    if base is None or not base.is_dir():
        return out
    for level in range(1, depth + 1):
        for index in sorted(base.glob("/".join(["*"] * level) + "/model_index.json")):
            rel = index.parent.relative_to(base).as_posix()
            if not any(part.startswith(".") for part in rel.split("/")):
                out[rel] = index.parent
    return out


def resolve_model_folder(roots: Sequence[str | Path], name: str) -> Path:
    """The folder ``name`` inside one of ``roots``; clear errors for traversal and missing folders."""
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ConfigError("model", f"model {name!r} must be the name of a folder in models/diffusers")
    for root in roots:
        candidate = Path(root) / name
        if candidate.is_dir():
            if candidate.resolve().parent != Path(root).resolve():
                raise ConfigError("model", f"model folder {name!r} points outside {root}; refused")
            return candidate
    searched = ", ".join(str(r) for r in roots) or "(no diffusers folder configured)"
    raise FileNotFoundError(f"model folder {name!r} does not exist in {searched}; put a diffusers "
                            "StableDiffusionPipeline folder (model_index.json, unet/, vae/, ...) there")


def resolve_checkpoint(roots: Sequence[str | Path], name: str) -> Path:
    """The single file ``name`` (relative, may be in a subfolder) inside one of the checkpoint ``roots``;
    refuses traversal, other formats and missing files with one message."""
    from .safe_io import InvalidModelFile

    if not name.lower().endswith(".safetensors"):
        raise InvalidModelFile(f"checkpoint {name!r}: only .safetensors single files are accepted (no pickles)")
    for root in roots:
        base = Path(root).resolve()
        candidate = (base / name).resolve()
        if not candidate.is_relative_to(base):
            raise ConfigError("model", f"checkpoint {name!r} points outside {root}; refused")
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"checkpoint {name!r} does not exist in models/checkpoints")
