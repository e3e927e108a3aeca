"""Sample efficiency: eval reward against generated samples and wall time, per estimator and reward.

Every estimator trains the embedded default model with the same prompts, batch and number of updates
(so the same number of generated samples); the fixed-seed evaluation reward and a diversity figure
(mean pairwise RMS distance between the evaluation images of one prompt across seeds) are recorded
every few updates. Backprop estimators need a differentiable reward, so they sit out JPEG.

Learning rates: every estimator trains at the trainer's default (3e-3, chosen for RLR) unless it is in
the sweep (``settings()["lr_sweep"]``): those first train seed 0 at each swept rate, and the rate with the
best final eval reward trains the remaining seeds, so DDPO is not judged at a rate that suits RLR.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from rlr_backend.rewards import make_reward
from rlr_backend.safe_io import save_json
from rlr_backend.train import TrainConfig, Trainer
# every variant's rate unless swept (the saved runs were trained at it): the rate before the per-estimator defaults
from rlr_backend.train.config import DEFAULT_LR
from rlr_backend.train.checkpoint import latest_checkpoint
from rlr_backend.train.report import diversity

logger = logging.getLogger(__name__)

ESTIMATORS = ("rlr", "code_compat", "ddpo", "truncated_bp", "zo", "rlr_sb", "zo_sb")
#: row -> (estimator, TrainConfig overrides): "rlr" and "zo" without the step baseline (their rows predate it),
#: "rlr_sb" and "zo_sb" with it (REINFORCE with the step baseline: does RLR's split add anything to it?)
VARIANTS: dict[str, tuple[str, dict]] = {"rlr": ("rlr", {"step_baseline": False}), "rlr_sb": ("rlr", {"step_baseline": True}),
                                         "zo": ("zo", {"step_baseline": False}), "zo_sb": ("zo", {"step_baseline": True})}
REWARDS = ("prompt_alignment", "jpeg_compressibility")
EVAL_SEEDS = 4




def work_dir(suite: str) -> Path:
    """Where a suite's runs train: kept between invocations so a killed run resumes from its last checkpoint
    (``RLR_BENCH_WORK`` overrides the root, default ``~/.cache/rlr-bench``)."""
    root = Path(os.environ.get("RLR_BENCH_WORK") or Path.home() / ".cache" / "rlr-bench")
    return root / suite


def train_curve(estimator: str, reward: str, seed: int, steps: int, eval_every: int, batch: int,
                per_prompt: int, num_steps: int, out: Path, lr: float = DEFAULT_LR, overrides: dict | None = None,
                tag: str = "", heldout_seed: int | None = None, eval_seeds: int = EVAL_SEEDS,
                check: tuple[int, int] | None = None) -> dict:
    """Train one run and record, at every evaluation: samples so far, training wall and CPU seconds, the
    fixed-seed eval reward, diversity, (``heldout_seed``) the reward on a second held-out seed set and
    (``check``: (seed, images per prompt)) the reward on a third, larger one (``check_reward``).

    Checkpointed at every evaluation with the points so far in ``points.json``: called again on the same
    ``out`` after a kill, it resumes from the last evaluation (the trainer's resume is bit for bit)."""
    kw = dict(estimator=estimator, reward=reward, seed=seed, steps=steps, eval_every=eval_every, lr=lr,
              batch_size=batch, images_per_prompt=per_prompt, num_inference_steps=num_steps,
              fo_steps=min(4, num_steps - 2), eval_seeds=eval_seeds, ckpt_every=eval_every or steps,
              output_dir=out, run_name=f"{reward.replace(':', '_')}-{estimator}{tag.replace(' ', '_')}-lr{lr:g}-{seed}")
    cfg = TrainConfig(**{**kw, **(overrides or {})})
    points_path = cfg.run_dir / "points.json"
    resume = latest_checkpoint(cfg.run_dir) is not None
    points: dict[int, dict] = {}
    if resume and points_path.is_file():
        points = {int(k): v for k, v in json.loads(points_path.read_text()).items()}

    def on_preview(images: torch.Tensor, step: int) -> None:
        points[step] = {"step": step, "samples": step * batch, "diversity": diversity(images, eval_seeds)}
        if heldout_seed is not None:
            points[step]["heldout_reward"] = trainer.evaluate(seed=heldout_seed)[0]
        if check is not None:
            points[step]["check_reward"] = trainer.evaluate(seed=check[0], per_prompt=check[1])[0]
        save_json({str(k): v for k, v in sorted(points.items())}, points_path)

    t0 = time.perf_counter()
    trainer = Trainer(cfg, progress=False, on_preview=on_preview)
    if resume:
        logger.info("%s: resuming", cfg.run_dir)
    result = trainer.run(resume=resume)
    for step, r in result.eval_rewards.items():
        points.setdefault(step, {"step": step, "samples": step * batch})["eval_reward"] = r
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    for p in points.values():  # training time up to and including the point's update, across resumes
        done = [r for r in rows if 0 < r["step"] <= p["step"]]
        p["train_seconds"] = sum(r.get("seconds", 0.0) for r in done)
        p["train_cpu_seconds"] = sum(r.get("cpu_seconds", 0.0) for r in done)
    logger.info("%s %s%s lr %g seed %d: %s in %.0fs", reward, estimator, tag, lr, seed,
                " ".join(f"{p['eval_reward']:.3f}" for _, p in sorted(points.items())), time.perf_counter() - t0)
    return {"estimator": estimator, "reward": reward, "seed": seed, "lr": lr, "wall_seconds": time.perf_counter() - t0,
            "points": [points[k] for k in sorted(points)], "run_name": cfg.run_name,
            "guard_step": result.best_step}  # lora_best's update after the guard's final check


def forget(out: Path, run_name: str) -> None:
    """Delete a recorded run's training folder (its figures are in the results file)."""
    shutil.rmtree(out / run_name, ignore_errors=True)


def run_lr(run: dict) -> float:
    return run.get("lr", DEFAULT_LR)  # results saved before the sweep existed ran at the default


def chosen_lr(runs: list[dict], reward: str, estimator: str, sweep: dict) -> float:
    """The swept rate whose seed-0 run ended with the best eval reward (the default when not swept)."""
    rates = sweep.get(estimator)
    if not rates:
        return DEFAULT_LR
    tried = {run_lr(r): r["points"][-1]["eval_reward"] for r in runs
             if r["reward"] == reward and r["estimator"] == estimator and r["seed"] == 0 and run_lr(r) in rates}
    if not tried:
        raise ValueError(f"no seed-0 sweep run for {estimator} on {reward}")
    return max(tried, key=tried.get)


def run_suite(quick: bool, done: list[dict] | None = None, save=None, rewards: tuple[str, ...] = REWARDS) -> dict:
    """Runs every (reward, estimator, learning rate, seed) not in ``done``; ``save(results)`` after each run
    (resumable). Swept estimators run seed 0 at every rate first, then the other seeds at the best one."""
    cfg = settings(quick)
    seeds, steps, every, batch, per_prompt, T = (cfg[k] for k in ("seeds", "updates", "eval_every", "batch",
                                                                  "images_per_prompt", "T"))
    sweep = cfg["lr_sweep"]
    runs = list(done or [])
    have = {(r["reward"], r["estimator"], run_lr(r), r["seed"]) for r in runs}

    def ensure(reward: str, est: str, lr: float, seed: int, tmp: Path) -> None:
        if (reward, est, lr, seed) in have:
            return
        base, overrides = VARIANTS.get(est, (est, None))
        run = train_curve(base, reward, seed, steps, every, batch, per_prompt, T, tmp, lr=lr, overrides=overrides,
                          tag=f"-{est}" if est != base else "")
        name = run.pop("run_name")
        runs.append({**run, "estimator": est})
        have.add((reward, est, lr, seed))
        if save is not None:
            save({"settings": cfg, "runs": runs})
        forget(tmp, name)

    tmp = work_dir("efficiency-quick" if quick else "efficiency")  # a killed run resumes
    for reward in rewards:
        differentiable = make_reward(reward).differentiable
        for est in ESTIMATORS:
            if not differentiable and est in ("truncated_bp", "code_compat"):
                continue
            for lr in sweep.get(est, ()):
                ensure(reward, est, lr, seeds[0], tmp)
            lr = chosen_lr(runs, reward, est, sweep)
            for seed in seeds:
                ensure(reward, est, lr, seed, tmp)
    return {"settings": cfg, "runs": runs}


def settings(quick: bool) -> dict:
    if quick:
        return {"seeds": [0], "updates": 4, "eval_every": 2, "batch": 4, "images_per_prompt": 2, "T": 8,
                "lr_sweep": {"ddpo": [1e-3, DEFAULT_LR]}}
    return {"seeds": [0, 1, 2], "updates": 40, "eval_every": 5, "batch": 8, "images_per_prompt": 4, "T": 20,
            "lr_sweep": {"ddpo": [3e-4, 1e-3, DEFAULT_LR], "zo": [3e-4, 1e-3, DEFAULT_LR],
                         "zo_sb": [3e-4, 1e-3, DEFAULT_LR], "rlr_sb": [3e-4, 1e-3, DEFAULT_LR]}}


def final_runs(result: dict, reward: str) -> dict[str, list[dict]]:
    """Per estimator, the runs on ``reward`` at the estimator's chosen learning rate."""
    sweep = result["settings"].get("lr_sweep", {})
    runs = [r for r in result["runs"] if r["reward"] == reward]
    out: dict[str, list[dict]] = {}
    for est in dict.fromkeys(r["estimator"] for r in runs):
        lr = chosen_lr(runs, reward, est, sweep)
        out[est] = [r for r in runs if r["estimator"] == est and run_lr(r) == lr]
    return out


def sweep_rows(result: dict) -> list[dict]:
    """The learning-rate sweep: seed-0 final eval reward per (reward, estimator, rate), and which was kept."""
    sweep = result["settings"].get("lr_sweep", {})
    rows = []
    for reward in sorted({r["reward"] for r in result["runs"]}):
        runs = [r for r in result["runs"] if r["reward"] == reward]
        for est, rates in sweep.items():
            tried = [r for r in runs if r["estimator"] == est and r["seed"] == 0 and run_lr(r) in rates]
            if not tried:
                continue
            keep = chosen_lr(runs, reward, est, sweep)
            rows += [{"reward": reward, "estimator": est, "lr": run_lr(r), "start": r["points"][0]["eval_reward"],
                      "final": r["points"][-1]["eval_reward"], "chosen": run_lr(r) == keep}
                     for r in sorted(tried, key=run_lr)]
    return rows


def mean_curve(runs: list[dict]) -> list[tuple[int, float]]:
    """(samples, eval reward averaged over the runs' seeds) at each evaluation."""
    return [(p["samples"], sum(r["points"][i]["eval_reward"] for r in runs) / len(runs))
            for i, p in enumerate(runs[0]["points"])]


def summarize(result: dict) -> list[dict]:
    """Per reward and estimator (at its chosen learning rate): mean final eval reward, and the samples after
    which the seed-averaged eval reward first reaches 90% of the way from the start to the best final reward
    of any estimator (None when never). Samples to DDPO's final reward only when DDPO ended above the start."""
    out = []
    for reward in sorted({r["reward"] for r in result["runs"]}):
        by_est = final_runs(result, reward)
        runs = [r for rs in by_est.values() for r in rs]
        start = sum(r["points"][0]["eval_reward"] for r in runs) / len(runs)
        finals = {est: [r["points"][-1]["eval_reward"] for r in rs] for est, rs in by_est.items()}
        best = max(sum(v) / len(v) for v in finals.values())
        ddpo_final = sum(finals["ddpo"]) / len(finals["ddpo"]) if "ddpo" in finals else None
        ddpo_improved = ddpo_final is not None and ddpo_final > start
        level = start + 0.9 * (best - start)
        for est, vals in finals.items():
            mine = by_est[est]
            curve = mean_curve(mine)
            reached = [next((p["samples"] for p in r["points"] if p["eval_reward"] >= level), None) for r in mine]
            hit = [x for x in reached if x is not None]
            to_ddpo = None
            if ddpo_improved:  # the paper's target: samples to reach DDPO's final reward
                to_ddpo = next((n for n, v in curve if v >= ddpo_final), None)
            out.append({"reward": reward, "estimator": est, "lr": run_lr(mine[0]), "final_mean": sum(vals) / len(vals),
                        "final_min": min(vals), "final_max": max(vals), "start": start, "level": level,
                        "samples_to_level": next((n for n, v in curve if v >= level), None),
                        "seeds_reaching_level": len(hit), "seeds": len(reached), "samples_to_ddpo_final": to_ddpo,
                        "ddpo_improved": ddpo_improved, "budget_samples": mine[0]["points"][-1]["samples"],
                        "wall_seconds": sum(r["wall_seconds"] for r in mine) / len(mine),
                        "final_diversity": sum(r["points"][-1].get("diversity", float("nan")) for r in mine) / len(mine)})
    return out


def run_collapse(quick: bool, done: list[dict] | None = None, save=None) -> dict:
    """The paper's collapse claim: a longer run of truncated_bp and rlr on prompt alignment. Does the
    eval reward fall after rising, and does diversity shrink? Resumable like ``run_suite``."""
    steps, every, T, seeds = (6, 3, 8, [0]) if quick else (200, 20, 20, [0, 1, 2])
    cfg = {"updates": steps, "eval_every": every, "batch": 8, "images_per_prompt": 4, "T": T, "seeds": seeds}
    runs = list(done or [])
    have = {(r["estimator"], r["seed"]) for r in runs}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for est in ("truncated_bp", "rlr"):
                if (est, seed) in have:
                    continue
                runs.append(train_curve(est, "prompt_alignment", seed, steps, every, 8, 4, T, Path(tmp)))
                runs[-1].pop("run_name")
                if save is not None:
                    save({"settings": cfg, "runs": runs})
    return {"settings": cfg, "runs": runs}
