"""Typed, validated training configuration. One source for the CLI options and their help.

Plain Python (no torch): the command line validates a config before anything heavy is imported.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields, replace
from fractions import Fraction
from pathlib import Path

from ..choices import (BASE_PRECISION_NAMES, ESTIMATOR_CHOICES, FLOW_STEP_CHOICES, OPTIMIZERS, PRECISION_NAMES,
                       PREDICTION_TYPES, ZO_MODES, ConfigError, check_base_precision_available, check_choice, check_device,
                       parse_reward_spec)
from .prompts import DEFAULT_PROMPT_SPLIT, PromptSpec, prompts_from_json, prompts_to_json

DEFAULT_PROMPTS: tuple[str, ...] = (
    "a red circle on a blue background",
    "a green square on a white background",
    "a yellow triangle on a black background",
    "a blue circle on a yellow background",
)


#: options that mean something only for DDIM-chain (SD1.x/SD2.x/SDXL) or only for flow-matching models
DDIM_ONLY_OPTIONS: tuple[str, ...] = ("eta", "prediction_type")
FLOW_ONLY_OPTIONS: tuple[str, ...] = ("flow_step", "flow_eta", "sde_window")


def format_fractions(values) -> str:
    """(1/3, 1/3, 1/3) -> '1/3,1/3,1/3' (exact fractions where a small denominator gives the value)."""
    out = []
    for v in values:
        frac = Fraction(v).limit_denominator(100)
        out.append(str(frac) if abs(float(frac) - v) < 1e-9 else f"{v:g}")
    return ",".join(out)


RUN_NAME = re.compile(r"[^/\\\x00-\x1f\x7f]{1,128}")


def check_run_name(name: str) -> None:
    """A plain folder name: 1-128 characters, no separators or control characters, not hidden."""
    if not isinstance(name, str) or not RUN_NAME.fullmatch(name) or name in (".", "..") or name.startswith(".") \
            or name != name.strip():
        text = str(name)
        shown = text if len(text) <= 40 else f"{text[:40]}... ({len(text)} characters)"
        raise ConfigError("run_name", "run_name must be a plain folder name inside output_dir (1-128 characters, no "
                                      f"'/', '\\', control characters, leading '.' or surrounding spaces), got {shown!r}")


#: Adam learning rates the sweeps chose (docs/estimators.md, "Defaults, and the measurements behind them"):
#: (estimator, step baseline on, reward differentiable) -> rate; None: either. ``TrainConfig.resolve`` applies them.
MEASURED_LR: dict[tuple[str, bool | None, bool | None], float] = {
    # differentiable rewards: position:left over 300 updates, default-flow position and size, the default run (3e-3
    # collapsed there), size:0.4 at T=50 (3e-3 collapsed); only brightness (a late-step reward) chose 3e-3.
    # JPEG compressibility (not differentiable) chose 3e-3, still rising at 40
    ("rlr", True, True): 1e-3,
    ("rlr", True, False): 3e-3,
    ("rlr", False, None): 3e-3,  # position:left over 300 updates, default-flow position (1e-3 on default-flow size)
    ("zo", True, None): 3e-3,  # JPEG compressibility
    ("zo", False, None): 1e-3,  # prompt alignment, JPEG compressibility
    ("ddpo", None, None): 1e-3,  # prompt alignment, JPEG, default-flow size (3e-3 on default-flow position)
    ("truncated_bp", None, None): 3e-3,  # position:left T=20, default-flow position (1e-3: default-flow size; 3e-4: T=50)
    ("full_bp", None, None): 3e-3,  # position:left, size:0.4 and brightness at T=20 (1e-3: position:left at T=50)
}
#: estimators never swept (code_compat): the rate every estimator had before the sweeps
DEFAULT_LR = 3e-3


def measured_lr(estimator: str, step_baseline: bool, reward_differentiable: bool) -> float:
    """The default learning rate of a (resolved) estimator: the rate its sweeps chose (:data:`MEASURED_LR`;
    the step baseline counts for rlr and zo only), :data:`DEFAULT_LR` for an estimator never swept."""
    sb = step_baseline if estimator in ("rlr", "zo") else None
    for key in ((estimator, sb, reward_differentiable), (estimator, sb, None)):
        if key in MEASURED_LR:
            return MEASURED_LR[key]
    return DEFAULT_LR


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs. Validated at construction; saved as config.json in the run folder."""

    model: str | None = _f(None, "local model: a diffusers folder (SD1.x, SD2.x, SDXL; flow-matching SD3/SD3.5, "
                                 "FLUX.1, Z-Image), a single-file .safetensors checkpoint, a flow transformer file "
                                 "(ComfyUI models/diffusion_models, with text_encoders and vae), or default-flow (the "
                                 "small flow-matching default); default: the embedded model")
    image_size: int | None = _f(None, "single-file checkpoints and flow-matching folders: training resolution in "
                                      "pixels (default: the architecture's native size)")
    prediction_type: str | None = _f(None, "single-file checkpoints: epsilon or v_prediction (default: detected; "
                                           "SD2-base 512 files need epsilon)", choices=PREDICTION_TYPES)
    text_encoders: tuple[str, ...] = _f((), "flow transformer files (ComfyUI models/diffusion_models): their text "
                                            "encoder files, any order (SD3/SD3.5: clip_l + clip_g [+ t5xxl]; FLUX.1: "
                                            "clip_l + t5xxl; Z-Image: qwen_3_4b)")
    vae: str | None = _f(None, "flow transformer files: the VAE file (e.g. ae.safetensors)")
    tokenizer: str | None = _f(None, "flow transformer files: the T5 / Qwen3 tokenizer folder (e.g. "
                                     "ComfyUI/comfy/text_encoders/t5_tokenizer)")
    prompts: tuple[PromptSpec, ...] = _f(tuple(PromptSpec(p) for p in DEFAULT_PROMPTS), "training prompts")
    reward: str = _f("prompt_alignment=1,brightness=1", "reward name, or weighted sum 'name=w,name=w'")
    estimator: str = _f("auto", "gradient estimator; auto: the measured choice for the reward (truncated backprop "
                               "when the reward is differentiable, else rlr)", choices=ESTIMATOR_CHOICES)
    h: int = _f(2, "rlr: half-order sub-chain length", min=1)
    fo_steps: int = _f(4, "rlr: backprop (first-order) through the last K steps (the paper uses 1; 4 learns faster, still unbiased)",
                       min=1)
    zo_mode: str = _f("latent_lr", "rlr: zeroth-order mode", choices=ZO_MODES)
    nu: float = _f(1e-3, "rlr param_1pt/param_2pt: perturbation scale")
    step_baseline: bool = _f(True, "rlr and zo: at each likelihood-ratio step subtract the reward of the model's x0 "
                                    "estimate there (unbiased, less noise; one decode + reward per step)")
    prompt_split: tuple[float, float, float] = _f(DEFAULT_PROMPT_SPLIT, "fractions of the sampling steps for the "
                                                 "coarse / mid / fine versions of a prompt")
    ho_range: tuple[int, int] | None = _f(None, "rlr: draw the sub-chain start j in a..b (paper order, 1 = last step; default: "
                                                   "uniformly over the steps before the first-order ones)")
    truncation: int = _f(2, "truncated_bp: number of last steps backpropagated", min=1)
    chain_len: int = _f(2, "code_compat: number of single-step PPO terms", min=1)
    steps: int = _f(60, "optimizer updates", min=1)
    batch_size: int = _f(8, "images sampled per update", min=2)
    images_per_prompt: int = _f(4, "images per prompt in a batch (the baseline compares images of one prompt)", min=1)
    num_inference_steps: int = _f(20, "DDIM sampling steps T", min=2)
    eta: float = _f(1.0, "DDIM stochasticity (>0 for likelihood-ratio terms)")
    flow_step: str = _f("flow_sde", "flow-matching models: the stochastic step of the chain (flow_sde: Flow-GRPO's "
                                    "SDE; dance_sde: DanceGRPO's constant noise; cps: coefficients-preserving)",
                        choices=FLOW_STEP_CHOICES)
    flow_eta: float = _f(0.7, "flow-matching models: noise level of the stochastic steps (> 0; Flow-GRPO 0.7, "
                              "CPS 0.8, DanceGRPO 0.3)")
    sde_window: tuple[int, int] | None = _f(None, "flow-matching models: stochastic steps only from sampler step "
                                                  "START for SIZE steps (0 = the first), deterministic (ODE) steps "
                                                  "elsewhere (Flow-GRPO-Fast, MixGRPO); default: every step")
    skip_deterministic: bool = _f(False, "ddpo: train only the stochastic steps (a flow chain's SDE window, cps's "
                                         "last step to sigma 0); biased: the deterministic steps' shares are dropped")
    guidance_scale: float = _f(4.0, "classifier-free guidance scale")
    lr: float | None = _f(None, "Adam learning rate (default: the rate the benchmark sweeps chose for the estimator: "
                                "1e-3 for rlr with the step baseline on a differentiable reward, ddpo, and zo without "
                                "the step baseline; 3e-3 for the others)")
    grad_clip: float = _f(1.0, "clip the gradient norm to this (0: off)")
    grad_accum: int = _f(1, "updates accumulated per optimizer step", min=1)
    lora_rank: int = _f(4, "LoRA rank", min=1)
    lora_alpha: float | None = _f(None, "LoRA alpha (default: the rank)")
    seed: int = _f(0, "seed of the run (sampling noise, prompts, j)")
    eval_every: int = _f(10, "evaluate every N updates (0: only at start and end)", min=0)
    eval_seeds: int = _f(2, "evaluation images per evaluation prompt", min=1)
    ckpt_every: int = _f(10, "checkpoint every N updates", min=1)
    kl_weight: float = _f(0.0, "guard: weight of the KL divergence to the base model along the sampled chain "
                               "(per-step Gaussian KL of the LoRA's transition to the base model's, estimated on "
                               "kl_steps steps drawn by their share of it; 0: off). Keeps the model near the base, "
                               "against reward hacking and drift on long runs")
    kl_steps: int = _f(2, "guard: sampling steps per update the KL term is computed on (its estimate of the whole "
                          "chain's KL is unbiased for any number; more steps: less noise, more time)", min=1)
    early_stop_drop: float = _f(0.0, "guard: stop when the evaluation reward falls this far below its best (0: "
                                     "never); lora_best.safetensors always keeps the best evaluated LoRA")
    best_recheck_seeds: int = _f(8, "guard: when the best evaluation is not the last update's, score lora_best and "
                                    "the last LoRA once more at the end on this many fresh images per evaluation "
                                    "prompt and keep the better as lora_best (0: off)", min=0)
    max_nonfinite_batches: int = _f(3, "stop the run after N batches in a row whose rewards are all NaN/inf (such "
                                       "batches are skipped; 0: never stop)")
    device: str = _f("auto", "where to train: auto (a CUDA GPU if there is one, else the CPU), cpu, cuda, cuda:N, mps")
    precision: str = _f("fp32", "weights of the frozen model: fp32, bf16 or fp16 (LoRA and optimizer stay fp32; "
                                "bf16/fp16 halve the weights' memory on a GPU)", choices=PRECISION_NAMES)
    base_precision: str = _f("auto", "storage of the denoiser's frozen Linear weights: auto (as precision), int8 "
                                     "(torchao weight-only int8, 1 byte per weight) or nf4 (bitsandbytes 4-bit "
                                     "NormalFloat, 0.56 bytes); computed in precision, LoRA stays fp32; needs the "
                                     "'quant' extra (docs/memory.md: what fits 12-24 GB)", choices=BASE_PRECISION_NAMES)
    gradient_checkpointing: bool = _f(False, "recompute activations in backward: the UNet (its blocks and every "
                                             "backpropagated step) and the VAE decoder (one image at a time, its "
                                             "up-blocks), not reward models: less memory, ~1 more forward per step")
    offload_text_encoders: bool = _f(True, "keep the text encoders on the CPU in fp32 (prompts are encoded "
                                           "once and cached)")
    optimizer: str = _f("adam", "adam, or adam8bit (bitsandbytes, CUDA)", choices=OPTIMIZERS)
    output_dir: Path = _f(Path("runs"), "folder that holds run folders")
    run_name: str = _f("default", "name of this run's folder inside output_dir")

    def __post_init__(self) -> None:
        check_choice("estimator", self.estimator, ESTIMATOR_CHOICES)
        check_choice("zo_mode", self.zo_mode, ZO_MODES)
        check_choice("precision", self.precision, PRECISION_NAMES)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("base_precision", self.base_precision, BASE_PRECISION_NAMES)
        check_base_precision_available(self.base_precision)
        if self.prediction_type is not None:
            check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        check_device(self.device)
        parse_reward_spec(self.reward)
        if not self.prompts:
            raise ConfigError("prompts", "no prompts given")
        for spec in fields(self):
            lo = spec.metadata.get("min")
            if lo is not None and getattr(self, spec.name) < lo:
                raise ConfigError(spec.name, f"{spec.name} must be >= {lo}, got {getattr(self, spec.name)}")
        if self.batch_size % self.images_per_prompt:
            raise ConfigError("batch_size", f"batch_size ({self.batch_size}) must be a multiple of images_per_prompt "
                                            f"({self.images_per_prompt}): change either")
        if self.estimator in ("rlr", "auto") and self.h + self.fo_steps > self.num_inference_steps:
            raise ConfigError("h", f"rlr needs h + fo_steps <= num_inference_steps, got {self.h} + {self.fo_steps} > "
                                   f"{self.num_inference_steps}: lower h or fo_steps, or sample with more steps")
        split = tuple(self.prompt_split)
        if len(split) != 3 or any(not (f > 0) for f in split) or abs(sum(split) - 1) > 1e-6:
            raise ConfigError("prompt_split", "prompt_split must be three fractions > 0 that sum to 1, got "
                                              f"{format_fractions(split)}")
        if any(p.scheduled for p in self.prompts) and self.num_inference_steps < 3:
            raise ConfigError("num_inference_steps", "'coarse | mid | fine' prompts need num_inference_steps >= 3 "
                                                     f"(one step per version), got {self.num_inference_steps}")
        if self.lora_alpha is not None and not (self.lora_alpha > 0 and math.isfinite(self.lora_alpha)):
            raise ConfigError("lora_alpha", f"lora_alpha must be > 0, got {self.lora_alpha}")
        for name in ("lr", "nu"):
            value = getattr(self, name)
            if value is None and name == "lr":  # the estimator's measured rate (``resolve``)
                continue
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ConfigError(name, f"{name} must be a positive number, got {value}")
        if self.kl_weight > 0 and self.eta == 0:
            raise ConfigError("kl_weight", "kl_weight needs a stochastic sampler (the KL of two deterministic steps is "
                                           "not defined): set eta > 0 or kl_weight 0")
        for name in ("eta", "grad_clip", "guidance_scale", "kl_weight", "early_stop_drop"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigError(name, f"{name} must be a number >= 0, got {value}")
        if self.image_size is not None and (self.image_size < 8 or self.image_size % 8):
            raise ConfigError("image_size", f"image_size must be a multiple of 8 (pixels), got {self.image_size}")
        if self.estimator in ("rlr", "ddpo", "zo", "auto") and self.eta == 0:
            raise ConfigError("eta", f"{self.estimator} needs a stochastic sampler: set eta > 0 (e.g. 1.0)")
        if self.skip_deterministic and self.estimator != "ddpo":
            raise ConfigError("skip_deterministic", f"skip_deterministic applies to the ddpo estimator, not "
                                                    f"{self.estimator}")
        check_choice("flow_step", self.flow_step, FLOW_STEP_CHOICES)
        if not (self.flow_eta > 0 and math.isfinite(self.flow_eta)):
            raise ConfigError("flow_eta", f"flow_eta must be a number > 0, got {self.flow_eta}")
        if self.sde_window is not None:
            start, size = self.sde_window
            if not (start >= 0 and size >= 1 and start + size <= self.num_inference_steps):
                raise ConfigError("sde_window", f"sde_window {start},{size} (START,SIZE) must fit the "
                                                f"{self.num_inference_steps} sampling steps: START >= 0, SIZE >= 1, "
                                                "START + SIZE <= num_inference_steps")
        check_run_name(self.run_name)
        if not isinstance(self.max_nonfinite_batches, int) or self.max_nonfinite_batches < 0:
            raise ConfigError("max_nonfinite_batches", f"max_nonfinite_batches must be >= 0, got "
                                                       f"{self.max_nonfinite_batches}")

    def resolve(self, reward_differentiable: bool) -> "TrainConfig":
        """This config with its automatic choices made, as the trainer runs it (and saves it in config.json):

        * ``estimator="auto"``: the measured choice for the reward: truncated backprop (``truncation`` last
          steps) when the reward is differentiable, RLR when it is not (backprop cannot run; RLR's half-order
          and likelihood-ratio terms can). Truncated backprop is biased (it recovers 4-10% of the full gradient
          on the embedded model, cosine 0.34-0.57), yet it reached at least 90% of the best estimator's gain on
          every differentiable task measured with 3 seeds (short and long runs, T = 20 and 50; only just at
          T = 50: 90.0% of full backprop's gain on ``size:0.4``, 90.1% on ``position:left``), at 0.37x RLR's
          CPU time per update and a third or less of full backprop's per run. Full backprop with checkpointing
          is unbiased and ended highest wherever it ran (``position:left`` at T = 20, by less than the
          evaluations' noise, and at T = 50; ``size:0.4`` at T = 20 and 50; 3 seeds each; level at the
          brightness ceiling), and RLR with the step baseline beat truncated backprop on ``position:left`` at
          T = 50: so ``auto`` is the cheapest estimator within about 10% of the best (docs/estimators.md,
          "Which estimator for which reward").
        * ``lr=None``: the estimator's measured rate (:func:`measured_lr`).

        Deterministic, so a resumed run resolves the same."""
        estimator = self.estimator
        if estimator == "auto":
            estimator = "truncated_bp" if reward_differentiable else "rlr"
        lr = measured_lr(estimator, self.step_baseline, reward_differentiable) if self.lr is None else self.lr
        return replace(self, estimator=estimator, lr=lr)

    def schedule_options(self, flow: bool) -> dict:
        """The keyword options of the model's ``schedule(num_steps, ...)``: DDIM's ``eta``, or a flow model's
        noise level, step kind and SDE window (``models.flow_model.FlowModel.schedule``)."""
        if flow:
            return {"eta": self.flow_eta, "kind": self.flow_step, "sde_window": self.sde_window}
        return {"eta": self.eta}

    def check_model_options(self, flow: bool) -> None:
        """Refuse options of the other family of models, naming the option: DDIM's ``eta`` and
        ``prediction_type`` on a flow-matching model, the flow options on a DDIM one (set to a value other
        than their default)."""
        defaults = {f.name: f.default for f in fields(self)}
        if flow:
            for name in DDIM_ONLY_OPTIONS:
                if getattr(self, name) != defaults[name]:
                    raise ConfigError(name, f"{name} is a DDIM option of SD1.x/SD2.x/SDXL models; this is a "
                                            "flow-matching model: use flow_step, flow_eta and sde_window instead")
        else:
            for name in FLOW_ONLY_OPTIONS:
                if getattr(self, name) != defaults[name]:
                    raise ConfigError(name, f"{name} applies to flow-matching models (SD3/SD3.5, FLUX.1, Z-Image); "
                                            f"this model samples with DDIM: use eta instead")

    def single_file_options(self) -> dict:
        """The loader options that apply to single-file checkpoints (a diffusers folder refuses them)."""
        return {k: v for k, v in (("image_size", self.image_size), ("prediction_type", self.prediction_type),
                                  ("text_encoders", self.text_encoders), ("vae", self.vae), ("tokenizer", self.tokenizer))
                if v}

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name

    def estimator_config(self):
        """The typed config of the chosen estimator, built by its registry entry from these settings."""
        from ..estimators import get_estimator

        return get_estimator(self.estimator).config_cls.from_settings(self)

    def to_json(self) -> dict:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "prompts":
                v = prompts_to_json(v)
            elif isinstance(v, Path):
                v = str(v)
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    @classmethod
    def from_json(cls, data: dict) -> "TrainConfig":
        d = dict(data)
        if d.get("estimator") in ("rlr", "zo"):  # a run saved before the option existed trained without it
            d.setdefault("step_baseline", False)
        d["prompts"] = prompts_from_json(d["prompts"])
        d["output_dir"] = Path(d["output_dir"])
        for name in ("ho_range", "sde_window", "text_encoders"):
            if d.get(name) is not None:
                d[name] = tuple(d[name])
        if "prompt_split" in d:
            d["prompt_split"] = tuple(d["prompt_split"])
        return cls(**d)
