"""Model paths a user gives or picks, checked in one place (plain Python, no torch).

* ``check_model_path``: a path typed on the command line (exists, not a pickle).
* ``diffusers_folders``: the diffusers pipeline folders under a models folder, for a list to pick from
  (the Gradio app's model list, ComfyUI's RLR Load Model).
* ``resolve_model_folder`` / ``resolve_checkpoint``: a picked name back to a path inside its folders,
  refusing traversal, links out of the folder, other formats and missing files.

The loader (``models.loader``) then checks the contents. Errors a user can fix are ``ConfigError``
(field ``model``), ``FileNotFoundError`` or ``InvalidModelFile``, each one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .choices import ConfigError


def check_model_path(path: str | None, field: str = "model") -> None:
    """A model given by path must exist and must not be a pickle (the loader checks its contents)."""
    if path is None:
        return
    from .safe_io import PICKLE_SUFFIXES, InvalidModelFile

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
