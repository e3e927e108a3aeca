"""Command-line entry points: ``rlr-train`` and ``rlr-sample``.

Errors a user can fix (bad options, missing files, unknown names) print one line and exit with
code 2, before any existing run folder is touched. ``python -m rlr_backend.cli ARGS`` is ``rlr-train
ARGS``, the form ``accelerate launch -m rlr_backend.cli`` and ``torchrun -m rlr_backend.cli`` use for
data-parallel training (docs/training.md).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
from dataclasses import fields
from fractions import Fraction
from pathlib import Path

from .choices import (BASE_PRECISION_NAMES, ESTIMATOR_CHOICES, FLOW_STEP_CHOICES, OPTIMIZERS, PRECISION_NAMES,
                      PREDICTION_TYPES, REWARD_HELP, ZO_MODES)
from .model_paths import check_flow_files, check_model_path
from .models.flow_detect import is_flow_model
from .models.kind_defaults import training_defaults
from .safe_io import one_line
from .train.config import DEFAULT_PROMPTS, TrainConfig, format_fractions

# ValueError covers ConfigError and InvalidModelFile; OSError: files a user can fix (missing, unreadable, a full
# disk or a read-only folder: safe_io.StorageError)
USER_ERRORS = (ValueError, OSError)

_FIELDS = {f.name: f for f in fields(TrainConfig)}


def _show(value) -> str:
    """A default as a user would type it."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple) and value and all(isinstance(v, float) for v in value):
        return format_fractions(value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _help(name: str) -> str:
    """The help of a TrainConfig field with its default, said once (a help text may say it itself)."""
    f = _FIELDS[name]
    text = f.metadata["help"]
    if "default" in text or f.default is None:
        return text
    return f"{text} (default: {_show(f.default)})"


def _pair(text: str) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'a,b' with two integers, got {text!r}") from None
    return a, b


def _fractions(text: str) -> tuple[float, float, float]:
    """'1/3,1/3,1/3' or '0.2,0.3,0.5'."""
    try:
        a, b, c = (float(Fraction(v.strip())) for v in text.split(","))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected 'a,b,c' with three numbers or fractions, got {text!r}") from None
    return a, b, c


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the full usage is 20 lines; --help has it)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _epilog() -> str:
    width = 100
    rewards = "\n".join(textwrap.fill(f"{k}: {v}", width, initial_indent="  ", subsequent_indent="      ")
                        for k, v in REWARD_HELP.items())
    prompts = "\n".join(f"  {p}" for p in DEFAULT_PROMPTS)
    return (f"default prompts (the embedded model's captions):\n{prompts}\n\nrewards (--reward NAME or "
            f"NAME=WEIGHT,NAME=WEIGHT):\n{rewards}\n\n"
            + textwrap.fill("Prompt files: one prompt per line, or 'coarse | mid | fine' for the per-step prompt "
                            "schedule. Outputs in OUTPUT_DIR/RUN_NAME: lora.safetensors, before_after.png, "
                            "reward_curve.png, grids/, metrics.jsonl, config.json, ckpt/.", width))


def train_parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="rlr-train", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_epilog(),
        description="Fine-tune a diffusion model's LoRA so its samples score higher on a reward. With no "
                    "arguments: the embedded\ndefault model, reward prompt_alignment + brightness, RLR, a few "
                    "minutes on CPU.",
    )
    a = ap.add_argument

    def option(name: str, **kw) -> None:
        """An option of TrainConfig: its help and default come from the config (one source of defaults)."""
        a("--" + name.replace("_", "-"), default=argparse.SUPPRESS, help=_help(name), **kw)

    option("model")
    a("--text-encoder", action="append", dest="text_encoders", metavar="FILE", default=argparse.SUPPRESS,
      help=_help("text_encoders") + " (repeat the option per file)")
    option("vae")
    option("tokenizer")
    option("image_size", type=int)
    option("prediction_type", choices=PREDICTION_TYPES)
    a("--prompt", action="append", dest="prompt_list", metavar="TEXT",
      help="a training prompt (repeatable); 'coarse | mid | fine' gives per-step versions (default: the four "
           "prompts listed below)")
    a("--prompt-file", type=Path, help="UTF-8 file with one prompt per line")
    option("reward")
    option("estimator", choices=ESTIMATOR_CHOICES)
    option("h", type=int)
    option("fo_steps", type=int)
    option("zo_mode", choices=ZO_MODES)
    option("nu", type=float)
    option("step_baseline", action=argparse.BooleanOptionalAction)
    option("prompt_split", type=_fractions, metavar="A,B,C")
    option("ho_range", type=_pair, metavar="A,B")
    option("truncation", type=int)
    option("chain_len", type=int)
    option("flow_step", choices=FLOW_STEP_CHOICES)
    option("flow_eta", type=float)
    option("sde_window", type=_pair, metavar="START,SIZE")
    option("skip_deterministic", action=argparse.BooleanOptionalAction)
    for name, typ in [("steps", int), ("batch_size", int), ("images_per_prompt", int), ("num_inference_steps", int),
                      ("eta", float), ("guidance_scale", float), ("lr", float), ("grad_clip", float),
                      ("grad_accum", int), ("lora_rank", int), ("lora_alpha", float), ("seed", int),
                      ("eval_every", int), ("eval_seeds", int), ("ckpt_every", int), ("kl_weight", float),
                      ("kl_steps", int), ("early_stop_drop", float), ("best_recheck_seeds", int),
                      ("max_nonfinite_batches", int)]:
        option(name, type=typ)
    option("device")
    option("precision", choices=PRECISION_NAMES)
    option("base_precision", choices=BASE_PRECISION_NAMES)
    option("gradient_checkpointing", action=argparse.BooleanOptionalAction)
    option("offload_text_encoders", action=argparse.BooleanOptionalAction)
    option("optimizer", choices=OPTIMIZERS)
    option("output_dir", type=Path)
    option("run_name")
    a("--resume", action="store_true", help="continue the run in OUTPUT_DIR/RUN_NAME from its last checkpoint")
    a("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    a("--quiet", action="store_true", help="no progress bar")
    return ap


def build_config(args: argparse.Namespace) -> TrainConfig:
    """The run's config from the arguments (plain Python: no torch yet); raises on bad values."""
    from .train.prompts import parse_prompt, read_prompt_file

    prompts = []
    if args.prompt_file is not None:
        prompts += read_prompt_file(args.prompt_file)
    prompts += [parse_prompt(text, "--prompt") for text in args.prompt_list or []]
    kw = {k: v for k, v in vars(args).items() if k in {f.name for f in fields(TrainConfig)}}
    kw.pop("prompts", None)
    if prompts:
        kw["prompts"] = tuple(prompts)
    if "text_encoders" in kw:
        kw["text_encoders"] = tuple(kw["text_encoders"])
    flow = is_flow_model(kw.get("model"))
    for name, value in training_defaults(kw.get("model")).items():  # the model kind's defaults, where not given
        kw.setdefault(name, value)
    config = TrainConfig(**kw)
    check_model_path(config.model)
    check_flow_files(config.model, config.text_encoders, config.vae, config.tokenizer)
    config.check_model_options(flow)
    return config


def quiet_libraries() -> None:
    """Offline mode, and no loading bars or torchvision notices from diffusers/transformers in our output."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for noisy in ("httpx", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)  # "requires torchvision"
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def train_main(argv: list[str] | None = None) -> int:
    args = train_parser().parse_args(argv)
    try:
        config = build_config(args)  # every option checked before torch and diffusers are imported
    except USER_ERRORS as e:
        print(f"rlr-train: error: {one_line(e)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    quiet_libraries()
    try:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        from .train import Trainer

        result = Trainer(config, progress=not args.quiet).run(resume=args.resume)
    except USER_ERRORS as e:
        print(f"rlr-train: error: {one_line(e)}", file=sys.stderr)
        return 2
    from .train.distributed import is_main_process

    if not is_main_process():  # data-parallel: the main process reports
        return 0
    first, last = result.eval_rewards.get(0), result.eval_rewards.get(result.steps_done)
    print(f"LoRA: {result.lora_path}")
    print(f"grid before/after: {result.run_dir / 'before_after.png'}; curve: {result.run_dir / 'reward_curve.png'}")
    if first is not None and last is not None:
        print(f"eval reward: {first:.4f} -> {last:.4f} after {result.steps_done} updates "
              f"(mean over {result.eval_images} fixed-seed images)")
    if result.best_step is not None and result.best_step != result.steps_done:
        print(f"best evaluation: update {result.best_step} ({result.best_reward:.4f}), kept in "
              f"{result.run_dir / 'lora_best.safetensors'}")
    return 0


def sample_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="rlr-sample", description="Generate images with a model and an optional LoRA.")
    a = ap.add_argument
    a("prompt", nargs="+", help="prompt(s); 'coarse | mid | fine' uses the three versions on the parts of the chain "
                                "(the LoRA's trained split, else thirds)")
    a("--model", help="diffusers folder (SD1.x/SD2.x/SDXL; SD3/SD3.5, FLUX.1, Z-Image), default-flow, a single-file "
                          ".safetensors checkpoint, or a flow transformer file with --text-encoder/--vae (default: the "
                          "embedded model)")
    a("--image-size", type=int, help="single-file checkpoints and flow-matching folders: image size in pixels (default: the architecture's "
                                     "native size, SD1.x 512, SD2.x-v 768, SDXL 1024)")
    a("--prediction-type", choices=PREDICTION_TYPES,
      help="single-file checkpoints: override the detected prediction type (SD2-base 512: epsilon)")
    a("--text-encoder", action="append", metavar="FILE",
      help="with a flow transformer file as --model: a text encoder file (repeat per file; SD3/SD3.5: clip_l + clip_g "
           "[+ t5xxl]; FLUX.1: clip_l + t5xxl; Z-Image: qwen_3_4b)")
    a("--vae", help="with a flow transformer file: the VAE file (e.g. ae.safetensors)")
    a("--tokenizer", help="with a flow transformer file: the T5 / Qwen3 tokenizer folder (e.g. "
                          "ComfyUI/comfy/text_encoders/t5_tokenizer)")
    a("--precision", choices=PRECISION_NAMES, default="fp32",
      help="weights of the UNet and the VAE, read straight into it: fp32, bf16 or fp16 (half the memory; the text "
           "encoders stay fp32; default: fp32)")
    a("--lora", type=Path, help="LoRA .safetensors (kohya format, e.g. from rlr-train)")
    a("--lora-scale", type=float, default=1.0, help="LoRA strength (default: 1)")
    a("--num", type=_positive_int, default=4, help="images per prompt (default: 4)")
    a("--steps", type=_positive_int, default=20, help="DDIM steps (default: 20)")
    a("--eta", type=float, default=1.0, help="DDIM eta; for a flow-matching model the flow_sde noise level (default: 1)")
    a("--guidance-scale", type=float, default=4.0, help="classifier-free guidance (default: 4)")
    a("--seed", type=int, default=0, help="seed of the sampling noise (default: 0)")
    a("--no-prompt-schedule", dest="prompt_schedule", action="store_false",
      help="one prompt for every step: ignore the coarse / mid versions of prompts the LoRA was trained with "
           "(by default a prompt equal to a trained 'coarse | mid | fine' prompt's fine version uses them, as "
           "training did) and of 'coarse | mid | fine' prompts given here")
    a("--out", type=Path, default=Path("samples.png"), help="output PNG grid (default: samples.png)")
    a("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's choice; 1 is often "
                                                         "faster on a busy machine)")
    return ap


def check_sample_args(args: argparse.Namespace) -> None:
    """What can be checked before torch is imported; raises ValueError / FileNotFoundError."""
    import math

    from .train.prompts import parse_prompt

    for p in args.prompt:
        parse_prompt(p)  # 'coarse | mid | fine' with three non-empty parts
    check_model_path(args.model)
    check_flow_files(args.model, args.text_encoder or (), args.vae, args.tokenizer)
    if args.lora is not None and not args.lora.is_file():
        raise FileNotFoundError(f"--lora {args.lora}: no such file")
    for name in ("lora_scale", "eta", "guidance_scale"):
        value = getattr(args, name)
        if not math.isfinite(value) or (name != "lora_scale" and value < 0):
            raise ValueError(f"--{name.replace('_', '-')} must be a {'finite number' if name == 'lora_scale' else 'number >= 0'}, "
                             f"got {value}")
    if args.image_size is not None and (args.image_size < 8 or args.image_size % 8):
        raise ValueError(f"--image-size must be a multiple of 8 (pixels), got {args.image_size}")


def sample_main(argv: list[str] | None = None) -> int:
    args = sample_parser().parse_args(argv)
    try:
        check_sample_args(args)
    except USER_ERRORS as e:
        print(f"rlr-sample: error: {one_line(e)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    quiet_libraries()
    try:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        from .models.loader import load_pipeline
        from .train.prompts import DEFAULT_PROMPT_SPLIT, parse_prompt, resolve_prompt
        from .train.report import save_grid
        from .train.sample import add_lora_file, lora_prompts, sample_images, set_lora_strength

        trained, split = lora_prompts(args.lora) if args.lora is not None else ((), DEFAULT_PROMPT_SPLIT)
        prompts = [resolve_prompt(parse_prompt(p), trained, args.prompt_schedule) for p in args.prompt]
        for given, used in zip(args.prompt, prompts):
            if used.scheduled and given.strip() == used.fine:
                print(f"{used.fine!r}: the LoRA's trained prompt schedule, {used.coarse!r} | {used.mid!r} | fine on "
                      f"{format_fractions(split)} of the steps (--no-prompt-schedule: the fine prompt on every step)")
        single = {k: v for k, v in (("image_size", args.image_size), ("prediction_type", args.prediction_type),
                                    ("text_encoders", tuple(args.text_encoder or ())), ("vae", args.vae),
                                    ("tokenizer", args.tokenizer)) if v}
        from .train.memory import load_dtypes

        pipe = load_pipeline(args.model, **load_dtypes(args.precision, offload_text_encoders=True), **single)
        if args.lora is not None:
            add_lora_file(pipe, args.lora)
            set_lora_strength(pipe, args.lora_scale)
        images = sample_images(pipe, prompts, num_per_prompt=args.num, steps=args.steps, eta=args.eta,
                               guidance_scale=args.guidance_scale, seed=args.seed, prompt_split=split)
        save_grid(images, args.out, nrow=args.num, scale=4)
    except USER_ERRORS as e:
        print(f"rlr-sample: error: {one_line(e)}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


def advise_main(argv: list[str] | None = None) -> int:
    """``rlr-advise``: the training options of rlr-train (model, reward, prompts, T, batch, ...) plus --batches."""
    ap = train_parser()
    ap.prog = "rlr-advise"
    ap.description = ("Measure which gradient estimator suits your model, reward and prompts: truncation bias, noise "
                      "x cost and peak memory of each, on a few batches (about 2 minutes on the embedded model on a "
                      "CPU). Takes rlr-train's options; writes nothing.")
    ap.add_argument("--batches", type=_positive_int, default=4, help="batches measured per estimator (default: 4; "
                                                                    "at least 2)")
    args = ap.parse_args(argv)
    try:
        config = build_config(args)
        if args.batches < 2:
            raise ValueError(f"--batches must be >= 2 (a variance needs two), got {args.batches}")
    except USER_ERRORS as e:
        print(f"rlr-advise: error: {one_line(e)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    quiet_libraries()
    try:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        from tqdm.auto import tqdm

        from .advise import advise, format_advice

        bar = None if args.quiet else tqdm(desc="rlr-advise", unit="call")

        def progress(done: int, total: int, what: str) -> None:
            if bar is not None:
                bar.total = total
                bar.set_postfix_str(what)
                bar.update(done - bar.n)

        result = advise(config, batches=args.batches, progress=progress)
        if bar is not None:
            bar.close()
    except USER_ERRORS as e:
        print(f"rlr-advise: error: {one_line(e)}", file=sys.stderr)
        return 2
    print(format_advice(result))
    return 0


def _entry(fn):
    def run() -> None:
        sys.exit(fn())
    return run


train = _entry(train_main)
sample = _entry(sample_main)
advise = _entry(advise_main)


if __name__ == "__main__":  # python -m rlr_backend.cli, e.g. under accelerate launch or torchrun
    train()
