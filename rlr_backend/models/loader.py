"""Load a text-to-image model from local files, offline, as the ``TrainableModel`` of its architecture.

``load_model(path)`` is the one entry point for the trainer, ``rlr-sample`` and the UIs:

* ``None``: the embedded default model (SD1.x layout);
* a diffusers folder whose ``model_index.json`` names ``StableDiffusionPipeline`` (SD1.x, SD2.x incl.
  v-prediction: the scheduler config says which) or ``StableDiffusionXLPipeline`` (SDXL base);
* a single-file ``.safetensors`` checkpoint (ComfyUI/A1111 layout), see
  :mod:`rlr_backend.models.single_file`.

Weights are read from ``.safetensors`` only (``use_safetensors=True``); pickles are refused before
anything is loaded: the folder scan follows symlinks (a linked ``unet/`` is scanned too) and judges
files by their first bytes as well as their names, and every sharded-weights index may name only
``.safetensors`` files of its own folder. Nothing is ever downloaded (``local_files_only=True``,
``HF_HUB_OFFLINE=1``). After loading, every weight must be finite and the scheduler's noise schedule
valid, or the model is refused naming the tensor.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch

from ..safe_io import PICKLE_SUFFIXES, InvalidModelFile, index_shards, nonfinite_count, one_line, safetensors_header

logger = logging.getLogger(__name__)

#: model_index.json ``_class_name`` -> (architecture, components that must hold config + safetensors weights)
PIPELINE_LAYOUTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "StableDiffusionPipeline": ("SD1.x/SD2.x", ("unet", "vae", "text_encoder")),
    "StableDiffusionXLPipeline": ("SDXL", ("unet", "vae", "text_encoder", "text_encoder_2")),
}
_TOKENIZERS = {"StableDiffusionPipeline": ("tokenizer",), "StableDiffusionXLPipeline": ("tokenizer", "tokenizer_2")}


def check_pipeline_dir(path: str | Path) -> str:
    """Check a diffusers folder before loading it; return its pipeline class name.

    Raises FileNotFoundError (missing folder/files, listed), InvalidModelFile (pickle weights) or
    ValueError (unsupported pipeline class, naming the supported ones)."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"model folder {p} does not exist")
    index_path = p / "model_index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"{p} is not a diffusers model folder (no model_index.json); give a diffusers folder "
                                "or a single-file .safetensors checkpoint")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{index_path} is not valid JSON ({e})") from e
    cls = index.get("_class_name") if isinstance(index, dict) else None
    if cls not in PIPELINE_LAYOUTS:
        raise ValueError(f"{p}: unsupported architecture {cls!r}; supported diffusers pipelines: "
                         f"{', '.join(f'{k} ({v[0]})' for k, v in PIPELINE_LAYOUTS.items())}")
    scan_model_folder(p)
    missing = []
    for comp in PIPELINE_LAYOUTS[cls][1]:
        if not (p / comp / "config.json").is_file():
            missing.append(f"{comp}/config.json")
        if not any((p / comp).glob("*.safetensors")):
            missing.append(f"{comp}/*.safetensors")
    for tok in _TOKENIZERS[cls]:
        if not (p / tok).is_dir():
            missing.append(f"{tok}/")
    if not (p / "scheduler" / "scheduler_config.json").is_file():
        missing.append("scheduler/scheduler_config.json")
    if missing:
        raise FileNotFoundError(f"model folder {p} ({cls}) is incomplete, missing: {', '.join(missing)}")
    return cls


def _walk(root: Path):
    """Every file under ``root`` with its path as listed, following symlinked folders (each real folder once)."""
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames.clear()
            continue
        seen.add(real)
        for name in filenames:
            yield Path(dirpath) / name


def scan_model_folder(folder: Path) -> None:
    """Refuse a model folder holding anything pickled, behind symlinks too: by suffix (of the name and of
    a symlink's target) and, for weight files, by their first bytes; check every sharded-weights index."""
    pickles = []
    for f in _walk(folder):
        names = {f.name.lower(), Path(os.path.realpath(f)).name.lower()}
        if any(n.endswith(PICKLE_SUFFIXES) for n in names):
            pickles.append(str(f.relative_to(folder)))
        elif f.name.lower().endswith(".safetensors"):
            check_float_weights(f)  # a pickle renamed .safetensors is refused by its bytes
        elif f.name.endswith(".index.json"):
            index_shards(f)
    if pickles:
        raise InvalidModelFile(f"{folder} contains pickle weights ({', '.join(sorted(pickles)[:3])}); only .safetensors "
                               "is accepted")


FLOAT_DTYPES = ("F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2")
INTEGER_BUFFERS = ("position_ids", "num_batches_tracked")


#: the parts of a single-file checkpoint that are loaded (others, e.g. ``model_ema.num_updates``, are not)
SINGLE_FILE_PARTS = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.")


def check_float_weights(path: Path, only: tuple[str, ...] = ("",)) -> None:
    """Refuse a weights file (checked by its bytes) holding a tensor that is not floating point (among the
    names starting with one of ``only``): loading would silently cast it into the model's float weights."""
    for name, info in safetensors_header(path).items():
        if info["dtype"] not in FLOAT_DTYPES and not name.endswith(INTEGER_BUFFERS) and name.startswith(only):
            raise InvalidModelFile(f"{path}: tensor {name!r} has dtype {info['dtype']}; model weights are floating "
                                   "point (the file is damaged or not a model)")


def check_weights(pipe, source: object) -> None:
    """Refuse a loaded pipeline whose weights hold NaN/inf or non-float tensors, or whose noise schedule is
    not a valid one (a NaN ``beta_start`` gives NaN images), naming the component and the tensor."""
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, comp, None)
        if module is None:
            continue
        for name, t in module.state_dict().items():
            if not t.is_floating_point() and not name.endswith(INTEGER_BUFFERS):
                raise InvalidModelFile(f"{source}: {comp} tensor {name!r} has dtype {t.dtype}, not a floating type")
            bad = nonfinite_count(t)
            if bad:
                raise InvalidModelFile(f"{source}: {comp} tensor {name!r} holds {bad} NaN/inf values (of "
                                       f"{t.numel()}); the weights are damaged")
    sched = pipe.scheduler
    for key, value in dict(sched.config).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidModelFile(f"{source}: scheduler setting {key} is {value}; the scheduler config is damaged")
    acp = getattr(sched, "alphas_cumprod", None)
    if acp is not None and not (torch.isfinite(acp).all() and (acp > 0).all() and (acp <= 1).all()):
        raise InvalidModelFile(f"{source}: the scheduler's noise schedule (beta_start, beta_end, ...) gives "
                               "cumulative alphas outside (0, 1]; the scheduler config is damaged")


def load_pipeline(model: str | Path | None = None, dtype: torch.dtype = torch.float32, **single_file):
    """The diffusers pipeline for ``model`` (see the module docstring), on CPU, progress bar off.
    ``single_file`` options (``image_size``, ``prediction_type``) apply to single-file checkpoints only."""
    from .default_model import load_default_pipeline

    if model is None:
        pipe = load_default_pipeline()
        check_weights(pipe, "the embedded default model")
        return pipe
    p = Path(model)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise InvalidModelFile(f"{p}: pickle-based checkpoints (.ckpt/.pt/.bin) are not accepted; use a diffusers "
                               "folder or a single-file checkpoint with .safetensors weights")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if p.is_file() or p.suffix.lower() == ".safetensors":
        from .single_file import load_single_file

        if p.is_file() and p.suffix.lower() == ".safetensors":
            check_float_weights(p, SINGLE_FILE_PARTS)
        pipe = load_single_file(p, dtype=dtype, **single_file)
        check_weights(pipe, p)
        return pipe
    if single_file:
        raise ValueError(f"{', '.join(single_file)} only apply to single-file checkpoints; a diffusers folder's "
                         "configs decide them")
    cls = check_pipeline_dir(p)
    import diffusers

    kwargs = dict(local_files_only=True)
    if cls == "StableDiffusionPipeline":
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    else:
        kwargs.update(add_watermarker=False)
    try:
        pipe = getattr(diffusers, cls).from_pretrained(str(p), dtype=dtype, use_safetensors=True, **kwargs)
    except Exception as e:  # corrupt weights or configs: diffusers/safetensors raise many types
        raise ValueError(f"could not load the {cls} folder {p} ({type(e).__name__}: {one_line(e)[:500]})") from e
    check_weights(pipe, p)
    pipe.set_progress_bar_config(disable=True)
    logger.info("loaded %s (%s) from %s", cls, PIPELINE_LAYOUTS[cls][0], p)
    return pipe


def model_for_pipeline(pipe):
    """The ``TrainableModel`` wrapping a loaded pipeline: ``SDXLModel`` for SDXL, else ``DiffusersModel``."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from .diffusers_model import DiffusersModel
    from .sdxl_model import SDXLModel

    if isinstance(pipe, StableDiffusionXLPipeline):
        return SDXLModel(pipe)
    if isinstance(pipe, StableDiffusionPipeline):
        return DiffusersModel(pipe)
    raise ValueError(f"unsupported pipeline {type(pipe).__name__}; supported: {', '.join(PIPELINE_LAYOUTS)}")


def load_model(model: str | Path | None = None, dtype: torch.dtype = torch.float32, **single_file):
    """Load ``model`` (None: the embedded default; a diffusers folder; a single-file .safetensors) as
    the ``TrainableModel`` of its architecture (``single_file``: see :func:`load_pipeline`)."""
    return model_for_pipeline(load_pipeline(model, dtype=dtype, **single_file))
