"""Command line of the GPU check (see the package docstring and docs/gpu_check.md)."""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import device as dev
from .report import render
from .runner import Budget, Checks, release_memory

logger = logging.getLogger(__name__)

RESULTS = Path(__file__).resolve().parents[1] / "results"
QUIET = ("diffusers", "transformers", "matplotlib", "PIL", "rlr_backend.lora", "rlr_backend.train",
         "rlr_backend.estimators", "rlr_backend.models", "rlr_backend.rewards", "comfy_nodes")


def parse(argv: list[str] | None) -> argparse.Namespace:
    from .updates import MODELS, VARIANTS

    from . import __doc__ as doc

    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget; checks that would not fit "
                    "are recorded as skipped (default 480 = 8 minutes)")
    ap.add_argument("--tiny", action="store_true", help="tiny configs of the same architecture families and a "
                    "2-update default run (seconds on a CPU; the test suite runs this)")
    ap.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if there is one; without "
                    "one the tiny checks run on the CPU)")
    ap.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    ap.add_argument("--variants", nargs="+", choices=[v.key for v in VARIANTS], default=[v.key for v in VARIANTS],
                    help="estimator variants to measure (default: all, in this order of value)")
    ap.add_argument("--skip", nargs="*", choices=("updates", "training", "nodes"), default=[],
                    help="groups of checks to leave out")
    ap.add_argument("--train-steps", type=int, default=None, help="updates of the default run (20; tiny: 2)")
    ap.add_argument("--memory-tolerance", type=float, default=0.10, help="largest accepted |measured / predicted "
                    "- 1| of peak memory (default 0.10)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS, help="where gpu-check[-tiny].json/.md go")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads of this process and of the CPU "
                    "reference run, each (default: half the cores, at most 8)")
    args = ap.parse_args(argv)
    if args.budget_s <= 0:
        ap.error("--budget-s must be > 0")
    if args.train_steps is not None and args.train_steps < 1:
        ap.error("--train-steps must be >= 1")
    if not 0 < args.memory_tolerance < 1:
        ap.error("--memory-tolerance must be between 0 and 1")
    if args.threads is not None and args.threads < 1:
        ap.error("--threads must be >= 1")
    return args


def choose_device(args: argparse.Namespace) -> torch.device:
    """The device to check; no CUDA and no --device: the CPU with tiny configs (one line says so)."""
    if args.device is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        logger.warning("no CUDA device (torch %s, CUDA build: %s): the GPU checks are skipped; running the tiny "
                       "checks on the CPU", torch.__version__, torch.version.cuda or "no")
        args.tiny = True
        return torch.device("cpu")
    from rlr_backend.train.memory import resolve_device

    device = resolve_device(args.device)
    if device.type != "cuda" and not args.tiny:
        logger.warning("--device %s: the full-size models need a CUDA GPU; running the tiny checks", device)
        args.tiny = True
    return device


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()  # the budget counts the imports and CUDA's start-up too
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _quiet_progress_bars()
    args = parse(argv)
    budget = Budget(args.budget_s, start=start)
    try:
        device = choose_device(args)
    except ValueError as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2
    from . import training

    threads = args.threads or max(1, min(8, (os.cpu_count() or 2) // 2))
    torch.set_num_threads(threads)  # the CPU reference run gets as many (it runs at the same time)
    stem = "gpu-check-tiny" if args.tiny else "gpu-check"
    json_path, md_path = args.out_dir / f"{stem}.json", args.out_dir / f"{stem}.md"
    meta = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python -m benchmarks.gpu_check " + " ".join(sys.argv[1:] if argv is None else argv),
            "tiny": args.tiny, "device": str(device), "memory_tolerance": args.memory_tolerance,
            "json": str(json_path.name), "cuda": torch.cuda.is_available(), "environment": dev.environment(device)}
    checks = Checks(budget, meta, json_path, md_path, render, guard_min_s=300.0 if args.tiny else 60.0)
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    steps = args.train_steps or (2 if args.tiny else 20)
    reference = None
    try:
        if "training" not in args.skip:
            reference = training.start_reference(work, steps, args.tiny, threads)
        if "updates" not in args.skip:
            run_updates(checks, device, args.models, args.variants, args.tiny, args.memory_tolerance)
        if reference is not None:
            checks.run(f"default recipe, {steps} update{'s' * (steps > 1)}: {device.type} vs CPU", "training",
                       lambda: training.compare(
                           training.train_default(str(device), steps, work, args.tiny, "default-device"),
                           training.wait_reference(reference, work, budget.left() - 5), require_rise=not args.tiny),
                       estimate_s=10.0 if args.tiny else 60.0)
        if "nodes" not in args.skip:
            checks.run(f"ComfyUI Trainer node on {device.type}", "nodes",
                       lambda: training.comfy_nodes_run(work, args.tiny), estimate_s=10.0 if args.tiny else 30.0)
    finally:
        if reference is not None and reference.poll() is None:
            reference.kill()
            reference.wait()
        shutil.rmtree(work, ignore_errors=True)
        checks.save()
    failed = checks.failed()
    c = checks.data()["counts"]
    logger.info("%d passed, %d failed, %d skipped in %.0f s; wrote %s and %s", c["pass"], c["fail"], c["skipped"],
                budget.used(), json_path, md_path)
    return 1 if failed else 0


def _quiet_progress_bars() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def run_updates(checks: Checks, device: torch.device, models: list[str], variants: list[str], tiny: bool,
                tolerance: float) -> None:
    """Every (model, variant) check in value order: each model's key variants, then the rest; a model is
    built when first needed (a check of its own) and freed after its last variant."""
    from .updates import KEY_VARIANTS, MODELS, VARIANTS, Bench, check_variant, docs_fits, model_label

    docs = None if tiny else docs_fits()
    key, rest = [v for v in VARIANTS[:KEY_VARIANTS] if v.key in variants], \
        [v for v in VARIANTS[KEY_VARIANTS:] if v.key in variants]
    plan = [(m, v) for m in models for v in key] + [(m, v) for m in models for v in rest]
    last = {m: max(i for i, (n, _) in enumerate(plan) if n == m) for m in models}
    benches: dict[str, Bench | None] = {}
    for i, (m, v) in enumerate(plan):
        mp, label = MODELS[m], model_label(MODELS[m], tiny)
        if m not in benches:
            rec = checks.run(f"{label}: build", "update",
                             lambda: _build(benches, m, device, tiny, docs), estimate_s=5.0 if tiny else mp.build_s)
            benches.setdefault(m, None)
            if rec["status"] != "pass":
                benches[m] = None
        bench = benches[m]
        name = f"{label}: {v.name}"
        if bench is None:
            checks.skip(name, "update", f"the {label} stack was not built", model=label, variant=v.name,
                        batch=mp.batch)
        else:
            checks.run(name, "update", lambda: check_variant(bench, v, tolerance),
                       estimate_s=v.time_ratio_guess * bench.sample_seconds + 1.0)
        if i == last[m]:
            benches[m] = bench = None
            release_memory()


def _build(benches: dict, arch: str, device: torch.device, tiny: bool, docs) -> dict:
    from .updates import MODELS, Bench

    b = Bench(MODELS[arch], device=device, tiny=tiny, docs=docs)
    benches[arch] = b
    parts = {("ckpt" if k else "plain"): {"step_peak": s.peak, "step_retained": s.retained, "step_nograd": s.nograd,
                                          "reward_peak": r.peak, "reward_retained": r.retained,
                                          "reward_nograd": r.nograd} for k, (s, r) in b.parts.items()}
    return {"status": "pass", "model": b.label, "batch": b.plan.batch, "sample_seconds": b.sample_seconds,
            "persistent_bytes": b.persistent, "unet_params": b.stack.unet_params, "parts": parts,
            "summary": f"{b.persistent / 1e9:.2f} GB of weights + Adam state; no-grad sample {b.sample_seconds:.2f} s"}
