"""The app's form, free of any UI library: the choices the server lists (models, runs), the form's keys
and defaults (from ``TrainConfig``'s field metadata), and ``check_form``, which turns form values into
``TrainConfig`` arguments with one message per field. Nothing here loads a model or writes a file.
"""

from __future__ import annotations

import functools
import math
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path

from rlr_backend.choices import (ESTIMATOR_CHOICES, REWARD_ARGS, ConfigError, format_reward_spec, parse_reward_spec,
                                 reward_term)
from rlr_backend.estimators import ESTIMATORS
from rlr_backend.models.kind_defaults import DEFAULT_FIELDS, training_defaults
from rlr_backend.model_paths import DEFAULT_FLOW_MODEL_DIR, diffusers_folders, is_flow_folder
from rlr_backend.rewards import REWARDS, make_reward
from rlr_backend.train import TrainConfig
from rlr_backend.train.prompts import parse_prompt_lines

DEFAULT_MODEL = "default (embedded)"
DEFAULT_FLOW_MODEL = "default-flow (embedded, flow matching)"
CFG_FIELDS = {f.name: f for f in fields(TrainConfig)}
MAIN_FIELDS = ("steps", "lr", "lora_rank", "seed", "eval_every")
ADVANCED_FIELDS = ("batch_size", "images_per_prompt", "num_inference_steps", "eta", "guidance_scale", "h",
                   "fo_steps", "zo_mode", "nu", "truncation", "chain_len", "grad_clip", "grad_accum", "lora_alpha",
                   "eval_seeds", "ckpt_every", "kl_weight", "kl_steps", "early_stop_drop", "step_baseline",
                   "best_recheck_seeds")
#: the options of flow-matching models (shown for them only); the SDE window is ``sde_start``/``sde_size``
FLOW_FIELDS = ("image_size", "flow_step", "flow_eta")
#: the DDIM options (SD1.x/SD2.x/SDXL only)
DDIM_FIELDS = ("eta",)
#: fields added to the form later: last in FORM_KEYS, so a positional API caller's earlier values keep their slots
LATER_KEYS = ("step_baseline", "best_recheck_seeds")
#: Form keys in the order of the Train event's inputs (gradio_client callers pass them positionally).
#: ``w:<reward>`` is a reward's weight, ``a:<reward>`` the argument of a reward that takes one (position, size).
FORM_KEYS: tuple[str, ...] = ("model", "prompts", *(f"w:{r}" for r in REWARDS), *(f"a:{r}" for r in REWARD_ARGS),
                              "estimator", *MAIN_FIELDS, *(k for k in ADVANCED_FIELDS if k not in LATER_KEYS),
                              "ho_from", "ho_to", *FLOW_FIELDS, "sde_start", "sde_size", *LATER_KEYS)
LABELS = {"steps": "Steps (optimizer updates)", "lr": "Learning rate (0: the estimator's measured rate)", "lora_rank": "LoRA rank",
          "eval_every": "Refresh the gallery every N updates", "lora_alpha": "LoRA alpha (0: the rank)",
          "image_size": "Image size in pixels (0: the model's, at most 512)", "eta": "Eta (DDIM)",
          "step_baseline": "Step baseline (rlr, zo)"}
APP_DEFAULTS = {"eval_every": 5}  # the app evaluates more often than the CLI so the gallery moves
# Held while models or rewards are built: diffusers' loaders patch torch.nn globally for a moment (new
# parameters land on the "meta" device) and its lazy imports are not thread-safe, so two threads must
# not load at once (seen: a reward built during a pipeline load failed with "Cannot copy out of meta tensor").
MODEL_LOCK = threading.RLock()


@dataclass(frozen=True)
class Settings:
    output_dir: Path
    models_dir: Path | None = None


# -- choices the server computes (never a user-typed path) ----------------------------------------
def list_models(models_dir: Path | None) -> dict[str, Path | None]:
    """Dropdown label -> model folder: the embedded default, the embedded flow-matching default, then the
    diffusers folders up to two levels under ``models_dir`` (``model_paths.diffusers_folders``)."""
    return {DEFAULT_MODEL: None, DEFAULT_FLOW_MODEL: DEFAULT_FLOW_MODEL_DIR, **diffusers_folders(models_dir, depth=2)}


def list_runs(output_dir: Path, with_lora: bool = False) -> list[str]:
    """Run folders under ``output_dir`` (newest first); ``with_lora``: only those with a LoRA."""
    if not output_dir.is_dir():
        return []
    runs = [p for p in output_dir.iterdir() if not p.is_symlink() and p.is_dir() and not p.name.startswith(".")
            and _plain(p / "config.json") and (not with_lora or _plain(p / "lora.safetensors"))]
    return [p.name for p in sorted(runs, key=lambda p: p.stat().st_mtime, reverse=True)]


def _plain(path: Path) -> bool:
    """A regular file, not a symbolic link (a link planted in a run folder could point anywhere)."""
    return not path.is_symlink() and path.is_file()


def is_int_field(name: str) -> bool:
    return CFG_FIELDS[name].type in ("int", "int | None")


def is_bool_field(name: str) -> bool:
    return CFG_FIELDS[name].type == "bool"


def model_is_flow(label: str | None, settings: Settings) -> bool:
    """Whether the model picked in the list samples on a flow-matching chain (its folder's model_index.json)."""
    return is_flow_folder(list_models(settings.models_dir).get(label))


def model_form_defaults(label: str | None, settings: Settings) -> dict[str, object]:
    """The form fields whose defaults depend on the picked model (``models.kind_defaults.training_defaults``: steps,
    guidance, RLR's first-order steps), and the flow fields' own defaults; the app sets them when the model
    changes."""
    base = config_to_form(TrainConfig(), settings)
    values = {k: base[k] for k in (*DEFAULT_FIELDS, *FLOW_FIELDS, "sde_start", "sde_size")}
    try:
        values.update(training_defaults(list_models(settings.models_dir).get(label)))
    except ValueError:  # a damaged rlr_defaults.json: the form check names it when the run starts
        pass
    return values




def config_to_form(cfg: TrainConfig, settings: "Settings") -> dict[str, object]:
    """Form values that reproduce ``cfg`` (a reopened page shows the settings of the run in progress)."""
    models = {None if p is None else str(p): label for label, p in list_models(settings.models_dir).items()}
    values: dict[str, object] = {"model": models.get(cfg.model, DEFAULT_MODEL),
                                 "prompts": "\n".join(" | ".join(p.versions()) if p.scheduled else p.fine
                                                      for p in cfg.prompts)}
    terms = {t.name: t for t in parse_reward_spec(cfg.reward)}
    values.update({f"w:{r}": terms[r].weight if r in terms else 0.0 for r in REWARDS})
    values.update({f"a:{r}": terms[r].arg if r in terms else default for r, default in REWARD_ARGS.items()})
    values["a:size"] = float(values["a:size"])
    values["estimator"] = cfg.estimator
    for name in (*MAIN_FIELDS, *ADVANCED_FIELDS):
        values[name] = getattr(cfg, name)
    values["lora_alpha"] = cfg.lora_alpha or 0
    values["lr"] = cfg.lr or 0
    values["ho_from"], values["ho_to"] = cfg.ho_range or (0, 0)
    for name in FLOW_FIELDS:
        values[name] = getattr(cfg, name)
    values["image_size"] = cfg.image_size or 0
    values["sde_start"], values["sde_size"] = cfg.sde_window or (0, 0)
    return values


def form_defaults() -> dict[str, object]:
    values = config_to_form(TrainConfig(), Settings(Path("runs")))
    values.update(APP_DEFAULTS)
    return values


# -- form -> TrainConfig, with one message per field -----------------------------------------------
def number(value, integer: bool) -> tuple[float | int | None, str | None]:
    if value is None or value == "":
        return None, "enter a number"
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None, f"must be a number, got {value!r}"
    if not math.isfinite(x):
        return None, f"must be a finite number, got {value}"
    if integer:
        if x != int(x):
            return None, f"must be a whole number, got {value}"
        return int(x), None
    return x, None


@functools.lru_cache(maxsize=None)
def reward_facts(name: str) -> tuple[bool, bool]:
    """(differentiable, is a model reward with local weights) of a registry reward."""
    with MODEL_LOCK:
        reward = REWARDS[name]()  # model rewards touch no file until checked
    return bool(reward.differentiable), callable(getattr(reward, "check", None))


def _differentiable(name: str) -> bool:
    return reward_facts(name)[0]


def is_model_reward(name: str) -> bool:
    return reward_facts(name)[1]


def check_form(values: dict, settings: Settings, estimator: str | None = None) -> tuple[dict[str, str], dict]:
    """(errors by form key, TrainConfig keyword arguments). Nothing here loads a model or writes a file."""
    errors: dict[str, str] = {}
    kw: dict[str, object] = {}
    models = list_models(settings.models_dir)
    model = values.get("model")
    if model not in models:
        errors["model"] = f"unknown model {model!r}; choose one from the list"
    elif models[model] is not None and not (models[model] / "model_index.json").is_file():
        errors["model"] = f"model folder {model!r} is missing; press refresh"
    else:
        kw["model"] = None if models[model] is None else str(models[model])
    flow = model in models and is_flow_folder(models[model])
    try:
        kw["prompts"] = tuple(parse_prompt_lines(values.get("prompts", "")))
    except ConfigError as e:
        errors["prompts"] = str(e)
    parts = []
    for r in REWARDS:
        w, err = number(values.get(f"w:{r}"), integer=False)
        if err:
            errors[f"w:{r}"] = f"weight {err}"
        elif w:
            parts.append((r, w))
    if not parts and not any(k.startswith("w:") for k in errors):
        errors[f"w:{next(iter(REWARDS))}"] = "set at least one reward weight (not 0)"
    args = {}
    for r in REWARD_ARGS:  # checked whether or not the reward is used, so a bad target shows at once
        try:
            args[r] = reward_term(r, 1.0, str(values.get(f"a:{r}") or "")).arg
        except ConfigError as e:
            errors[f"a:{r}"] = str(e)
    terms = [reward_term(r, w, args.get(r)) for r, w in parts if r in args or r not in REWARD_ARGS]
    kw["reward"] = format_reward_spec(terms) if terms else ""
    for r, _ in parts:
        if is_model_reward(r):
            try:  # model rewards check their weight files (headers only; no model is built)
                make_reward(r)
            except (ValueError, FileNotFoundError) as e:
                errors[f"w:{r}"] = str(e).replace("\n", " ")
    est = estimator or values.get("estimator")
    if est not in ESTIMATOR_CHOICES:
        errors["estimator"] = f"unknown estimator {est!r}; choose one of {list(ESTIMATOR_CHOICES)}"
    else:
        kw["estimator"] = est
        if (parts and est in ESTIMATORS and ESTIMATORS[est].needs_differentiable_reward
                and not all(_differentiable(r) for r, _ in parts)):
            errors["estimator"] = f"{est} back-propagates the reward; choose differentiable rewards or rlr/ddpo/zo"
    # a family's own options only: DDIM eta for SD models, the flow options for flow-matching ones (the other
    # family's fields are hidden in the page and keep their defaults)
    names = [n for n in (*MAIN_FIELDS, *ADVANCED_FIELDS, *FLOW_FIELDS)
             if not (n in DDIM_FIELDS and flow) and not (n in FLOW_FIELDS and not flow)]
    for name in names:
        if "choices" in CFG_FIELDS[name].metadata:
            if values.get(name) not in CFG_FIELDS[name].metadata["choices"]:
                errors[name] = f"choose one of {list(CFG_FIELDS[name].metadata['choices'])}"
            kw[name] = values.get(name)
            continue
        if is_bool_field(name):  # a checkbox: True/False only (an API caller may send anything)
            if not isinstance(values.get(name), bool):
                errors[name] = f"must be true or false, got {values.get(name)!r}"
            kw[name] = values.get(name)
            continue
        x, err = number(values.get(name), is_int_field(name))
        lo = CFG_FIELDS[name].metadata.get("min")
        if err is None and lo is not None and x < lo:
            err = f"must be >= {lo}, got {x}"
        if err:
            errors[name] = err
        kw[name] = x
    for name in ("lora_alpha", "image_size", "lr"):  # 0: the default
        if name in kw and name not in errors:
            kw[name] = kw[name] or None
    if flow:
        _pair_field(values, "sde_start", "sde_size", "sde_window", errors, kw,
                    lambda a, b: a >= 0 and b >= 1, "need start >= 0 and size >= 1 (0 and 0: every step)")
    n = kw.get("num_inference_steps")
    _pair_field(values, "ho_from", "ho_to", "ho_range", errors, kw,
                lambda a, b: isinstance(n, int) and 1 <= a <= b <= n, "need 1 <= from <= to <= sampling steps")
    if not errors:
        try:
            TrainConfig(**kw, output_dir=settings.output_dir, run_name="check")
        except ConfigError as e:
            errors[form_key(e.field, parts)] = str(e)
        except ValueError as e:  # not a user's setting: shown on the estimator, never a crash
            errors["estimator"] = str(e)
    return errors, kw


def _pair_field(values: dict, key_a: str, key_b: str, name: str, errors: dict, kw: dict, valid, rule: str) -> None:
    """Two whole-number fields giving the tuple option ``name`` (0 and 0: not set)."""
    a, err_a = number(values.get(key_a), True)
    b, err_b = number(values.get(key_b), True)
    if err_a or err_b:
        errors[key_a if err_a else key_b] = err_a or err_b
    elif a or b:
        if not valid(a, b):
            errors[key_a] = f"{rule}, got {a}, {b}"
        kw[name] = (a, b)


def form_key(field: str, parts: list[tuple[str, float]]) -> str:
    """The form key that shows a ``ConfigError`` of a TrainConfig field (the estimator's for settings with no
    field of their own)."""
    if field == "reward":
        return f"w:{parts[0][0]}" if parts else f"w:{next(iter(REWARDS))}"
    if field in ("ho_range", "sde_window"):
        return {"ho_range": "ho_from", "sde_window": "sde_start"}[field]
    return field if field in FORM_KEYS else "estimator"


def new_run_name(output_dir: Path, tag: str) -> str:
    base = time.strftime("%Y%m%d-%H%M%S") + "-" + tag
    name, i = base, 2
    while (output_dir / name).exists():
        name, i = f"{base}-{i}", i + 1
    return name
