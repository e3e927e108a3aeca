"""The page's figures: measured bytes against the fitted curves, and the predicted peaks as stacked bars."""

from __future__ import annotations

import math
from pathlib import Path

from ..sd_archs import ARCHS
from .fit import Fit
from .model import OPTION_SETS, with_margin
from .store import GB


def plot(data: dict, analysis: dict, out_dir: Path) -> list[Path]:
    """Log-log plots of measured bytes against n x latent pixels with each family's fitted curve."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    rows = data.get("points", [])
    fits = {tuple(k.split("/")): Fit(**v) for k, v in analysis["fits"].items()}
    paths = []
    fig = Figure(figsize=(11, 4.5))
    axes = fig.subplots(1, 2)
    colours = iter(["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C7", "C8"])
    for comp, arch, var in sorted({(r["component"], r["arch"], r["variant"]) for r in rows}):
        if comp == "reward":
            continue
        c = next(colours)
        mine = [r for r in rows if (r["component"], r["arch"], r["variant"]) == (comp, arch, var)]
        for ax, q in zip(axes, ("peak", "retained")):
            xs = [r["n"] * r["pixels"] for r in mine]
            ax.scatter(xs, [r[q] / GB for r in mine], color=c, s=18, label=f"{comp} {arch} {var}")
            f = fits.get((comp, arch, var, q))
            if f is None:
                continue
            target = 2 * 128 * 128 if arch == "sdxl" else 2 * 64 * 64 if comp == "unet" else 128 * 128
            grid = [2 ** (i / 4) for i in range(int(4 * math.log2(min(xs))), int(4 * math.log2(target)) + 1)]
            n0 = 1 if comp == "vae" else 2
            ax.plot(grid, [f(n0, g / n0) / GB for g in grid], color=c, lw=1, ls="--")
    for ax, q in zip(axes, ("peak of forward + backward", "retained after forward")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("n x latent pixels (n = batch of the call)")
        ax.set_ylabel("GB (bf16, CPU)")
        ax.set_title(q)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Measured activation bytes (dots) and the fitted model (dashed, extrapolated to SD1.5 512 px / "
                 "SDXL 1024 px)", fontsize=9)
    fig.tight_layout()
    path = out_dir / "memory_fit.png"
    fig.savefig(path, dpi=110)
    paths.append(path)

    preds = [p for p in analysis["predictions"] if p["estimator"] == "rlr" and p["scenario"]["fo_steps"] == 1
             and not p["options"]["adam_8bit"] and not p["options"].get("reward_fp32")]
    if preds:
        fig = Figure(figsize=(9, 4))
        ax = fig.subplots()
        short = {OPTION_SETS[0].label: "none", OPTION_SETS[1].label: "ckpt", OPTION_SETS[2].label: "ckpt +\noffload"}
        labels = [f"{ARCHS[p['scenario']['arch']]['label']} B={p['scenario']['batch']}\n"
                  f"{short.get(p['options']['label'], p['options']['label'])}" for p in preds]
        parts = [("weights + optimizer", [sum(p["persistent"].values()) / GB for p in preds]),
                 ("activations", [(p["activations"] + p["chain_store"]) / GB for p in preds]),
                 ("margin", [(with_margin(p["bytes"]) - p["bytes"]) / GB for p in preds])]
        bottom = [0.0] * len(preds)
        for name, vals in parts:
            ax.bar(range(len(preds)), vals, bottom=bottom, label=name)
            bottom = [b + v for b, v in zip(bottom, vals)]
        top = 40.0
        ax.set_ylim(0, top)
        for i, total in enumerate(bottom):
            ax.text(i, min(total, top) - (2.5 if total > top else -0.3), f"{total:.1f}", ha="center", fontsize=6,
                    color="white" if total > top else "black")
        for y, txt in ((8, "8 GB"), (16, "16 GB"), (24, "24 GB")):
            ax.axhline(y, color="k", lw=0.7, ls=":")
            ax.text(len(preds) - 0.5, y, txt, fontsize=7, va="bottom", ha="right")
        ax.set_xticks(range(len(preds)), labels, fontsize=7)
        ax.set_ylabel("predicted GPU memory (GB)")
        ax.set_title("RLR update (T=50, h=2, FO 1 step, LoRA r=4, fp16): predicted peak (bars above 40 GB cut)\n"
                     "ckpt = gradient checkpointing, offload = text encoders on the CPU", fontsize=8)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / "memory_predictions.png"
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths
