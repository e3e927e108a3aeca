"""What the nodes do, without ComfyUI: sockets' payloads, input ranges from the backend's config,
filename checks, running the trainer and the sampler. The V3 node classes in ``nodes.py`` only
translate between ComfyUI and these functions, so this module is tested without ComfyUI.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ContextManager, Protocol, Sequence

import torch

from rlr_backend.choices import ESTIMATOR_CHOICES, RewardTerm, format_reward_spec, reward_term
from rlr_backend.estimators import ZO_MODES
from rlr_backend.lora.export import check_lora_version
from rlr_backend.model_paths import diffusers_folders, resolve_checkpoint, resolve_model_folder
from rlr_backend.models.trainable import TrainableModel, sample_images
from rlr_backend.rewards import REWARD_HELP, REWARDS, make_reward
from rlr_backend.safe_io import InvalidModelFile, load_tensors, save_tensors
from rlr_backend.train import PromptSpec, StepInfo, TrainConfig, Trainer
from rlr_backend.train.prompts import check_prompt_text, prompt_versions

from .watch import release_memory, watch_model_calls

logger = logging.getLogger(__name__)

EMBEDDED = "(embedded default)"
LORA_SUBFOLDER = "rlr"  # models/loras/rlr/: LoRAs of real checkpoints (the core Load LoRA lists them)
EMBEDDED_LORA_FOLDER = "rlr_loras"  # models/rlr_loras/: LoRAs of the embedded default (no core loader lists it)
_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,118}[A-Za-z0-9_-])?")


# -- input declarations from the backend's config ----------------------------------------------------
def config_field(name: str) -> dict[str, Any]:
    """Default, help and bounds of a TrainConfig field, for a node input."""
    for f in fields(TrainConfig):
        if f.name == name:
            default = None if f.default is MISSING else f.default
            return {"default": default, "tooltip": f.metadata["help"], "min": f.metadata.get("min"),
                    "choices": f.metadata.get("choices")}
    raise KeyError(f"TrainConfig has no field {name!r}")


# -- socket payloads ---------------------------------------------------------------------------------
class ModelSource(Protocol):
    """RLR_MODEL: a recipe for a fresh trainable model (training adds a LoRA, so each run loads anew)."""

    name: str

    def load(self) -> TrainableModel: ...

    def training(self) -> ContextManager[None]:
        """Entered while a run trains (ComfyUI's training switch for its MODELs)."""
        ...


@dataclass(frozen=True)
class DiffusersSource:
    """The embedded default (``path=None``), a diffusers StableDiffusionPipeline folder, or a single-file
    ``.safetensors`` checkpoint (``image_size``: its training resolution, None for the native one)."""

    path: str | None = None
    image_size: int | None = None

    @property
    def name(self) -> str:
        return EMBEDDED if self.path is None else Path(self.path).name

    def load(self) -> TrainableModel:
        from rlr_backend.models.loader import load_model

        return load_model(self.path, **({"image_size": self.image_size} if self.image_size else {}))

    def training(self) -> ContextManager[None]:
        return contextlib.nullcontext()


@dataclass(frozen=True)
class PromptPlan:
    """RLR_PROMPTS: prompts with coarse / mid / fine versions, the split of the chain between the
    versions, and the paper-order range the half-order term focuses on (None: uniform)."""

    prompts: tuple[PromptSpec, ...]
    split: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)
    ho_range: tuple[int, int] | None = None


class LoraDict(dict):
    """LORA_MODEL: kohya keys -> tensors (what ComfyUI's LoraModelLoader takes), plus the header."""

    def __init__(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
        super().__init__(tensors)
        self.metadata = dict(metadata or {})


def check_source(source: Any, node: str) -> ModelSource:
    if not all(callable(getattr(source, m, None)) for m in ("load", "training")):
        raise ValueError(f"{node}: the rlr_model input is not an RLR model (got {type(source).__name__}); connect "
                         "RLR Load Model or RLR From Comfy Model")
    return source


def add_reward(chain: tuple[RewardTerm, ...] | None, name: str, weight: float, target: str = "") -> tuple[RewardTerm, ...]:
    """RLR_REWARD: a weighted sum, one term per chained Reward node; ``target`` is the argument of a reward
    that takes one (``position``: left / right / top / bottom / center / X:Y; ``size``: a fraction), empty
    for its default. A node with weight 0 would add nothing, so it is refused."""
    term = reward_term(name, weight, target)
    if term.weight == 0:
        raise ValueError(f"reward weight for {name!r} must be a non-zero number, got {weight}")
    return tuple(chain or ()) + (term,)


def reward_spec(chain: Sequence[RewardTerm]) -> str:
    if not chain:
        raise ValueError(f"no reward given; connect an RLR Reward node ({', '.join(sorted(REWARDS))})")
    return format_reward_spec(chain)


def estimator_settings(estimator: str, **knobs) -> dict[str, Any]:
    """RLR_ESTIMATOR: the TrainConfig fields of the estimator and its knobs, validated now."""
    if estimator not in ESTIMATOR_CHOICES:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {list(ESTIMATOR_CHOICES)}")
    if knobs.get("zo_mode", "latent_lr") not in ZO_MODES:
        raise ValueError(f"unknown zo_mode {knobs['zo_mode']!r}; choose one of {list(ZO_MODES)}")
    settings = {"estimator": estimator, **knobs}
    config = TrainConfig(**settings)  # raises on impossible values
    if estimator != "auto":  # auto is resolved by the trainer, once it knows the reward
        config.estimator_config()
    return settings


def add_prompt(plan: PromptPlan | None, fine: str, coarse: str = "", mid: str = "", coarse_end: float = 1 / 3,
               mid_end: float = 2 / 3, ho_start: int = 0, ho_end: int = 0) -> PromptPlan:
    """Append one prompt (with optional coarse / mid versions) to ``plan``; the split and HO range of the
    last node in a chain apply to all of its prompts."""
    spec = prompt_versions(fine, coarse, mid)  # a fine prompt 'coarse | mid | fine' with the others empty works too
    if not 0 < coarse_end < mid_end < 1:
        raise ValueError(f"step ranges need 0 < coarse_end < mid_end < 1, got {coarse_end} and {mid_end}")
    split = (coarse_end, mid_end - coarse_end, 1 - mid_end)
    if (ho_start, ho_end) == (0, 0):
        ho = None
    elif 1 <= ho_start <= ho_end:
        ho = (int(ho_start), int(ho_end))
    else:
        raise ValueError(f"HO range needs 1 <= ho_start <= ho_end (paper order, 1 = last step) or both 0 for "
                         f"uniform; got {ho_start}..{ho_end}")
    prompts = (plan.prompts if plan is not None else ()) + (spec,)
    return PromptPlan(prompts, split, ho)


# -- filenames ---------------------------------------------------------------------------------------
def lora_target(loras_dir: str | Path, filename: str, overwrite: bool = False,
                subfolder: str = LORA_SUBFOLDER) -> Path:
    """The path ``<loras_dir>/<subfolder>/<filename>.safetensors``, refusing traversal, odd names and,
    unless ``overwrite``, an existing file. Checked after resolving symlinks."""
    raw = (filename or "").strip()
    name = raw[: -len(".safetensors")] if raw.lower().endswith(".safetensors") else raw
    label = "/".join(p for p in (Path(loras_dir).name, subfolder) if p)
    if not _NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"filename {filename!r} is not accepted: use letters, digits, '.', '_' and '-' only "
                         f"(no folders, no '..'); the file goes to {label}/")
    if name.split(".")[0].upper() in {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)),
                                      *(f"LPT{i}" for i in range(1, 10))}:
        raise ValueError(f"filename {filename!r} is a reserved device name on Windows")
    root = Path(loras_dir).resolve()
    folder = root / subfolder if subfolder else root
    target = (folder / f"{name}.safetensors")
    resolved = target.resolve()
    if resolved.parent != folder.resolve() or not str(resolved).startswith(str(root) + "/"):
        raise ValueError(f"filename {filename!r} would be written outside {root}; refused")
    if target.exists() and not overwrite:
        raise FileExistsError(f"{label}/{target.name} already exists; choose another filename or "
                              "set overwrite to true")
    return target


def lora_base(lora: dict) -> str | None:
    """The base-model id in a LoRA's header (kohya ``ss_base_model_version``), None without one."""
    return getattr(lora, "metadata", {}).get("ss_base_model_version") or None


def is_embedded_lora(lora: dict) -> bool:
    from rlr_backend.models.default_model import BASE_MODEL_VERSION

    return lora_base(lora) == BASE_MODEL_VERSION


def save_lora_file(lora: dict, target: Path) -> Path:
    """Write a LORA_MODEL atomically (finite tensors only)."""
    if not lora:
        raise ValueError("the LoRA is empty; connect the lora output of RLR Trainer")
    bad = [k for k, v in lora.items() if not torch.is_tensor(v) or not torch.isfinite(v.float()).all()]
    if bad:
        raise ValueError(f"the LoRA has {len(bad)} non-finite or non-tensor entries (first: {bad[0]}); not saved")
    meta = {str(k): str(v) for k, v in getattr(lora, "metadata", {}).items()}
    save_tensors(dict(lora), target, meta)
    logger.info("saved LoRA to %s", target)
    return target


def read_lora(path: str | Path) -> LoraDict:
    tensors, meta = load_tensors(path)
    return LoraDict(tensors, meta)


# -- training and sampling ---------------------------------------------------------------------------
@dataclass
class TrainOutcome:
    lora: LoraDict
    curve: torch.Tensor  # (1, H, W, 3) ComfyUI IMAGE
    grid: torch.Tensor  # (1, H, W, 3)
    steps_done: int
    stopped_early: bool
    run_dir: Path
    eval_rewards: dict[int, float] = field(default_factory=dict)


def to_comfy_image(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> ComfyUI's IMAGE (B, H, W, 3) float32 on the CPU."""
    return images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).contiguous().cpu()


def png_as_image(path: Path) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr)[None]


def build_config(*, prompts: PromptPlan, reward: Sequence[tuple[str, float]], estimator: dict[str, Any] | None,
                 run_dir: Path, model_label: str | None, **options) -> TrainConfig:
    if not isinstance(prompts, PromptPlan) or not prompts.prompts:
        raise ValueError("RLR Trainer: the prompts input is not a prompt schedule; connect RLR Prompt Schedule")
    if estimator is not None and not isinstance(estimator, dict):
        raise ValueError("RLR Trainer: the estimator input is not an estimator; connect RLR Estimator")
    if not isinstance(reward, tuple):
        raise ValueError("RLR Trainer: the reward input is not a reward; connect RLR Reward")
    est = dict(estimator or {"estimator": "rlr"})
    return TrainConfig(model=model_label, prompts=prompts.prompts, reward=reward_spec(reward),
                       ho_range=prompts.ho_range, prompt_split=prompts.split, output_dir=run_dir.parent,
                       run_name=run_dir.name, **est, **options)


def train(source: ModelSource, config: TrainConfig, *, on_step: Callable[[StepInfo], None] | None = None,
          on_preview: Callable[[torch.Tensor, int], None] | None = None,
          should_stop: Callable[[], bool] | None = None, reward_models_dir: str | None = None,
          on_model_image: Callable[[torch.Tensor], None] | None = None) -> TrainOutcome:
    """One training run in ``config.run_dir`` on a freshly loaded model; memory is released afterwards
    (also when it fails or is cancelled). Preference-model rewards look for their weights in
    ``reward_models_dir`` (ComfyUI's models folder). ``should_stop`` is asked at every model call;
    ``on_model_image`` gets a decoded preview of the model's current estimate now and then.

    Runs with autograd on even inside ComfyUI's ``torch.inference_mode()`` (the model is loaded in here,
    so its weights are ordinary tensors).
    """
    check_source(source, "RLR Trainer")
    trainer = model = reward = None
    try:
        with torch.inference_mode(False), torch.enable_grad(), source.training():
            reward = make_reward(config.reward, models_dir=reward_models_dir)  # weights must be ordinary tensors too; fails before the model loads
            model = source.load()
            if on_model_image is not None:
                watch_model_calls(model, config, on_model_image)
            trainer = Trainer(config, model=model, reward=reward, on_step=on_step, on_preview=on_preview,
                              should_stop=should_stop, progress=False)
            result = trainer.run()
            sd, meta = load_tensors(result.lora_path)
        run = result.run_dir
        grid = run / "before_after.png"
        if not grid.is_file():
            grids = sorted((run / "grids").glob("step-*.png"))
            grid = grids[-1] if grids else None  # stopped during the first evaluation: no grid yet
        curve = png_as_image(run / "reward_curve.png")
        return TrainOutcome(LoraDict(sd, meta), curve, png_as_image(grid) if grid else torch.zeros_like(curve),
                            result.steps_done, result.stopped_early, run, dict(result.eval_rewards))
    finally:
        _release(model)
        del trainer, model, reward
        release_memory()


def sample(source: ModelSource, prompt: str, *, lora: dict | None = None, strength: float = 1.0, seed: int = 0,
           num_images: int = 1, num_steps: int = 20, guidance_scale: float = 4.0, eta: float = 1.0,
           callback: Callable[[dict], None] | None = None) -> torch.Tensor:
    """ComfyUI IMAGE (num_images, H, W, 3) from a fresh model, with the LoRA applied at ``strength``."""
    check_source(source, "RLR Sampler")
    prompt = check_prompt_text(prompt)
    if lora is not None and not isinstance(lora, dict):
        raise ValueError(f"RLR Sampler: the lora input is not a LoRA (got {type(lora).__name__})")
    model = None
    try:
        with torch.inference_mode(False):
            model = source.load()
            if lora is not None and lora_base(lora):  # refused whatever the strength: the wrong LoRA is a mistake
                check_lora_version({"ss_base_model_version": lora_base(lora)}, model.base_model_version,
                                   "RLR Sampler")
            if lora is not None and strength != 0:
                model.load_lora(dict(lora), strength)
            images = sample_images(model, [prompt] * num_images, num_steps=num_steps, eta=eta,
                                   guidance_scale=guidance_scale, seed=seed, callback=callback)
        return to_comfy_image(images)
    finally:
        _release(model)
        del model
        release_memory()


def _release(model) -> None:
    release = getattr(model, "release", None)  # e.g. the comfy model unloads its patchers
    if release is not None:
        release()


def list_model_folders(roots: Sequence[str | Path]) -> list[str]:
    """Names of the diffusers pipeline folders (with model_index.json) directly inside ``roots``."""
    return sorted({name for root in roots for name in diffusers_folders(root)})


CHECKPOINT_PREFIX = "checkpoints/"


def model_choices(diffusers_roots: Sequence[str | Path], checkpoint_names: Sequence[str]) -> list[str]:
    """The RLR Load Model list: the embedded default, diffusers folders, then the ``.safetensors`` files of
    models/checkpoints as ``checkpoints/<name>`` (single files load offline; pickles are not listed)."""
    files = sorted(n for n in checkpoint_names if n.lower().endswith(".safetensors"))
    return [EMBEDDED, *list_model_folders(diffusers_roots), *(CHECKPOINT_PREFIX + n for n in files)]


__all__ = ["CHECKPOINT_PREFIX", "DiffusersSource", "EMBEDDED", "EMBEDDED_LORA_FOLDER", "InvalidModelFile", "LoraDict",
           "PromptPlan", "REWARD_HELP", "add_prompt", "is_embedded_lora", "lora_base", "release_memory",
           "add_reward", "build_config", "check_prompt_text", "config_field", "estimator_settings", "list_model_folders",
           "lora_target", "read_lora", "resolve_checkpoint", "resolve_model_folder", "reward_spec", "sample", "save_lora_file", "train"]
