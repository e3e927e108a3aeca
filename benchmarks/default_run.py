"""The default training run (`rlr-train` with no options) with RLR, DDPO and truncated backprop.

Same prompts, reward, batch and number of updates (so the same number of generated samples) for
each estimator and seed. Reports the evaluation reward before and after, its two parts (prompt
alignment and brightness of the evaluation images), and the wall time.

    python -m benchmarks.default_run [--steps 60] [--seeds 0 1 2] [--out docs/results/default_run.md]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rlr_backend.rewards import make_reward
from rlr_backend.train import TrainConfig, Trainer

from .common import machine_line

ESTIMATORS = ("rlr", "ddpo", "truncated_bp")
EVAL_SEEDS = 4


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=TrainConfig().steps)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--estimators", nargs="+", default=list(ESTIMATORS))
    ap.add_argument("--out", type=Path, default=Path("docs/results/default_run.md"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    header = machine_line()
    parts = {"alignment": make_reward("prompt_alignment"), "brightness": make_reward("brightness")}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for est in args.estimators:
                cfg = TrainConfig(estimator=est, steps=args.steps, seed=seed, eval_every=0, eval_seeds=EVAL_SEEDS,
                                  output_dir=Path(tmp), run_name=f"{est}-{seed}")
                prompts = [cfg.prompts[i].fine for i in range(min(len(cfg.prompts), 4)) for _ in range(EVAL_SEEDS)]
                previews: dict[int, dict[str, float]] = {}

                def score(images: torch.Tensor, step: int) -> None:
                    with torch.no_grad():
                        previews[step] = {k: float(r(images, prompts).mean()) for k, r in parts.items()}

                t0 = time.perf_counter()
                result = Trainer(cfg, progress=False, on_preview=score).run()
                secs = time.perf_counter() - t0
                before, after = result.eval_rewards[0], result.eval_rewards[args.steps]
                rows.append((est, seed, before, after, previews[0], previews[args.steps], secs))
                print(f"{est} seed {seed}: {before:.4f} -> {after:.4f} in {secs:.0f}s "
                      f"(load {os.getloadavg()[0]:.2f})", flush=True)
    c = TrainConfig()
    lines = [f"# Default run: `rlr-train` defaults, {args.steps} updates, seeds {args.seeds}", "",
             f"Machine: {header}; load average at the end {os.getloadavg()[0]:.2f}.",
             f"Command: `python -m benchmarks.default_run --steps {args.steps}`.",
             f"Training: reward `{c.reward}`, {args.steps} updates x batch {c.batch_size} "
             f"({c.images_per_prompt} images per prompt), T={c.num_inference_steps}, eta {c.eta}, "
             f"guidance {c.guidance_scale}, lr {c.lr}, LoRA rank {c.lora_rank}; rlr with h={c.h}, "
             f"fo_steps={c.fo_steps}, ZO {c.zo_mode}; truncated_bp backpropagates the last {c.truncation} steps. "
             "Every estimator sees the same number of generated samples.",
             f"Evaluation: {4 * EVAL_SEEDS} images (the 4 training prompts x {EVAL_SEEDS} fixed seeds); "
             "reward = alignment + brightness, each also shown alone.", "",
             "| estimator | seed | eval reward before | after | change | alignment before -> after "
             "| brightness before -> after | wall time (s) |", "|---|---|---|---|---|---|---|---|"]
    for est, seed, b, a, pb, pa, s in rows:
        lines.append(f"| {est} | {seed} | {b:.4f} | {a:.4f} | {a - b:+.4f} | {pb['alignment']:.3f} -> "
                     f"{pa['alignment']:.3f} | {pb['brightness']:.3f} -> {pa['brightness']:.3f} | {s:.0f} |")
    lines += ["", "| estimator | mean change (min, max) | mean alignment change | mean brightness change "
              "| mean wall time (s) |", "|---|---|---|---|---|"]
    for est in args.estimators:
        mine = [r for r in rows if r[0] == est]
        ch = [r[3] - r[2] for r in mine]
        lines.append(f"| {est} | {statistics.mean(ch):+.4f} ({min(ch):+.4f}, {max(ch):+.4f}) | "
                     f"{statistics.mean(r[5]['alignment'] - r[4]['alignment'] for r in mine):+.4f} | "
                     f"{statistics.mean(r[5]['brightness'] - r[4]['brightness'] for r in mine):+.4f} | "
                     f"{statistics.mean(r[6] for r in mine):.0f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
