"""The names a user chooses from, and the parser of a reward spec, in plain Python (no torch).

The command line, the Gradio form and the ComfyUI nodes validate what a user typed against these
before anything heavy is imported, so a wrong option is reported in well under a second. The
registries that map each name to its implementation (``estimators.ESTIMATORS``, ``rewards.REWARDS``,
``train.memory.PRECISIONS``) check at import time that they cover exactly these names.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple, Sequence

ESTIMATOR_NAMES: tuple[str, ...] = ("code_compat", "ddpo", "full_bp", "rlr", "truncated_bp", "zo")
#: what a user may ask for: a registered estimator, or ``auto``, the measured choice for the reward
#: (TrainConfig.resolve says which; docs/estimators.md has the measurements behind it)
ESTIMATOR_CHOICES: tuple[str, ...] = ("auto", *ESTIMATOR_NAMES)
ZO_MODES: tuple[str, ...] = ("latent_lr", "param_1pt", "param_2pt")
PRECISION_NAMES: tuple[str, ...] = ("fp32", "bf16", "fp16")
#: storage of the denoiser's frozen Linear weights (train.quantize): auto = as ``precision``; int8 / nf4 quantized
BASE_PRECISION_NAMES: tuple[str, ...] = ("auto", "int8", "nf4")
#: the (optional) package each quantized base precision needs: the 'quant' extra
BASE_PRECISION_PACKAGES: dict[str, str] = {"int8": "torchao", "nf4": "bitsandbytes"}
OPTIMIZERS: tuple[str, ...] = ("adam", "adam8bit")
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction")
#: stochastic steps of a flow-matching chain a user may train with (sampling.flow.FLOW_STEP_KINDS less "ode")
FLOW_STEP_CHOICES: tuple[str, ...] = ("flow_sde", "dance_sde", "cps")

REWARD_HELP: dict[str, str] = {
    "prompt_alignment": "probability that the image shows its caption's shape and colours (default model; differentiable)",
    "brightness": "mean pixel value", "darkness": "1 - mean pixel value",
    "saturation": "mean colour saturation", "contrast": "standard deviation of the luma",
    "red": "closeness of the pixels to pure red", "blue": "closeness of the pixels to pure blue",
    "jpeg_compressibility": "minus the JPEG size in kB (DDPO; not differentiable)",
    "jpeg_incompressibility": "the JPEG size in kB (DDPO; not differentiable)",
    "aesthetic": "LAION aesthetic score, about 1-10: MLP on CLIP ViT-L/14 image features (DDPO, AlignProp; "
                 "prompt ignored; differentiable; local weights, docs/rewards.md)",
    "clip_score": "2.5 x cosine similarity of CLIP image and prompt embeddings (any local CLIP; differentiable)",
    "pickscore": "PickScore, about 18-23: human preference, CLIP-H fine-tuned on Pick-a-Pic (local weights; "
                 "differentiable)",
    "hpsv2": "HPSv2 / v2.1 human preference score, about 0.2-0.3 (open_clip ViT-H/14; local weights; differentiable)",
    "image_reward": "ImageReward human preference, about -2 to 2 (BLIP; local weights; differentiable)",
    "position": "minus the distance from the shape's centre to a target (position:left, :right, :top, :bottom, "
                ":center or :X:Y in 0-1, 0:0 = top left; default left), in image widths; 0 is the optimum (embedded "
                "model's captions; differentiable)",
    "size": "minus |fraction of the image the shape covers - target| (size:0.4; default 0.4); 0 is the optimum "
            "(embedded model's captions; differentiable)",
}
REWARD_NAMES: tuple[str, ...] = tuple(sorted(REWARD_HELP))

#: rewards that take an argument (``name:arg``) -> its default
REWARD_ARGS: dict[str, str] = {"position": "left", "size": "0.4"}
#: named targets of the position reward: (x, y) in [0, 1] image coordinates (0, 0 = top left); None: not constrained
POSITION_TARGETS: dict[str, tuple[float | None, float | None]] = {
    "left": (0.25, None), "right": (0.75, None), "top": (None, 0.25), "bottom": (None, 0.75), "center": (0.5, 0.5)}

_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class ConfigError(ValueError):
    """A value a user gave that cannot be used; ``field`` names the option it belongs to."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class RewardTerm(NamedTuple):
    name: str
    weight: float
    arg: str | None = None  # the reward's argument (``position:left`` -> "left"), checked


def position_target(arg: str) -> tuple[float | None, float | None]:
    """``left``/``right``/``top``/``bottom``/``center`` or ``X:Y`` with X, Y in [0, 1] -> (x, y), None = free."""
    if arg in POSITION_TARGETS:
        return POSITION_TARGETS[arg]
    try:
        x, y = (float(v) for v in arg.split(":"))
    except ValueError:
        x = y = float("nan")
    if not (0 <= x <= 1 and 0 <= y <= 1):
        raise ConfigError("reward", f"unknown position target {arg!r}; choose one of {list(POSITION_TARGETS)} or a "
                                    "point X:Y with X and Y in 0-1 (0:0 = top left)")
    return x, y


def size_target(arg: str) -> float:
    """A fraction of the image in (0, 1)."""
    try:
        value = float(arg)
    except ValueError:
        value = float("nan")
    if not 0 < value < 1:
        raise ConfigError("reward", f"size target must be a fraction of the image between 0 and 1 (exclusive), "
                                    f"got {arg!r}")
    return value


_ARG_CHECKS = {"position": position_target, "size": size_target}


def reward_term(name: str, weight: float = 1.0, arg: str | None = None) -> RewardTerm:
    """One checked term of a reward sum: a known name, a finite weight, the argument of a reward that takes
    one (its default when left out) and none for the others."""
    name, arg = (name or "").strip(), (arg or "").strip()
    if name not in REWARD_HELP:
        raise ConfigError("reward", f"unknown reward {name!r}; choose one of {list(REWARD_NAMES)}")
    if name in REWARD_ARGS:
        arg = arg or REWARD_ARGS[name]
        _ARG_CHECKS[name](arg)
    elif arg:
        raise ConfigError("reward", f"reward {name!r} takes no argument, got {name}:{arg}; rewards with one: "
                                    f"{list(REWARD_ARGS)}")
    if not (isinstance(weight, (int, float)) and not isinstance(weight, bool) and math.isfinite(weight)):
        raise ConfigError("reward", f"reward weight for {name!r} must be finite, got {weight!r}")
    return RewardTerm(name, float(weight), arg or None)


def parse_reward_spec(spec: str) -> tuple[RewardTerm, ...]:
    """``"name"``, ``"name:arg"`` or ``"name[:arg]=weight,..."`` -> RewardTerms; unknown names list the choices.

    Rewards with an argument (``position:left``, ``size:0.3``) get their default when it is left out."""
    spec = (spec or "").strip()
    if not spec:
        raise ConfigError("reward", f"no reward given; choose one of {list(REWARD_NAMES)}")
    parts = []
    for item in spec.split(","):
        head, _, weight = item.strip().partition("=")
        name, _, arg = head.strip().partition(":")
        term = reward_term(name, 1.0, arg)  # the name and argument are said first
        try:
            w = float(weight) if weight.strip() else 1.0
        except ValueError:
            raise ConfigError("reward", f"reward weight for {term.name!r} must be a number, got {weight!r}") from None
        parts.append(reward_term(term.name, w, term.arg))
    return tuple(parts)


def format_reward_spec(terms: Sequence[RewardTerm]) -> str:
    """The spec ``parse_reward_spec`` reads back as ``terms`` (weights written exactly, 1.0 as ``1``)."""
    if not terms:
        raise ConfigError("reward", f"no reward given; choose one of {list(REWARD_NAMES)}")

    def number(w: float) -> str:
        short = f"{w:g}"
        return short if float(short) == w else repr(w)

    return ",".join(f"{t.name}{':' + t.arg if t.arg else ''}={number(t.weight)}" for t in terms)


def check_device(name: str) -> str:
    """auto, cpu, mps, cuda or cuda:N (whether it exists is checked when the model is placed)."""
    if not _DEVICE.match(name or ""):
        raise ConfigError("device", f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return name


def check_base_precision_available(name: str) -> None:
    """``ConfigError`` when the base precision ``name`` needs a package that is not installed (found without
    importing it: torchao and bitsandbytes take seconds to import)."""
    import importlib.util

    package = BASE_PRECISION_PACKAGES.get(name)
    if package is not None and importlib.util.find_spec(package) is None:
        raise ConfigError("base_precision", f"--base-precision {name} needs {package}, which is not installed: pip "
                                            f"install {package} (or the 'quant' extra), or use --base-precision auto")


def check_choice(field: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(field, f"unknown {field} {value!r}; choose one of {list(choices)}")
    return value
