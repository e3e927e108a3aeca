"""The default training run (`rlr-train` with no options) with RLR, DDPO and truncated backprop (what the
default `--estimator auto` picks for the default reward), truncated backprop with the KL guard, and RLR
without its step baseline (the paper's estimator; `rlr` is the trainer's default, with it).

Same prompts, reward, batch and number of updates (so the same number of generated samples) for
each estimator and seed, and the same evaluation `rlr-train` prints (its fixed-seed images). Reports
the evaluation reward before and after, its two parts (prompt alignment and brightness), how far the
background drifts from the caption's colour (the reward is partly gamed by tinting dark backgrounds),
and the wall time. Saves after every run and skips runs already saved (resumable).

    python -m benchmarks.default_run [--steps 60] [--seeds 0 1 2] [--estimators rlr ddpo truncated_bp]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from rlr_backend.data.shapes import COLOR_RGB, parse_caption
from rlr_backend.rewards import make_reward
from rlr_backend.safe_io import atomic_path, save_json
from rlr_backend.train import TrainConfig, Trainer

from .common import machine_line

ESTIMATORS = ("rlr", "ddpo", "truncated_bp")  # auto is truncated_bp for this (differentiable) reward
#: variant label -> TrainConfig changes (an estimator name alone changes only the estimator)
VARIANTS = {"auto + kl": {"estimator": "auto", "kl_weight": 1e-3}, "auto + kl 1e-5": {"estimator": "auto", "kl_weight": 1e-5},
            "rlr, no step baseline": {"estimator": "rlr", "step_baseline": False},  # rlr: with it (the default)
            "rlr lr 3e-3": {"estimator": "rlr", "lr": 3e-3},  # rlr: at its default, 1e-3 with the step baseline
            "ddpo lr 3e-3": {"estimator": "ddpo", "lr": 3e-3}}  # ddpo: at its default, 1e-3
RESULTS = Path(__file__).parent / "results" / "default-run.json"


def border_colour(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 3): the median colour of each image's outer ring of pixels, i.e. its
    background (a shape that touches the border covers only part of the ring)."""
    ring = torch.cat([images[:, :, 0, :], images[:, :, -1, :], images[:, :, 1:-1, 0], images[:, :, 1:-1, -1]], dim=2)
    return ring.median(dim=2).values


def train_one(cfg: TrainConfig, label: str = "") -> dict:
    """One run; the evaluation images' reward parts and background colours before and after."""
    parts = {"alignment": make_reward("prompt_alignment"), "brightness": make_reward("brightness")}
    ids = [i for i in range(min(len(cfg.prompts), 4)) for _ in range(cfg.eval_seeds)]  # Trainer.evaluate's
    prompts = [cfg.prompts[i].fine for i in ids]
    seen: dict[int, dict] = {}

    def score(images: torch.Tensor, step: int) -> None:
        with torch.no_grad():
            colours = border_colour(images)
            seen[step] = {**{k: float(r(images, prompts).mean()) for k, r in parts.items()},
                          "background": {bg: colours[[j for j, p in enumerate(prompts) if parse_caption(p).bg == bg]]
                                         .mean(0).tolist() for bg in sorted({parse_caption(p).bg for p in prompts})}}

    t0 = time.perf_counter()
    cpu0 = time.process_time()
    result = Trainer(cfg, progress=False, on_preview=score).run()
    return {"estimator": label or cfg.estimator, "seed": cfg.seed, "before": result.eval_rewards[0],
            "after": result.eval_rewards[result.steps_done], "eval_images": result.eval_images,
            "parts_before": seen[0], "parts_after": seen[result.steps_done], "wall_s": time.perf_counter() - t0,
            "cpu_s": time.process_time() - cpu0, "load": os.getloadavg()[0]}


def shared_settings(cfg_json: dict) -> dict:
    """What every run of the file shares (each run sets its own estimator); options added to TrainConfig since
    the file was saved take their defaults, which those runs had, so saved runs are kept."""
    full = json.loads(json.dumps(TrainConfig.from_json(cfg_json).to_json())) if cfg_json else {}
    return {k: v for k, v in full.items() if k not in ("estimator", "output_dir")}


def render(result: dict) -> str:
    c = TrainConfig.from_json(result["config"])
    rows, steps = result["runs"], result["config"]["steps"]
    n_eval = rows[0]["eval_images"] if rows else 0
    lr_text = (f"{c.lr:g}" if c.lr is not None else
               "each estimator's default for this differentiable reward (1e-3 for rlr with the step baseline and ddpo, "
               "3e-3 for the others) unless named")
    lines = [f"# Default run: `rlr-train` defaults, {steps} updates, seeds {sorted({r['seed'] for r in rows})}", "",
             f"Machine: {result['machine']}.",
             f"Command: `python -m benchmarks.default_run --steps {steps}` (results: benchmarks/results/default-run.json).",
             f"Training: reward `{c.reward}`, {steps} updates x batch {c.batch_size} "
             f"({c.images_per_prompt} images per prompt), T={c.num_inference_steps}, eta {c.eta:g}, "
             f"guidance {c.guidance_scale:g}, lr {lr_text}, LoRA rank {c.lora_rank}; rlr with h={c.h}, "
             f"fo_steps={c.fo_steps}, ZO {c.zo_mode}, with the step baseline unless named; truncated_bp backpropagates the last {c.truncation} steps (it is "
             "what `--estimator auto`, the default, picks for this differentiable reward); `+ kl` adds the KL guard "
             f"(weight {VARIANTS['auto + kl']['kl_weight']:g} unless named). Every estimator sees the same number of generated samples.",
             f"Evaluation: the {n_eval} fixed-seed images `rlr-train` evaluates and prints (the 4 training prompts x "
             f"{c.eval_seeds} seeds); reward = alignment + brightness, each also shown alone.", "",
             "| estimator | seed | eval reward before | after | change | alignment before -> after "
             "| brightness before -> after | wall / CPU time (s) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pb, pa = r["parts_before"], r["parts_after"]
        lines.append(f"| {r['estimator']} | {r['seed']} | {r['before']:.4f} | {r['after']:.4f} | "
                     f"{r['after'] - r['before']:+.4f} | {pb['alignment']:.3f} -> {pa['alignment']:.3f} | "
                     f"{pb['brightness']:.3f} -> {pa['brightness']:.3f} | {r['wall_s']:.0f} / {r['cpu_s']:.0f} |")
    ests = list(dict.fromkeys(r["estimator"] for r in rows))
    lines += ["", "| estimator | mean change (min, max) | mean alignment change | mean brightness change "
              "| mean CPU time (s) |", "|---|---|---|---|---|"]
    for est in ests:
        mine = [r for r in rows if r["estimator"] == est]
        ch = [r["after"] - r["before"] for r in mine]
        lines.append(f"| {est} | {statistics.mean(ch):+.4f} ({min(ch):+.4f}, {max(ch):+.4f}) | "
                     f"{statistics.mean(r['parts_after']['alignment'] - r['parts_before']['alignment'] for r in mine):+.4f} | "
                     f"{statistics.mean(r['parts_after']['brightness'] - r['parts_before']['brightness'] for r in mine):+.4f} | "
                     f"{statistics.mean(r['cpu_s'] for r in mine):.0f} |")
    bgs = sorted(rows[0]["parts_before"]["background"]) if rows else []
    lines += ["", "**Background colour drift** (the median colour of the evaluation images' border, RGB in 0-1, "
              "mean over seeds; the caption's colour in brackets). The reward pays for brightness, so the model "
              "learns to tint backgrounds as well as to grow bright shapes:", "",
              "| estimator | " + " | ".join(f"{bg} background {tuple(round(v / 255, 2) for v in COLOR_RGB[bg])}"
                                          for bg in bgs) + " |", "|---|" + "---|" * len(bgs)]

    def rgb(vals) -> str:
        return "(" + ", ".join(f"{v:.2f}" for v in vals) + ")"

    for est in ests:
        mine = [r for r in rows if r["estimator"] == est]
        cells = []
        for bg in bgs:
            b = [statistics.mean(r["parts_before"]["background"][bg][k] for r in mine) for k in range(3)]
            a = [statistics.mean(r["parts_after"]["background"][bg][k] for r in mine) for k in range(3)]
            cells.append(f"{rgb(b)} -> {rgb(a)}")
        lines.append(f"| {est} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=TrainConfig().steps)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--estimators", nargs="+", default=list(ESTIMATORS) + list(VARIANTS),
                    help=f"estimators, or variants: {list(VARIANTS)}")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--out", type=Path, default=Path("docs/results/default_run.md"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    config = TrainConfig(steps=args.steps)
    result = json.loads(args.results.read_text()) if args.results.is_file() else {}
    if shared_settings(result.get("config", {})) != shared_settings(config.to_json()):
        result = {"config": config.to_json(), "machine": machine_line(), "runs": []}  # new settings: start over
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for est in args.estimators:
                if any(r["estimator"] == est and r["seed"] == seed for r in result["runs"]):
                    continue
                changes = VARIANTS.get(est, {"estimator": est})
                row = train_one(replace(config, **changes, seed=seed, eval_every=0, output_dir=Path(tmp),
                                        run_name=f"{est.replace(' ', '').replace('+', '_')}-{seed}"), label=est)
                result["runs"].append(row)
                save_json(result, args.results)
                print(f"{est} seed {seed}: {row['before']:.4f} -> {row['after']:.4f} in {row['wall_s']:.0f} s wall, "
                      f"{row['cpu_s']:.0f} s CPU (load {row['load']:.2f})", flush=True)
    with atomic_path(args.out) as tmp_page:
        tmp_page.write_text(render(result))
    print(render(result))


if __name__ == "__main__":
    main()
