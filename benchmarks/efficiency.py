"""Sample efficiency: eval reward against generated samples and wall time, per estimator and reward.

Every estimator trains the embedded default model with the same prompts, batch and number of updates
(so the same number of generated samples); the fixed-seed evaluation reward and a diversity figure
(mean pairwise RMS distance between the evaluation images of one prompt across seeds) are recorded
every few updates. Backprop estimators need a differentiable reward, so they sit out JPEG.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import torch

from rlr_backend.rewards import make_reward
from rlr_backend.train import TrainConfig, Trainer

logger = logging.getLogger(__name__)

ESTIMATORS = ("rlr", "code_compat", "ddpo", "truncated_bp", "zo")
REWARDS = ("prompt_alignment", "jpeg_compressibility")
EVAL_SEEDS = 4


def diversity(images: torch.Tensor, per_prompt: int) -> float:
    """Mean pairwise RMS pixel distance between images of the same prompt (images grouped by prompt)."""
    groups = images.reshape(-1, per_prompt, *images.shape[1:]).flatten(2)
    d = torch.cdist(groups, groups) / groups.shape[-1] ** 0.5
    n = per_prompt
    return float(d.sum() / (groups.shape[0] * n * (n - 1)))


def train_curve(estimator: str, reward: str, seed: int, steps: int, eval_every: int, batch: int,
                per_prompt: int, num_steps: int, out: Path) -> dict:
    cfg = TrainConfig(estimator=estimator, reward=reward, seed=seed, steps=steps, eval_every=eval_every,
                      batch_size=batch, images_per_prompt=per_prompt, num_inference_steps=num_steps,
                      fo_steps=min(4, num_steps - 2), eval_seeds=EVAL_SEEDS, ckpt_every=steps, output_dir=out,
                      run_name=f"{reward}-{estimator}-{seed}")
    points: dict[int, dict] = {}
    clock = {"train": 0.0}

    def on_step(info) -> None:
        clock["train"] += info.seconds

    def on_preview(images: torch.Tensor, step: int) -> None:
        points[step] = {"step": step, "samples": step * batch, "train_seconds": clock["train"],
                        "diversity": diversity(images, EVAL_SEEDS)}

    t0 = time.perf_counter()
    result = Trainer(cfg, progress=False, on_step=on_step, on_preview=on_preview).run()
    for step, r in result.eval_rewards.items():
        points.setdefault(step, {"step": step, "samples": step * batch})["eval_reward"] = r
    logger.info("%s %s seed %d: %s in %.0fs", reward, estimator, seed,
                " ".join(f"{p['eval_reward']:.3f}" for _, p in sorted(points.items())), time.perf_counter() - t0)
    return {"estimator": estimator, "reward": reward, "seed": seed, "wall_seconds": time.perf_counter() - t0,
            "points": [points[k] for k in sorted(points)]}


def run_suite(quick: bool, done: list[dict] | None = None, save=None, rewards: tuple[str, ...] = REWARDS) -> dict:
    """Runs every (reward, estimator, seed) not in ``done``; ``save(results)`` after each run (resumable)."""
    cfg = settings(quick)
    seeds, steps, every, batch, per_prompt, T = (cfg[k] for k in ("seeds", "updates", "eval_every", "batch",
                                                                  "images_per_prompt", "T"))
    runs = list(done or [])
    have = {(r["reward"], r["estimator"], r["seed"]) for r in runs}
    with tempfile.TemporaryDirectory() as tmp:
        for reward in rewards:
            differentiable = make_reward(reward).differentiable
            for est in ESTIMATORS:
                if not differentiable and est in ("truncated_bp", "code_compat"):
                    continue
                for seed in seeds:
                    if (reward, est, seed) in have:
                        continue
                    runs.append(train_curve(est, reward, seed, steps, every, batch, per_prompt, T, Path(tmp)))
                    if save is not None:
                        save({"settings": settings(quick), "runs": runs})
    return {"settings": settings(quick), "runs": runs}


def settings(quick: bool) -> dict:
    if quick:
        return {"seeds": [0], "updates": 4, "eval_every": 2, "batch": 4, "images_per_prompt": 2, "T": 8}
    return {"seeds": [0, 1, 2], "updates": 40, "eval_every": 5, "batch": 8, "images_per_prompt": 4, "T": 20}


def summarize(result: dict) -> list[dict]:
    """Per reward and estimator: mean final eval reward, and samples to reach 90% of the way from the
    start to the best final reward of any estimator (mean over seeds; None when never reached)."""
    out = []
    for reward in sorted({r["reward"] for r in result["runs"]}):
        runs = [r for r in result["runs"] if r["reward"] == reward]
        start = sum(r["points"][0]["eval_reward"] for r in runs) / len(runs)
        finals = {}
        for r in runs:
            finals.setdefault(r["estimator"], []).append(r["points"][-1]["eval_reward"])
        best = max(sum(v) / len(v) for v in finals.values())
        ddpo_final = sum(finals["ddpo"]) / len(finals["ddpo"]) if "ddpo" in finals else None
        level = start + 0.9 * (best - start)
        for est, vals in finals.items():
            mine = [r for r in runs if r["estimator"] == est]
            reached = [next((p["samples"] for p in r["points"] if p["eval_reward"] >= level), None) for r in mine]
            hit = [x for x in reached if x is not None]
            to_ddpo = None
            if ddpo_final is not None:  # the paper's target: samples to reach DDPO's final reward
                got = [next((p["samples"] for p in r["points"] if p["eval_reward"] >= ddpo_final), None) for r in mine]
                to_ddpo = sum(got) / len(got) if None not in got else None
            out.append({"reward": reward, "estimator": est, "final_mean": sum(vals) / len(vals),
                        "final_min": min(vals), "final_max": max(vals), "start": start, "level": level,
                        "samples_to_level": sum(hit) / len(hit) if len(hit) == len(reached) else None,
                        "seeds_reaching_level": len(hit), "seeds": len(reached), "samples_to_ddpo_final": to_ddpo,
                        "wall_seconds": sum(r["wall_seconds"] for r in mine) / len(mine),
                        "final_diversity": sum(r["points"][-1].get("diversity", float("nan")) for r in mine) / len(mine)})
    return out


def run_collapse(quick: bool) -> dict:
    """The paper's collapse claim: a longer run of truncated_bp and rlr on prompt alignment. Does the
    eval reward fall after rising, and does diversity shrink?"""
    steps, every, T = (6, 3, 8) if quick else (200, 20, 20)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for est in ("truncated_bp", "rlr"):
            runs.append(train_curve(est, "prompt_alignment", 0, steps, every, 8, 4, T, Path(tmp)))
    return {"settings": {"updates": steps, "eval_every": every, "batch": 8, "images_per_prompt": 4, "T": T,
                         "seeds": [0]}, "runs": runs}
