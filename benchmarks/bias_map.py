"""The truncation-bias map: how far truncated backprop's mean gradient is from full backprop's.

For each reward, chain length T and LoRA state (the base LoRA, or after 100 updates of truncated
backprop on that reward), over n batches with common random numbers:

* the per-step shares g_k of the full-backprop gradient (rlr_backend/estimators/per_step.py): full
  backprop is their sum, truncated backprop through the last K steps the sum of the last K;
* RLR's gradient (the trainer's default recipe and the paper's fo_steps=1) on the same batches.

Reported: the cosine and the norm ratio of each estimator's mean gradient to full backprop's mean
gradient, with jackknife standard errors. Full backprop's mean is itself an n-batch average, so an
unbiased estimator's cosine is below 1 by noise only: RLR's row is that noise floor. Also the share of
the full gradient that each step carries (projected on the full gradient's direction), which shows
where along the chain a reward's gradient lives.

    python -m benchmarks.run --only bias [--suite full]   # benchmarks/results/bias-<budget>.json, resumable

A cell that looks off can be measured again, independently (another training seed and other noise), with more
batches; the page lists these rechecks under the tables:

    python -m benchmarks.bias_map --recheck prompt_alignment trained --batches 64 --seed 1
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from rlr_backend.estimators import BaselineState, RLRConfig, rlr_estimate
from rlr_backend.safe_io import save_json
from rlr_backend.estimators.per_step import (cosine_with_se, flat, norm_ratio_with_se, per_step_gradients,
                                             projection_with_se)

RESULTS = Path(__file__).parent / "results"
REWARDS = ("brightness", "prompt_alignment", "jpeg_compressibility", "position:left", "size:0.4")
RLR_VARIANTS = {"rlr (fo_steps=4, h=2)": dict(fo_steps=4, h=2), "rlr paper (fo_steps=1, h=2)": dict(fo_steps=1, h=2)}


def cells(quick: bool) -> list[dict]:
    """What the suite measures: every reward at T=20 on the base LoRA, the trained LoRA, and T=10/50."""
    if quick:
        return [dict(reward=r, T=8, state="base") for r in ("brightness", "position:left")]
    out = [dict(reward=r, T=20, state="base") for r in REWARDS]
    out += [dict(reward="brightness", T=20, state="trained")]
    out += [dict(reward=r, T=t, state="base") for t in (50, 10) for r in ("brightness", "position:left")]
    out += [dict(reward=r, T=20, state="trained") for r in REWARDS[1:] if r != "jpeg_compressibility"]
    return out


def _key(cell: dict) -> str:
    return f"{cell['reward']}|T={cell['T']}|{cell['state']}"


def measure(cell: dict, *, batches: int, batch: int, train_updates: int, seed: int = 0) -> dict:
    """One cell of the map on the embedded default model (1 torch thread is the caller's choice)."""
    from rlr_backend.train import TrainConfig, Trainer

    from rlr_backend.rewards import make_reward

    t0 = time.perf_counter()
    if not make_reward(cell["reward"]).differentiable:
        return {**cell, "differentiable": False, "seconds": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(reward=cell["reward"], num_inference_steps=cell["T"], batch_size=batch, seed=seed,
                          eval_every=0, output_dir=Path(tmp), run_name="bias", lr=1e-3,
                          fo_steps=min(4, cell["T"] - 2), images_per_prompt=min(4, batch))
        trainer = Trainer(cfg, progress=False)
        if cell["state"] == "trained":  # 100 updates of truncated backprop (the competitor) on this reward
            tuned = Trainer(replace(cfg, estimator="truncated_bp", steps=train_updates, run_name="train"),
                            progress=False)
            tuned.run()
            with torch.no_grad():
                for p, q in zip(trainer.params, tuned.params):
                    p.copy_(q)
        g = torch.Generator().manual_seed(seed + 1000)
        shares, rlr = [], {name: [] for name in RLR_VARIANTS}
        for _ in range(batches):
            groups = batch // cfg.images_per_prompt
            ids = torch.randint(0, len(cfg.prompts), (groups,), generator=g).repeat_interleave(cfg.images_per_prompt)
            x_T = torch.randn((batch, *trainer.latent_shape), generator=g)
            noise_seed = int(torch.randint(0, 2**62, (1,), generator=g))
            problem = trainer.problem(ids.tolist())
            shares.append(per_step_gradients(problem, x_T, generator=torch.Generator().manual_seed(noise_seed)).shares)
            for name, knobs in RLR_VARIANTS.items():
                for p in trainer.params:
                    p.grad = None
                rlr_estimate(problem, x_T, config=RLRConfig(**knobs), baseline_state=BaselineState(),
                             generator=torch.Generator().manual_seed(noise_seed))
                rlr[name].append(-flat(p.grad if p.grad is not None else torch.zeros_like(p) for p in trainer.params))
    s = torch.stack(shares).double()  # (n, T, D)
    full = s.sum(1)
    n_steps = cell["T"]
    rows = []
    for k in sorted({1, 2, 4, n_steps // 2}):
        trunc = s[:, -k:].sum(1)
        rows.append({"estimator": f"truncated_bp K={k}", "cos": cosine_with_se(trunc, full),
                     "norm_ratio": norm_ratio_with_se(trunc, full), "along": projection_with_se(trunc, full)})
    for name, vecs in rlr.items():
        v = torch.stack(vecs).double()
        rows.append({"estimator": name, "cos": cosine_with_se(v, full), "norm_ratio": norm_ratio_with_se(v, full),
                     "along": projection_with_se(v, full)})
    mean_full = full.mean(0)
    along = (s.mean(0) @ mean_full) / float(mean_full @ mean_full)  # (T,) shares along the full direction
    return {**cell, "differentiable": True, "batches": batches, "batch": batch, "rows": rows,
            "step_share": along.tolist(), "step_norm": s.mean(0).norm(dim=1).tolist(),
            "full_norm": float(mean_full.norm()), "seconds": time.perf_counter() - t0}


def run_suite(quick: bool, *, done: list | None = None, save=None) -> dict:
    """Every cell (resumable: cells in ``done`` are kept); ``save`` gets the partial result after each cell."""
    batches, batch, updates = (6, 4, 4) if quick else (16, 8, 100)
    results = {_key(c): c for c in (done or [])}
    for cell in cells(quick):
        if _key(cell) in results:
            continue
        logging.info("bias map: %s", _key(cell))
        results[_key(cell)] = measure(cell, batches=batches, batch=batch, train_updates=updates)
        if save is not None:
            save({"cells": list(results.values())})
    return {"cells": list(results.values())}


# -- the page -----------------------------------------------------------------------------------------
def _pm(pair) -> str:
    value, se = pair
    return f"{value:.2f} ± {se:.2f}"


COLUMNS = ("K=1", "K=2", "K=4", "K=T/2", "RLR (default)", "RLR (paper)")
TABLES = (("along", "Share of full backprop's mean gradient recovered along its direction (1 = all of it; an "
                    "unbiased estimator gives 1 within its error bar, however noisy)"),
          ("cos", "Cosine to full backprop's mean gradient"),
          ("norm_ratio", "Norm of the mean gradient / full backprop's"))


def _columns(c: dict) -> list[dict]:
    """A cell's rows in COLUMNS order."""
    by = {row["estimator"]: row for row in c["rows"]}
    names = [f"truncated_bp K={k}" for k in (1, 2, 4, c["T"] // 2)] + list(RLR_VARIANTS)
    return [by[name] for name in names]


def section(r: dict, images: Path) -> list[str]:
    cells_ = r["cells"]
    lines = ["## Where truncated backprop is biased: the truncation-bias map", "",
             f"`python -m benchmarks.run --only bias` ({r.get('budget', '?')} budget, {r.get('seconds', 0) / 60:.0f} min; "
             f"load {r.get('machine', {}).get('load_at_start', float('nan')):.1f} at start). Embedded default model; "
             "each cell averages per-batch gradients over common random numbers; ± is a jackknife standard error. "
             "Full backprop's mean is itself a finite average, so an unbiased but noisy estimator such as RLR gets a "
             "cosine below 1 from noise alone; the first table is the calibrated one.", ""]
    for key, title in TABLES:
        lines += [f"**{title}**", "", "| reward | T | LoRA | " + " | ".join(COLUMNS) + " |",
                  "|---|---|---|" + "---|" * len(COLUMNS)]
        for c in cells_:
            head = f"| `{c['reward']}` | {c['T']} | {c['state']} |"
            if not c["differentiable"]:
                lines.append(head + " n/a: not differentiable; only likelihood-ratio estimators apply |" + " |" * 5)
            elif key in c["rows"][0]:
                lines.append(head + " " + " | ".join(_pm(row[key]) for row in _columns(c)) + " |")
        lines.append("")
    lines += _with_t(cells_)
    lines += _rechecks(RESULTS / RECHECKS, cells_)
    fig_path = _plot(cells_, images)
    if fig_path is not None:
        lines += [f"![share of the full-backprop gradient per step]({fig_path})", ""]
    return lines


def _with_t(cells_: list[dict]) -> list[str]:
    """One line per reward measured at several T (base LoRA): truncated K=2's recovered share at each T."""
    out = []
    for reward in dict.fromkeys(c["reward"] for c in cells_):
        by_t = sorted((c["T"], row["along"]) for c in cells_ if c["reward"] == reward and c["state"] == "base"
                      and c["differentiable"] for row in c["rows"] if row["estimator"] == "truncated_bp K=2")
        if len(by_t) > 1:
            out.append(f"- `{reward}`: truncated backprop K=2 recovers " + ", ".join(
                f"{_pm(a)} at T={t}" for t, a in by_t) + " of full backprop's mean gradient.")
    return ["**With the chain length T** (base LoRA):", "", *out, ""] if out else []


def _plot(cells_: list[dict], images: Path) -> str | None:
    base = [c for c in cells_ if c["differentiable"] and c["state"] == "base" and c["T"] == max(
        x["T"] for x in cells_ if x["differentiable"] and x["state"] == "base")]
    if not base:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.6), dpi=100)
    for c in base:
        share = c["step_share"]
        steps_from_end = list(range(len(share), 0, -1))  # paper order: 1 = last step
        ax.plot(steps_from_end, share, "o-", ms=3, label=c["reward"])
    ax.axhline(0, color="0.6", lw=0.8)
    ax.set_xlabel("step, counted from the end (1 = last denoising step)")
    ax.set_ylabel("share of the full gradient")
    ax.set_title(f"Where the reward gradient lives (T={base[0]['T']}, base LoRA)")
    ax.invert_xaxis()
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    images.mkdir(parents=True, exist_ok=True)
    fig.savefig(images / "bench_bias_map.png")
    plt.close(fig)
    return "images/bench_bias_map.png"


# -- rechecks of single cells -------------------------------------------------------------------------------
RECHECKS = "bias-rechecks.json"


def _rechecks(path: Path, cells_: list[dict] = ()) -> list[str]:
    """One line per recheck: RLR's recovered share (and truncated K=2's) with its error, batches and seed, next to
    the map's own cell; when the error bar did not shrink as 1/sqrt(batches), the smaller run's was too small."""
    if not path.is_file():
        return []
    out = []
    rlr = next(iter(RLR_VARIANTS))
    for c in json.loads(path.read_text())["cells"]:
        by = {row["estimator"]: row for row in c["rows"]}
        line = (f"- `{c['reward']}`, T={c['T']}, {c['state']} LoRA, {c['batches']} batches of {c['batch']}, seed "
                f"{c['seed']}: RLR (default) {_pm(by[rlr]['along'])}, RLR (paper) {_pm(by[list(RLR_VARIANTS)[1]]['along'])}, "
                f"truncated K=2 {_pm(by['truncated_bp K=2']['along'])} ({c['seconds'] / 60:.0f} min).")
        first = next((m for m in cells_ if _key(m) == _key(c) and m.get("differentiable")), None)
        if first is not None:
            (v0, se0), (v1, se1) = {r["estimator"]: r for r in first["rows"]}[rlr]["along"], by[rlr]["along"]
            expected = se0 * (first["batches"] / c["batches"]) ** 0.5
            line += (f" The map's cell ({first['batches']} batches): RLR {_pm((v0, se0))}, {abs(v0 - 1) / se0:.1f} "
                     f"errors from 1; here {abs(v1 - 1) / se1:.1f}.")
            if se1 > 1.5 * expected:
                line += (f" The error bar is {se1:.2f} where 1/sqrt(batches) from the map's predicts {expected:.2f} "
                         "(at another trained LoRA, so roughly): the map's jackknife error was most likely too small "
                         "for these heavy-tailed gradients, and its distance from 1 is not evidence of a bias.")
        out.append(line)
    return ["**Rechecks** (one cell again, independently: another training seed and other noise, more batches; "
            "`python -m benchmarks.bias_map --recheck REWARD STATE`), share recovered along full backprop's "
            "mean gradient:", "", *out, ""]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recheck", nargs=2, metavar=("REWARD", "STATE"), required=True,
                    help="the cell: a reward of the map and base or trained")
    ap.add_argument("--T", type=int, default=20)
    ap.add_argument("--batches", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / RECHECKS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    reward, state = args.recheck
    if state not in ("base", "trained"):
        ap.error(f"STATE must be base or trained, got {state!r}")
    cell = measure(dict(reward=reward, T=args.T, state=state), batches=args.batches, batch=args.batch,
                   train_updates=100, seed=args.seed)
    done = json.loads(args.out.read_text())["cells"] if args.out.is_file() else []
    save_json({"cells": [*done, {**cell, "seed": args.seed, "load_at_end": os.getloadavg()[0]}]}, args.out)
    print("\n".join(_rechecks(args.out)))


if __name__ == "__main__":
    main()
