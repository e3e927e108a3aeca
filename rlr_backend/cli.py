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
from dataclasses import fields
from pathlib import Path

from .estimators import ESTIMATORS, ZO_MODES
from .rewards import REWARD_HELP
from .safe_io import InvalidModelFile, one_line
from .train.memory import OPTIMIZERS, PRECISIONS

# OSError: files a user can fix (missing, unreadable, a full disk or read-only folder: safe_io.StorageError)
USER_ERRORS = (ValueError, OSError, InvalidModelFile)


def _help(name: str) -> str:
    from .train.config import TrainConfig

    for f in fields(TrainConfig):
        if f.name == name:
            default = f.default
            return f"{f.metadata['help']} (default: {default})"
    raise KeyError(name)


def _pair(text: str) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'a,b' with two integers, got {text!r}") from None
    return a, b


def _fractions(text: str) -> tuple[float, float, float]:
    try:
        a, b, c = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'a,b,c' with three numbers, got {text!r}") from None
    return a, b, c


def train_parser() -> argparse.ArgumentParser:
    rewards = "; ".join(f"{k}: {v}" for k, v in REWARD_HELP.items())
    ap = argparse.ArgumentParser(
        prog="rlr-train",
        description="Fine-tune a diffusion model's LoRA so its samples score higher on a reward. With no "
                    "arguments: the embedded default model, reward prompt_alignment + brightness, RLR, a few minutes on CPU.",
        epilog=f"Rewards: {rewards}. Prompt files: one prompt per line, or 'coarse | mid | fine' for the "
               "per-step prompt schedule. Outputs in OUTPUT_DIR/RUN_NAME: lora.safetensors, before_after.png, "
               "reward_curve.png, grids/, metrics.jsonl, config.json, ckpt/.",
    )
    a = ap.add_argument

    def option(name: str, **kw) -> None:
        """An option of TrainConfig: its help and default come from the config (one source of defaults)."""
        a("--" + name.replace("_", "-"), default=argparse.SUPPRESS, help=_help(name), **kw)

    option("model")
    option("image_size", type=int)
    option("prediction_type", choices=("epsilon", "v_prediction"))
    a("--prompt", action="append", dest="prompt_list", metavar="TEXT",
      help="a training prompt (repeatable); 'coarse | mid | fine' gives per-step versions")
    a("--prompt-file", type=Path, help="UTF-8 file with one prompt per line")
    option("reward")
    option("estimator", choices=sorted(ESTIMATORS))
    option("h", type=int)
    option("fo_steps", type=int)
    option("zo_mode", choices=ZO_MODES)
    option("nu", type=float)
    option("prompt_split", type=_fractions, metavar="A,B,C")
    option("ho_range", type=_pair, metavar="A,B")
    option("truncation", type=int)
    option("chain_len", type=int)
    for name, typ in [("steps", int), ("batch_size", int), ("images_per_prompt", int), ("num_inference_steps", int),
                      ("eta", float), ("guidance_scale", float), ("lr", float), ("grad_clip", float),
                      ("grad_accum", int), ("lora_rank", int), ("lora_alpha", float), ("seed", int),
                      ("eval_every", int), ("eval_seeds", int), ("ckpt_every", int)]:
        option(name, type=typ)
    option("device")
    option("precision", choices=PRECISIONS)
    option("gradient_checkpointing", action=argparse.BooleanOptionalAction)
    option("offload_text_encoders", action=argparse.BooleanOptionalAction)
    option("optimizer", choices=OPTIMIZERS)
    option("output_dir", type=Path)
    option("run_name")
    a("--resume", action="store_true", help="continue the run in OUTPUT_DIR/RUN_NAME from its last checkpoint")
    a("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    a("--quiet", action="store_true", help="no progress bar")
    return ap


def build_config(args: argparse.Namespace):
    from .train import TrainConfig, parse_prompt, read_prompt_file

    prompts = []
    if args.prompt_file is not None:
        prompts += read_prompt_file(args.prompt_file)
    for text in args.prompt_list or []:
        if not text.strip():
            raise ValueError("--prompt is empty; give the text of a prompt")
        prompts.append(parse_prompt(text))
    kw = {k: v for k, v in vars(args).items() if k in {f.name for f in fields(TrainConfig)}}
    kw.pop("prompts", None)
    if prompts:
        kw["prompts"] = tuple(prompts)
    return TrainConfig(**kw)


def _quiet_libraries() -> None:
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
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    _quiet_libraries()
    try:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        from .train import Trainer

        config = build_config(args)
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
        print(f"eval reward: {first:.4f} -> {last:.4f} after {result.steps_done} updates")
    return 0


def sample_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rlr-sample", description="Generate images with a model and an optional LoRA.")
    ap.add_argument("prompt", nargs="+", help="prompt(s)")
    ap.add_argument("--model", help="diffusers folder (SD1.x/SD2.x/SDXL) or single-file .safetensors (default: the embedded model)")
    ap.add_argument("--image-size", type=int, help="single-file checkpoints: image size in pixels (default: the "
                    "architecture's native size, SD1.x 512, SD2.x-v 768, SDXL 1024)")
    ap.add_argument("--prediction-type", choices=("epsilon", "v_prediction"),
                    help="single-file checkpoints: override the detected prediction type (SD2-base 512: epsilon)")
    ap.add_argument("--lora", type=Path, help="LoRA .safetensors (kohya format, e.g. from rlr-train)")
    ap.add_argument("--lora-scale", type=float, default=1.0, help="LoRA strength (default 1.0)")
    ap.add_argument("--num", type=int, default=4, help="images per prompt (default 4)")
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20)")
    ap.add_argument("--eta", type=float, default=1.0, help="DDIM eta (default 1.0)")
    ap.add_argument("--guidance-scale", type=float, default=4.0, help="classifier-free guidance (default 4.0)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("samples.png"), help="output PNG grid (default samples.png)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    _quiet_libraries()
    try:
        from .train.pipeline import load_pipeline
        from .train.report import save_grid
        from .train.sample import add_lora_file, sample_images, set_lora_strength

        if any(not p.strip() for p in args.prompt):
            raise ValueError("empty prompt")
        single = {k: v for k, v in (("image_size", args.image_size), ("prediction_type", args.prediction_type))
                  if v is not None}
        pipe = load_pipeline(args.model, **single)
        if args.lora is not None:
            add_lora_file(pipe, args.lora)
            set_lora_strength(pipe, args.lora_scale)
        images = sample_images(pipe, args.prompt, num_per_prompt=args.num, steps=args.steps, eta=args.eta,
                               guidance_scale=args.guidance_scale, seed=args.seed)
        save_grid(images, args.out, nrow=args.num, scale=4)
    except USER_ERRORS as e:
        print(f"rlr-sample: error: {one_line(e)}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


def _entry(fn):
    def run() -> None:
        sys.exit(fn())
    return run


train = _entry(train_main)
sample = _entry(sample_main)


if __name__ == "__main__":  # python -m rlr_backend.cli, e.g. under accelerate launch or torchrun
    train()
