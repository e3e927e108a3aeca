"""docs/benchmarks.md: what an update costs (time and memory against a no-grad sample), how it scales, and
where each estimator runs out of memory at SD sizes (from the memory model)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from ..memory_model import with_margin
from ..memory_model.gpu_correction import best_bytes
from .common import _about, _plt, _save


def cost_section(r: dict, images: Path) -> list[str]:
    rows = r["rows"]
    lines = ["## Cost of one update", "", _about(r), "",
             "Ratios to a no-grad sample of the same batch (plus the reward), the baseline re-timed next to each "
             "case. Predicted time ratio: the cost model in `benchmarks/cost.py` (forwards + 2 x backpropagated "
             "forwards, over T), counted by each estimator. `+ checkpointing` = the trainer's `--gradient-checkpointing`: "
             "each backpropagated step recomputed in backward, UNet blocks checkpointed, the reward's decoder run one "
             "image at a time (the cost model counts the step recomputation only).", ""]
    groups = sorted({(x["model"], x["T"], x["batch"], x["pixels"]) for x in rows})
    for model, T, batch, px in groups:
        mine = [x for x in rows if (x["model"], x["T"], x["batch"], x["pixels"]) == (model, T, batch, px)]
        lines += [f"**{model}, {px} px, T={T}, batch {batch}** (no-grad sample: {mine[0]['sample_seconds']:.2f} s, "
                  f"{mine[0]['sample_bytes'] / 1e6:.0f} MB)", "",
                  "| estimator | time / sample | predicted | memory / sample | memory (MB) | steps in memory |",
                  "|---|---|---|---|---|---|"]
        for x in mine:
            lines.append(f"| {x['estimator']} | {x['time_ratio']:.2f}x | {x['predicted_time_ratio']:.2f}x | "
                         f"{x['memory_ratio']:.2f}x | {x['bytes'] / 1e6:.0f} | {x['steps_in_memory']:.0f} |")
        lines.append("")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4))
    for model in sorted({x["model"] for x in rows}):
        mine = [x for x in rows if x["model"] == model]
        ax.scatter([x["predicted_time_ratio"] for x in mine], [x["time_ratio"] for x in mine], label=model, s=14)
    lim = max(max(x["predicted_time_ratio"], x["time_ratio"]) for x in rows) * 1.1
    ax.plot([0, lim], [0, lim], color="0.6", lw=1)
    ax.set_xlabel("predicted time / sample")
    ax.set_ylabel("measured time / sample")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, images / "bench_cost_model.png")
    lines += ["![measured against predicted time ratio](images/bench_cost_model.png)", ""]
    return lines



def scaling_section(r: dict, images: Path) -> list[str]:
    rows = r["rows"]
    lines = ["## Scaling", "", _about(r), "",
             f"Extra memory of an update over a no-grad sample, fitted on the `{r['fit_model']}` points as "
             "c x T^a x batch^b x pixels^d (log-space least squares):", "",
             "| estimator | exponents | max fit error | largest T under 24 GB (batch 1, same model and size) |",
             "|---|---|---|---|"]
    for est, f in r["fits"].items():
        ex = ", ".join(f"{k} {v:.2f}" for k, v in f["exponents"].items())
        lim = r["largest_T_under_24GB"].get(est)
        lines.append(f"| {est} | {ex} | {f['max_relative_error'] * 100:.0f}% | {lim if lim is not None else '< 10'} |")
    plt = _plt()
    axes = [k for k in ("T", "batch", "pixels") if len({x[k] for x in rows if x["model"] == r["fit_model"]}) > 1]
    fig, axs = plt.subplots(1, max(len(axes), 1), figsize=(4 * max(len(axes), 1), 3.4), squeeze=False)
    for ax, key in zip(axs[0], axes):
        centre = {k: statistics.median_low([x[k] for x in rows if x["model"] == r["fit_model"]])
                  for k in ("T", "batch", "pixels")}
        for est in r["fits"]:
            pts = sorted((x[key], x["bytes"] / 1e6) for x in rows if x["estimator"] == est and x["model"] == r["fit_model"]
                         and all(x[k] == centre[k] for k in ("T", "batch", "pixels") if k != key))
            if pts:
                ax.plot(*zip(*pts), "o-", label=est, ms=3)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel("peak memory (MB)")
        ax.grid(alpha=0.3)
    axs[0][0].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, images / "bench_scaling.png")
    lines += ["", "![memory against T, batch and resolution](images/bench_scaling.png)", "",
              "| model | px | T | batch | estimator | time / sample | memory (MB) |", "|---|---|---|---|---|---|---|"]
    for x in rows:
        lines.append(f"| {x['model']} | {x['pixels']} | {x['T']} | {x['batch']} | {x['estimator']} | "
                     f"{x['time_ratio']:.2f}x | {x['bytes'] / 1e6:.0f} |")
    return lines + [""]


GB = 1e9
CARD_GB = 24
ARCH_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL"}


def _load_memory_model(results: Path) -> dict | None:
    for name in ("memory-model.json", "memory-model-quick.json"):
        if (results / name).is_file():
            data = json.loads((results / name).read_text())
            return data if data.get("analysis") else None
    return None


def memory_model_section(r: dict, images: Path) -> list[str]:
    """Where each estimator runs out of memory on a 24 GB card at SD sizes, from the memory model."""
    m = r["machine"]
    lines = [f"## Where each estimator runs out of memory on a {CARD_GB} GB card (SD sizes, predicted)", "",
             f"*{r['budget']} run, {r['started']}; {m['cpu']}, {m['cores']} cores, torch {m['torch']}, commit "
             f"{m['commit']}. Command: `{r['command']}`; details, fits and validation in [memory.md](memory.md).*", "",
             "The models above are too small to run out of memory. The memory model fitted to CPU measurements of the "
             "real SD1.5 and SDXL UNets, the SD VAE and a CLIP ViT-L/14 aesthetic reward predicts the peak of one "
             "update at T=50, h=2, LoRA rank 4, fp16. Each cell is the predicted peak, corrected with the GPU check's "
             "measurements where it measured that model and option ([memory.md](memory.md#predictions): the CPU fits "
             "were 22-45% low on an H200), plus a 15% + 0.5 GB margin, in GB; "
             f"**bold** = fits {CARD_GB} GB. *checkpointing* = the trainer's `--gradient-checkpointing`; *+ offload* = "
             "text encoders on the CPU (the trainer's default).", "",
             "| model | batch | estimator | no options | checkpointing | checkpointing + offload |", "|---|---|---|---|---|---|"]
    preds = r["analysis"]["predictions"]
    labels = ("no options", "gradient checkpointing", "checkpointing + text-encoder offload")
    keys = sorted({(x["scenario"]["arch"], x["scenario"]["resolution"], x["scenario"]["batch"]) for x in preds})
    for arch, px, batch in keys:
        for est, fo in (("rlr", 1), ("rlr", 4), ("ddpo", 1), ("full_bp", 1)):
            cells = []
            for label in labels:
                hit = [x for x in preds if (x["scenario"]["arch"], x["scenario"]["resolution"], x["scenario"]["batch"],
                                            x["estimator"], x["scenario"]["fo_steps"], x["options"]["label"])
                       == (arch, px, batch, est, fo, label)]
                gb = with_margin(best_bytes(hit[0])) / GB if hit else None  # GPU-corrected where measured
                cells.append("-" if gb is None else (f"**{gb:.1f}**" if gb <= CARD_GB else f"{gb:.1f}"))
            if set(cells) == {"-"}:
                continue
            name = {"rlr": "rlr h=2" + (f" fo_steps={fo}" if fo > 1 else ""), "ddpo": "ddpo",
                    "full_bp": "full_bp (T=50 steps)"}[est]
            lines.append(f"| {ARCH_NAMES.get(arch, arch)} {px} px | {batch} | {name} | " + " | ".join(cells) + " |")
    return lines + ["", "With checkpointing every estimator's peak is about one checkpointed step plus the decode and "
                    "reward backward, so they all fit; what differs is the time (full backprop then recomputes every "
                    "step: `full_bp + checkpointing` in the cost tables above).", ""]

