"""Load a text-to-image model from local files, offline, as the ``TrainableModel`` of its architecture.

``load_model(path)`` is the one entry point for the trainer, ``rlr-sample`` and the UIs:

* ``None``: the embedded default model (SD1.x layout);
* a diffusers folder whose ``model_index.json`` names ``StableDiffusionPipeline`` (SD1.x, SD2.x incl.
  v-prediction: the scheduler config says which) or ``StableDiffusionXLPipeline`` (SDXL base);
* a diffusers folder of a flow-matching pipeline, ``StableDiffusion3Pipeline`` (SD3 / SD3.5, T5 optional),
  ``FluxPipeline`` (FLUX.1), ``ZImagePipeline`` (Z-Image) or ``QwenImagePipeline`` (Qwen-Image), or the name
  ``default-flow``: the adapters of
  :mod:`rlr_backend.models.flow_model` (``image_size`` applies to them; a folder's ``rlr_defaults.json`` is
  read into ``pipe.rlr_defaults``);
* a single-file ``.safetensors`` checkpoint (ComfyUI/A1111 layout), see
  :mod:`rlr_backend.models.single_file`;
* a flow transformer file (ComfyUI ``models/diffusion_models``: SD3 / SD3.5, FLUX.1, Z-Image) with its
  text encoder files, VAE file and tokenizer folder (options ``text_encoders``, ``vae``, ``tokenizer``), see
  :mod:`rlr_backend.models.flow_single_file`.

Weights are read from ``.safetensors`` only (``use_safetensors=True``); no pickle is ever loaded. The
folder scan follows symlinks (a linked ``unet/`` is scanned too) and judges files by their real names
and, for ``.safetensors``, by their first bytes: a pickle under a ``.safetensors`` name is refused; pickles
*beside* the safetensors weights (a full clone of an official repository ships ``.bin`` files too) are
ignored with one info line; a component whose weights exist only as a pickle is refused naming it.
Every sharded-weights index may name only ``.safetensors`` files of its own folder. Nothing is ever
downloaded (``local_files_only=True``, ``HF_HUB_OFFLINE=1``).

Precision: the UNet and the VAE are loaded in ``dtype`` and the text encoders in
``text_encoder_dtype``, straight from the files: a folder's ``*.fp16.safetensors`` variant is read when a
half precision is asked for and every component has one; a component whose files hold another dtype
is built on the meta device and read tensor by tensor (:mod:`rlr_backend.models.folder_weights`); the
rest is diffusers/transformers' own meta-device load. Peak memory stays near the loaded model's size
(docs/models.md has the measured figures). The memory a load needs is checked against
the memory available before anything is read. After loading, every weight must be finite and the
scheduler's noise schedule valid, or the model is refused naming the tensor.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch

from ..model_paths import FLOW_PIPELINES, is_flow_folder, read_flow_defaults, read_model_index, resolve_model_name
from ..safe_io import PICKLE_SUFFIXES, InvalidModelFile, index_shards, nonfinite_count, one_line, safetensors_header
from .weights import has_nonfinite

logger = logging.getLogger(__name__)

#: model_index.json ``_class_name`` -> (architecture, components that must hold config + safetensors weights)
PIPELINE_LAYOUTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "StableDiffusionPipeline": ("SD1.x/SD2.x", ("unet", "vae", "text_encoder")),
    "StableDiffusionXLPipeline": ("SDXL", ("unet", "vae", "text_encoder", "text_encoder_2")),
    "StableDiffusion3Pipeline": ("SD3/SD3.5", ("transformer", "vae", "text_encoder", "text_encoder_2")),
    "FluxPipeline": ("FLUX.1", ("transformer", "vae", "text_encoder", "text_encoder_2")),
    "ZImagePipeline": ("Z-Image", ("transformer", "vae", "text_encoder")),
    "QwenImagePipeline": ("Qwen-Image", ("transformer", "vae", "text_encoder")),
}
_TOKENIZERS = {"StableDiffusionPipeline": ("tokenizer",), "StableDiffusionXLPipeline": ("tokenizer", "tokenizer_2"),
               "StableDiffusion3Pipeline": ("tokenizer", "tokenizer_2"), "FluxPipeline": ("tokenizer", "tokenizer_2"),
               "ZImagePipeline": ("tokenizer",), "QwenImagePipeline": ("tokenizer",)}
#: flow-matching pipelines' components that a folder may leave out (``[null, null]`` in model_index.json, as
#: diffusers allows: SD3 without T5) -> its tokenizer
OPTIONAL_COMPONENTS: dict[str, dict[str, str]] = {"StableDiffusion3Pipeline": {"text_encoder_3": "tokenizer_3"}}
#: loader options naming a flow transformer file's other files (``models.flow_single_file``)
FLOW_FILE_OPTIONS: tuple[str, ...] = ("text_encoders", "vae", "tokenizer")
#: every weight-bearing component a loaded pipeline may have (checked for NaN/inf and dtypes)
WEIGHT_COMPONENTS: tuple[str, ...] = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")


def required_components(cls: str, index: dict) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(weight components, tokenizers) a ``cls`` folder must have: the layout's, plus the optional ones its
    model_index.json names (not ``[null, null]``)."""
    comps, toks = list(PIPELINE_LAYOUTS[cls][1]), list(_TOKENIZERS[cls])
    for comp, tok in OPTIONAL_COMPONENTS.get(cls, {}).items():
        entry = index.get(comp)
        if isinstance(entry, list) and any(v is not None for v in entry):
            comps.append(comp)
            toks.append(tok)
    return tuple(comps), tuple(toks)


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
    components, tokenizers = required_components(cls, index)
    scan_model_folder(p, components)
    missing = []
    for comp in components:
        if not (p / comp / "config.json").is_file():
            missing.append(f"{comp}/config.json")
        if not weight_files(p / comp):
            missing.append(f"{comp}/*.safetensors")
    for tok in tokenizers:
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


def _is_pickle_name(f: Path) -> bool:
    """A pickle by its name or, for a symlink, by its target's name."""
    return any(n.lower().endswith(PICKLE_SUFFIXES) for n in (f.name, Path(os.path.realpath(f)).name))


def weight_files(component: Path) -> list[Path]:
    """The ``.safetensors`` weight files of a component folder (by their real names: a link named
    ``.safetensors`` to a pickle does not count)."""
    if not component.is_dir():
        return []
    return sorted(f for f in component.iterdir() if f.name.lower().endswith(".safetensors") and not _is_pickle_name(f))


def scan_model_folder(folder: Path, components: tuple[str, ...] = ()) -> None:
    """Check a model folder, behind symlinks too, before anything is loaded: every ``.safetensors`` file
    must be safetensors by its bytes (a pickle renamed is refused) with float weights, and every
    sharded-weights index may name only ``.safetensors`` shards of its own folder. Pickles are never
    read: beside safetensors weights they are ignored (one info line); a component of ``components``
    whose weights exist only as a pickle is refused naming it."""
    pickles = []
    for f in _walk(folder):
        if _is_pickle_name(f):
            pickles.append(f)
        elif f.name.lower().endswith(".safetensors"):
            check_float_weights(f)  # a pickle renamed .safetensors is refused by its bytes
        elif f.name.endswith(".index.json"):
            index_shards(f)
    only_pickled = [c for c in components if not weight_files(folder / c)
                    and any(p.parent == folder / c or os.path.realpath(p.parent) == os.path.realpath(folder / c)
                            for p in pickles)]
    if only_pickled:
        comp = only_pickled[0]
        names = sorted(p.name for p in pickles if os.path.realpath(p.parent) == os.path.realpath(folder / comp))
        raise InvalidModelFile(f"{folder}: the {comp} weights exist only as a pickle ({comp}/{names[0]}); pickles are "
                               "never loaded: convert it to .safetensors with a tool you trust, or use a copy of the "
                               "model that ships .safetensors")
    if pickles:
        shown = sorted(str(p.relative_to(folder)) for p in pickles)
        logger.info("%s: ignoring %d pickle file(s) beside the .safetensors weights (%s%s); pickles are never loaded",
                    folder, len(shown), ", ".join(shown[:3]), ", ..." if len(shown) > 3 else "")


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


def check_weights(pipe, source: object, finite: bool = True) -> None:
    """Refuse a loaded pipeline whose weights hold NaN/inf (with ``finite``) or non-float tensors, or whose
    noise schedule is not a valid one (a NaN ``beta_start`` gives NaN images), naming the component and
    the tensor."""
    for comp in WEIGHT_COMPONENTS:
        module = getattr(pipe, comp, None)
        if module is None:
            continue
        for name, t in module.state_dict().items():
            if not t.is_floating_point() and not name.endswith(INTEGER_BUFFERS):
                raise InvalidModelFile(f"{source}: {comp} tensor {name!r} has dtype {t.dtype}, not a floating type")
            bad = nonfinite_count(t) if finite and has_nonfinite(t) else 0
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


def _variant_of(f: Path) -> str | None:
    """``fp16`` for ``model.fp16.safetensors`` / ``model.fp16-00001-of-00002.safetensors``, None without a variant."""
    stem = f.name[:-len(".safetensors")].split("-0", 1)[0]
    return stem.rsplit(".", 1)[1] if "." in stem else None


def _half_variant(folder: Path, components: tuple[str, ...]) -> str | None:
    """``fp16`` when every component has ``*.fp16.safetensors`` weights (the official repositories' half
    precision copies), else None."""
    ok = all(any(_variant_of(f) == "fp16" for f in weight_files(folder / c)) for c in components)
    return "fp16" if ok else None


def _folder_weight_bytes(folder: Path, components: tuple[str, ...], variant: str | None,
                         dtypes: dict[str, torch.dtype]) -> int:
    """Bytes the components' weights take once loaded in their dtypes, from the headers of the files
    diffusers will read."""
    from .weights import header_tensors, tensor_bytes

    total = 0
    for comp in components:
        dtype = dtypes.get(comp, dtypes["default"])
        for f in weight_files(folder / comp):
            if _variant_of(f) == variant:
                total += tensor_bytes(header_tensors(f).values(), lambda t: dtype)
    return total


def load_pipeline(model: str | Path | None = None, dtype: torch.dtype = torch.float32,
                  text_encoder_dtype: torch.dtype | None = None, **single_file):
    """The diffusers pipeline for ``model`` (see the module docstring), on CPU, progress bar off: UNet and
    VAE in ``dtype``, text encoders in ``text_encoder_dtype`` (default ``dtype``). ``single_file`` options
    (``image_size``, ``prediction_type``) apply to single-file checkpoints only; ``text_encoders``, ``vae`` and
    ``tokenizer`` to flow transformer files only."""
    from .default_model import load_default_pipeline
    from .weights import check_memory

    text_dtype = text_encoder_dtype or dtype
    dtypes = {"default": dtype, "text_encoder": text_dtype, "text_encoder_2": text_dtype}
    if model is None:
        pipe = load_default_pipeline(dtype=dtypes)
        check_weights(pipe, "the embedded default model")
        return pipe
    p = Path(resolve_model_name(model))
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise InvalidModelFile(f"{p}: pickle-based checkpoints (.ckpt/.pt/.bin) are not accepted; use a diffusers "
                               "folder or a single-file checkpoint with .safetensors weights")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parts = {k: single_file.pop(k) for k in FLOW_FILE_OPTIONS if single_file.get(k)}
    single_file = {k: v for k, v in single_file.items() if k not in FLOW_FILE_OPTIONS}
    if p.is_file() or p.suffix.lower() == ".safetensors":
        from .flow_detect import flow_transformer_layout
        from .single_file import load_single_file

        flow = p.is_file() and flow_transformer_layout(safetensors_header(p)) is not None
        if flow:
            from .flow_single_file import load_flow_single_file

            if "prediction_type" in single_file:
                raise ValueError(f"prediction_type is a DDIM option; {p.name} is a flow-matching transformer")
            pipe = load_flow_single_file(p, dtype=dtype, text_encoder_dtype=text_dtype, **parts, **single_file)
        else:
            if parts:
                raise ValueError(f"{', '.join(parts)} only apply to a flow transformer file (ComfyUI "
                                 f"models/diffusion_models); {p.name} is not one")
            if p.is_file() and p.suffix.lower() == ".safetensors":
                check_float_weights(p, SINGLE_FILE_PARTS)
            pipe = load_single_file(p, dtype=dtype, text_encoder_dtype=text_dtype, **single_file)
        check_weights(pipe, p, finite=False)  # each tensor was checked as it was read, naming the file's key
        return pipe
    if parts:
        raise ValueError(f"{', '.join(parts)} only apply to a flow transformer file (ComfyUI models/diffusion_models); "
                         "a diffusers folder has its own components")
    image_size = single_file.pop("image_size", None) if is_flow_folder(p) else None
    if single_file:
        raise ValueError(f"{', '.join(single_file)} only apply to single-file checkpoints; a diffusers folder's "
                         "configs decide them")
    cls = check_pipeline_dir(p)
    import diffusers

    components = required_components(cls, read_model_index(p))[0]
    dtypes["text_encoder_3"] = text_dtype
    # half precision: read the fp16 copies when the folder has them (half the bytes; fp32 text encoders are
    # then upcast from them)
    variant = _half_variant(p, components) if dtype != torch.float32 else None
    needed = _folder_weight_bytes(p, components, variant, dtypes)
    check_memory(needed, f"{p.name} ({cls}, {needed / 1e9:.1f} GB of weights)")
    kwargs = dict(local_files_only=True, low_cpu_mem_usage=True)
    if cls == "StableDiffusionPipeline":
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    elif cls == "StableDiffusionXLPipeline":
        kwargs.update(add_watermarker=False)
    elif cls == "StableDiffusion3Pipeline" and "text_encoder_3" not in components:
        kwargs.update(text_encoder_3=None, tokenizer_3=None)
    if variant is None:  # files in another precision than asked: read them tensor by tensor (low peak)
        from .folder_weights import load_cast_components

        kwargs.update(load_cast_components(p, components, dtypes, lambda c: [
            f for f in weight_files(p / c) if _variant_of(f) is None]))
    try:
        pipe = getattr(diffusers, cls).from_pretrained(str(p), dtype=dtypes, use_safetensors=True, variant=variant,
                                                       **kwargs)
    except Exception as e:  # corrupt weights or configs: diffusers/safetensors raise many types
        raise ValueError(f"could not load the {cls} folder {p} ({type(e).__name__}: {one_line(e)[:500]})") from e
    check_weights(pipe, p)
    pipe.set_progress_bar_config(disable=True)
    if cls in FLOW_PIPELINES:  # read by models.flow_model.FlowModel
        pipe.rlr_defaults = read_flow_defaults(p)
        pipe.rlr_image_size = image_size
    logger.info("loaded %s (%s) from %s%s", cls, PIPELINE_LAYOUTS[cls][0], p, f" ({variant} weights)" if variant else "")
    return pipe


def model_for_pipeline(pipe):
    """The ``TrainableModel`` wrapping a loaded pipeline: ``SDXLModel`` for SDXL, the flow-matching adapters for
    SD3 / FLUX.1 / Z-Image / Qwen-Image (``models.flow_model``), else ``DiffusersModel``."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from .diffusers_model import DiffusersModel
    from .sdxl_model import SDXLModel

    flow = flow_model_class(type(pipe).__name__)
    if flow is not None:
        return flow(pipe)

    if isinstance(pipe, StableDiffusionXLPipeline):
        return SDXLModel(pipe)
    if isinstance(pipe, StableDiffusionPipeline):
        return DiffusersModel(pipe)
    raise ValueError(f"unsupported pipeline {type(pipe).__name__}; supported: {', '.join(PIPELINE_LAYOUTS)}")


def flow_model_class(pipeline_class: str):
    """The flow-matching ``TrainableModel`` class for a diffusers pipeline class name, or None."""
    if pipeline_class == "StableDiffusion3Pipeline":
        from .flow_model import SD3Model
        return SD3Model
    if pipeline_class == "FluxPipeline":
        from .flux_model import FluxModel
        return FluxModel
    if pipeline_class == "ZImagePipeline":
        from .zimage_model import ZImageModel
        return ZImageModel
    if pipeline_class == "QwenImagePipeline":
        from .qwenimage_model import QwenImageModel
        return QwenImageModel
    return None


def load_model(model: str | Path | None = None, dtype: torch.dtype = torch.float32,
               text_encoder_dtype: torch.dtype | None = None, **single_file):
    """Load ``model`` (None: the embedded default; a diffusers folder; a single-file .safetensors) as
    the ``TrainableModel`` of its architecture (dtypes and ``single_file``: see :func:`load_pipeline`)."""
    return model_for_pipeline(load_pipeline(model, dtype=dtype, text_encoder_dtype=text_encoder_dtype, **single_file))
