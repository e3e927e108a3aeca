"""Quality figures of the embedded default model.

Samples images for the held-out caption combinations (never seen in training)
with fixed seeds, classifies them with the prompt-alignment classifier and
reports how often the shape, the foreground colour and the background colour
match the caption, plus the model's size on disk::

    python -m rlr_backend.models.eval_default            # 256 samples, DDIM 30 steps, CFG 4
    python -m rlr_backend.models.eval_default --grid samples.png
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch

from rlr_backend.data import shapes
from rlr_backend.images import grid_image, to_pil
from rlr_backend.models.default_model import DEFAULT_GUIDANCE, DEFAULT_MODEL_DIR, DEFAULT_NUM_STEPS, load_default_pipeline

logger = logging.getLogger(__name__)


def model_size_mb(path: str | Path) -> float:
    """Total size of the files in a model folder, in MB (10^6 bytes)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e6


def eval_prompts(n: int, split: str = "heldout") -> list[str]:
    """``n`` captions cycling through the combinations of ``split`` in a fixed order."""
    combos = shapes.heldout_combinations() if split == "heldout" else shapes.train_combinations()
    return [shapes.make_caption(combos[i % len(combos)]) for i in range(n)]


@torch.no_grad()
def sample_images(pipe, prompts: list[str], seeds: list[int], num_inference_steps: int = DEFAULT_NUM_STEPS, guidance_scale: float = DEFAULT_GUIDANCE, eta: float = 0.0, batch_size: int = 16) -> torch.Tensor:
    """Images (N, 3, 32, 32) in [0, 1], one per (prompt, seed), sampled with DDIM."""
    out = []
    for i in range(0, len(prompts), batch_size):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i : i + batch_size]]
        res = pipe(
            prompts[i : i + batch_size],
            height=shapes.IMAGE_SIZE,
            width=shapes.IMAGE_SIZE,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            eta=eta,
            generator=gens,
            output_type="pt",
        )
        out.append(res.images.float().cpu())
    return torch.cat(out)


def match_rates(images: torch.Tensor, prompts: list[str], reward) -> dict:
    """Shape / foreground / background / all-three match rates of the classifier, and the mean reward."""
    m = reward.match(images, prompts).float()
    with torch.no_grad():
        r = reward(images, prompts)
    return {"shape": m[:, 0].mean().item(), "fg": m[:, 1].mean().item(), "bg": m[:, 2].mean().item(),
            "all": m.all(dim=1).float().mean().item(), "mean_reward": r.mean().item()}


def evaluate(
    model_dir: str | Path | None = None,
    n: int = 256,
    seed: int = 1234,
    num_inference_steps: int = DEFAULT_NUM_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE,
    eta: float = 0.0,
    split: str = "heldout",
    classifier: str | Path | None = None,
    grid: str | Path | None = None,
) -> dict:
    """Match rates of ``n`` samples of the default model (see module docstring)."""
    from rlr_backend.rewards.alignment import PromptAlignmentReward

    model_dir = Path(DEFAULT_MODEL_DIR if model_dir is None else model_dir)
    pipe = load_default_pipeline(model_dir)
    reward = PromptAlignmentReward(classifier)
    prompts = eval_prompts(n, split)
    seeds = [seed + i for i in range(n)]
    t0 = time.time()
    images = sample_images(pipe, prompts, seeds, num_inference_steps, guidance_scale, eta)
    dt = time.time() - t0
    res = {
        "model_dir": str(model_dir),
        "n": n,
        "split": split,
        "sampler": f"DDIM {num_inference_steps} steps, eta {eta}, CFG {guidance_scale}",
        **match_rates(images, prompts, reward),
        "model_size_mb": round(model_size_mb(model_dir), 2),
        "sampling_seconds_per_image": dt / n,
        "torch_threads": torch.get_num_threads(),
    }
    if grid is not None:
        save_grid(images[:64], grid)
    return res


def save_grid(images: torch.Tensor, path: str | Path, ncol: int = 8, scale: int = 4) -> None:
    grid_image(to_pil(images, scale), ncol, background="black").save(path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Shape / colour match rates of the default model on held-out caption combinations.")
    ap.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--seed", type=int, default=1234, help="first sampling seed (sample i uses seed + i)")
    ap.add_argument("--steps", type=int, default=DEFAULT_NUM_STEPS)
    ap.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    ap.add_argument("--eta", type=float, default=0.0)
    ap.add_argument("--split", choices=["heldout", "train"], default="heldout")
    ap.add_argument("--classifier", default=None, help="alignment classifier .safetensors (default: the committed one)")
    ap.add_argument("--grid", default=None, help="save the first 64 samples as a PNG grid")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    ap.add_argument("--save-json", default=None, help="also write the result to this JSON file")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    res = evaluate(args.model, args.n, args.seed, args.steps, args.guidance, args.eta, args.split, args.classifier, args.grid)
    if args.save_json:
        Path(args.save_json).write_text(json.dumps(res, indent=2) + "\n")
    if args.json:
        print(json.dumps(res, indent=2))
        return
    print(f"model {res['model_dir']} ({res['model_size_mb']:.2f} MB)")
    print(f"{res['n']} samples, {res['split']} caption combinations, {res['sampler']}, {res['sampling_seconds_per_image'] * 1000:.0f} ms/image")
    print(f"shape match {res['shape']:.1%}  fg colour match {res['fg']:.1%}  bg colour match {res['bg']:.1%}  all three {res['all']:.1%}  mean reward {res['mean_reward']:.3f}")


if __name__ == "__main__":
    main()
