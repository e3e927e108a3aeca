"""Render docs/benchmarks.md and its plots from the JSON results of benchmarks.run."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from rlr_backend.safe_io import atomic_path

from . import bias_map, long_run
from .efficiency import final_runs, run_lr, summarize, sweep_rows

HEADLINE_T = 20


def _load(results: Path, suite: str) -> dict | None:
    """The full result of a suite if there is one, else the quick one; efficiency files split by
    reward (``efficiency-full-<reward>.json``) are merged."""
    for budget in ("full", "quick"):
        p = results / f"{suite}-{budget}.json"
        parts = sorted(results.glob(f"{suite}-{budget}-*.json"))
        if p.is_file() and not (suite == "longrun" and parts):
            return json.loads(p.read_text())
        if p.is_file():
            parts = [p, *parts]  # the long-run suite may be split by variant across processes
        if parts:
            loaded = [json.loads(q.read_text()) for q in parts]
            merged = dict(loaded[0])
            merged["runs"] = [run for r in loaded for run in r["runs"]]
            merged["seconds"] = sum(r["seconds"] for r in loaded)
            merged["command"] = "; ".join(r["command"] for r in loaded)
            return merged
    return None


def _about(r: dict) -> str:
    m = r["machine"]
    return (f"*{r['budget']} run, {r['started']}, {r['seconds'] / 60:.1f} min; {m['cpu']}, {m['cores']} cores, "
            f"{m['threads']} torch thread(s), load {m['load_at_start']:.2f} -> {r.get('load_at_end', float('nan')):.2f}; "
            f"torch {m['torch']}, diffusers {m['diffusers']}, commit {m['commit']}. Command: `{r['command']}`.*")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    _plt().close(fig)


def _fmt(x, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def _dims(rows: list[dict]) -> str:
    """The dimension(s) of the T^2 tests in the rows (one value, or a range)."""
    dims = sorted({x["t2_dims"] for x in rows if x.get("t2_dims") is not None})
    return "-".join(str(d) for d in (dims[:1] + dims[-1:] if len(dims) > 1 else dims)) or "?"


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


def quality_section(r: dict, images: Path) -> list[str]:
    ac, un = r["analytic_chain"], r["unet"]
    lines = ["## Gradient quality: bias, variance, variance x cost", "", _about(r), "",
             f"**Analytic chain** (exact gradient known; {ac['calls']} updates x batch {ac['batch']}; exact gradient "
             f"norm {ac['exact_gradient_norm']:.3f}; z = largest |mean - exact| / standard error, below 4 when "
             "unbiased; T^2 p = Hotelling's T^2 p-value of mean = exact, small when biased; cost in "
             "forward-equivalents).", "",
             "| estimator | meant unbiased | max z | T^2 p | trace Var | cost | Var x cost |",
             "|---|---|---|---|---|---|---|"]
    for x in ac["rows"]:
        lines.append(f"| {x['estimator']} | {'yes' if x['meant_unbiased'] else 'no'} | {x['max_z']:.1f} | "
                     f"{_fmt(x.get('t2_p_value'), '.2g')} | {x['trace_var']:.3g} | {x['cost']:.3g} | "
                     f"{x['var_x_cost']:.3g} |")
    hotelling = all("t2_p_value" in x for x in un["rows"])
    bias_text = ("T^2 p is the p-value of Hotelling's two-sample T^2 test of mean = truth against the full-backprop "
                 f"estimates, on a fixed random {_dims(un['rows'])}-dimensional subspace of the LoRA parameters "
                 "(benchmarks/hotelling.py): uniform on [0, 1] when unbiased, small when biased." if hotelling else
                 "Mean z^2 is the squared bias over its variance averaged over the LoRA parameters: about 1 when "
                 "unbiased. These results predate the switch to Hotelling's T^2: mean z^2 is not calibrated for "
                 "correlated parameters (no threshold on it has a known false-alarm rate); re-run the suite for T^2. "
                 "They also predate code_compat's corrected call counts (its cost above counts the PPO draws it "
                 "drops, about 1.4 forward-equivalents too many at T=8).")
    lines += ["", f"**Embedded default model's UNet + LoRA** (T={un['T']}, batch {un['batch']}, {un['seeds']} seeds per "
              f"estimator; truth = {un['truth']}; brightness reward through the VAE decoder). {bias_text}", "",
              f"| estimator | trace Var | s / update | Var x seconds | relative to ddpo | "
              f"{'T^2 p' if hotelling else 'mean z^2'} | cos(mean, truth) |",
              "|---|---|---|---|---|---|---|"]
    ddpo = next((x for x in un["rows"] if x["estimator"].startswith("ddpo")), None)
    for x in un["rows"]:
        rel = x["var_x_seconds"] / ddpo["var_x_seconds"] if ddpo else None
        bias = _fmt(x["t2_p_value"], ".2g") if hotelling else _fmt(x["mean_sq_z"], ".2f")
        lines.append(f"| {x['estimator']} | {x['trace_var']:.3g} | {x['seconds']:.2f} | {x['var_x_seconds']:.3g} | "
                     f"{_fmt(rel, '.3g')} | {bias} | {_fmt(x['cos_to_truth'], '.2f')} |")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    names = [x["estimator"] for x in un["rows"]]
    ax.barh(names, [x["var_x_seconds"] for x in un["rows"]], color="tab:blue")
    ax.set_xscale("log")
    ax.set_xlabel("trace Var x seconds per update (lower is better)")
    ax.invert_yaxis()
    fig.tight_layout()
    _save(fig, images / "bench_variance_cost.png")
    lines += ["", "![variance x cost on the UNet](images/bench_variance_cost.png)", ""]
    return lines


def efficiency_section(r: dict, images: Path) -> list[str]:
    s = r["settings"]
    lines = ["## Sample efficiency on the embedded default model", "", _about(r), "",
             f"{s['updates']} updates x batch {s['batch']} ({s['images_per_prompt']} images per prompt), T={s['T']}, "
             f"seeds {s['seeds']}, evaluation every {s['eval_every']} updates on fixed seeds. Level = 90% of the way "
             "from the start to the best mean final reward of any estimator, read off the seed-averaged curve (the "
             "seeds that reach it on their own in brackets); samples = generated images. Each "
             "estimator at its learning rate (lr; swept ones below). The right-hand plots put the same curves against "
             "training seconds: wall-clock time under whatever load the machine had during each run (a resumed suite "
             "mixes runs from different times), so read them loosely.", "",
             "| reward | estimator | lr | final eval reward, mean (min, max) | samples to level | vs ddpo | "
             "samples to ddpo's final reward | diversity at the end | wall time (s) |", "|---|---|---|---|---|---|---|---|---|"]
    summary = summarize(r)
    for x in summary:
        ddpo = next((y for y in summary if y["reward"] == x["reward"] and y["estimator"] == "ddpo"), None)
        ratio = (x["samples_to_level"] / ddpo["samples_to_level"]
                 if ddpo and ddpo["samples_to_level"] and x["samples_to_level"] else None)
        reach = (f"{x['samples_to_level']:.0f}" if x["samples_to_level"] is not None else "not reached") + \
            f" ({x['seeds_reaching_level']}/{x['seeds']} seeds)"
        if ddpo is None:
            to_ddpo = "-"
        elif not x["ddpo_improved"]:
            to_ddpo = "- (ddpo ended below the start)"
        elif x["samples_to_ddpo_final"] is None:
            to_ddpo = "not reached"
        else:
            to_ddpo = f"{x['samples_to_ddpo_final']:.0f} ({x['samples_to_ddpo_final'] / x['budget_samples']:.2f} of ddpo's)"
        lines.append(f"| {x['reward']} | {x['estimator']} | {x['lr']:g} | {x['final_mean']:.4f} ({x['final_min']:.4f}, "
                     f"{x['final_max']:.4f}) | {reach} | {_fmt(ratio, '.2f')} | {to_ddpo} | "
                     f"{x['final_diversity']:.3f} | {x['wall_seconds']:.0f} |")
    sweep = sweep_rows(r)
    if sweep:
        lines += ["", "Learning-rate sweep (seed 0; the kept rate trains the other seeds):", "",
                  "| reward | estimator | lr | eval reward start -> end | kept |", "|---|---|---|---|---|"]
        lines += [f"| {x['reward']} | {x['estimator']} | {x['lr']:g} | {x['start']:.4f} -> {x['final']:.4f} | "
                  f"{'yes' if x['chosen'] else ''} |" for x in sweep]
    plt = _plt()
    for reward in sorted({x["reward"] for x in r["runs"]}):
        fig, (ax, ax_t) = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
        for est, runs in sorted(final_runs(r, reward).items()):
            samples = [p["samples"] for p in runs[0]["points"]]
            vals = [[run["points"][i]["eval_reward"] for run in runs] for i in range(len(samples))]
            mean = [statistics.mean(v) for v in vals]
            line, = ax.plot(samples, mean, label=f"{est} (lr {run_lr(runs[0]):g})")
            ax.fill_between(samples, [min(v) for v in vals], [max(v) for v in vals], color=line.get_color(), alpha=0.15)
            seconds = [statistics.mean(run["points"][i].get("train_seconds", float("nan")) for run in runs)
                       for i in range(len(samples))]
            ax_t.plot(seconds, mean, color=line.get_color())
        ax.set_xlabel("generated samples")
        ax_t.set_xlabel("training seconds (1 thread, mean over seeds)")
        ax.set_ylabel(f"eval {reward}")
        for a in (ax, ax_t):
            a.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        _save(fig, images / f"bench_efficiency_{reward}.png")
        lines += ["", f"![eval {reward} against samples and against training time](images/bench_efficiency_{reward}.png)"]
    return lines + [""]


def collapse_section(r: dict, images: Path) -> list[str]:
    s = r["settings"]
    seeds = s.get("seeds", [0])
    lines = ["## A longer run: does the reward collapse?", "", _about(r), "",
             f"Prompt alignment, {s['updates']} updates x batch {s['batch']}, T={s['T']}, seeds {seeds}. The paper "
             "reports that truncated backprop's reward falls after rising on long runs; diversity = mean pairwise RMS "
             "distance between the evaluation images of one prompt.", "",
             "| estimator | seed | eval reward at start | peak (update) | at the end | diversity start -> end |",
             "|---|---|---|---|---|---|"]
    runs = sorted(r["runs"], key=lambda x: (x["estimator"] != "truncated_bp", x["seed"]))
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    colors, styles = {}, ("-", "--", ":", "-.")
    for run in runs:
        pts = run["points"]
        peak = max(pts, key=lambda p: p["eval_reward"])
        lines.append(f"| {run['estimator']} | {run['seed']} | {pts[0]['eval_reward']:.4f} | {peak['eval_reward']:.4f} "
                     f"({peak['step']}) | {pts[-1]['eval_reward']:.4f} | {pts[0].get('diversity', float('nan')):.3f} -> "
                     f"{pts[-1].get('diversity', float('nan')):.3f} |")
        first = run["estimator"] not in colors
        color = colors.setdefault(run["estimator"], f"C{len(colors)}")
        style = styles[seeds.index(run["seed"]) % len(styles)] if run["seed"] in seeds else "-"
        label = run["estimator"] if first else None
        a1.plot([p["step"] for p in pts], [p["eval_reward"] for p in pts], style, color=color, marker="o", ms=3,
                label=label)
        a2.plot([p["step"] for p in pts], [p.get("diversity", float("nan")) for p in pts], style, color=color,
                marker="o", ms=3, label=label)
    a1.set_ylabel("eval prompt alignment")
    a2.set_ylabel("diversity")
    for ax in (a1, a2):
        ax.set_xlabel("update (one line per seed)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, images / "bench_collapse.png")
    lines += ["", f"What the runs show ({len(seeds)} seed{'s' if len(seeds) > 1 else ''}; computed from the table):", ""]
    for run in runs:
        pts = run["points"]
        peak = max(pts, key=lambda p: p["eval_reward"])
        drop = peak["eval_reward"] - pts[-1]["eval_reward"]
        d0, d1 = pts[0].get("diversity", float("nan")), pts[-1].get("diversity", float("nan"))
        trend = (f"fell {drop:.4f} from its peak at update {peak['step']} ({drop / max(peak['eval_reward'] - pts[0]['eval_reward'], 1e-12):.0%} "
                 "of its gain)" if drop > 0 else "was still at its peak at the end")
        lines.append(f"- {run['estimator']}, seed {run['seed']}: the eval reward {trend}; diversity changed by "
                     f"{(d1 / d0 - 1):+.0%}.")
    return lines + ["", "![eval reward and diversity on a long run](images/bench_collapse.png)", ""]


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


def headline_section(results: Path) -> list[str]:
    """The project's three targets against what the newest results show (read off the sections below)."""
    lines = ["## Targets and what we measured", "",
             "| target | measured | met |", "|---|---|---|"]
    cost = _load(results, "cost")
    if cost:
        for model in sorted({x["model"] for x in cost["rows"]}):
            at = [x for x in cost["rows"] if x["model"] == model and x["T"] == 50]
            by = {x["estimator"]: x for x in at}
            if "rlr latent_lr h=2" not in by:
                continue
            full = by.get("full_bp")
            for name in ("rlr latent_lr h=2", "rlr latent_lr h=2 + checkpointing", "rlr param_1pt h=2",
                         "rlr param_1pt h=2 + checkpointing"):
                if name in by:
                    x = by[name]
                    fast, small = x["time_ratio"] <= 1.3, x["memory_ratio"] <= 1.3
                    met = {(True, True): "yes", (True, False): "time only", (False, True): "memory only"}.get(
                        (fast, small), "no")
                    lines.append(f"| RLR h=2, T=50: time and memory <= 1.3x a no-grad sample ({model}, batch "
                                 f"{x['batch']}, {name}) | time {x['time_ratio']:.2f}x, memory {x['memory_ratio']:.2f}x"
                                 + (f" (full backprop: memory {full['memory_ratio']:.1f}x)" if full else "")
                                 + f" | {met} |")
    quality = _load(results, "quality")
    if quality:
        rows = quality["unet"]["rows"]
        ddpo = next((x for x in rows if x["estimator"].startswith("ddpo")), None)
        rlr = [x for x in rows if x["estimator"].startswith("rlr")]
        if ddpo and rlr:
            best = min(rlr, key=lambda x: x["var_x_seconds"])
            gain = ddpo["var_x_seconds"] / best["var_x_seconds"]
            ac = quality["analytic_chain"]["rows"]
            a_ddpo = next(x for x in ac if x["estimator"].startswith("ddpo"))
            a_best = min((x for x in ac if x["estimator"].startswith("rlr")), key=lambda x: x["var_x_cost"])
            paper = next((x for x in rlr if x["estimator"] == "rlr latent_lr h=2"), None)
            paper_gain = ""
            if paper:
                ratio = ddpo["var_x_seconds"] / paper["var_x_seconds"]
                paper_gain = ("; the paper's single first-order step (rlr latent_lr h=2): "
                              + (f"{ratio:.2f}x lower" if ratio >= 1 else f"{1 / ratio:.2f}x higher"))
            lines.append(f"| RLR (best mode) variance x cost >= 3x lower than DDPO's (tiny UNet; analytic chain "
                         f"beside) | {gain:.3g}x lower with {best['estimator']}{paper_gain} (analytic chain: "
                         f"{a_ddpo['var_x_cost'] / a_best['var_x_cost']:.2f}x lower with {a_best['estimator']}) | "
                         f"{'yes' if gain >= 3 else 'no'} |")
    eff = _load(results, "efficiency")
    if eff:
        summary = summarize(eff)
        for x in summary:
            if x["estimator"] != "rlr" or x["reward"] != "prompt_alignment":
                continue
            ddpo = next((y for y in summary if y["reward"] == x["reward"] and y["estimator"] == "ddpo"), None)
            if ddpo is None:
                continue
            if not x["ddpo_improved"]:
                got, met = f"DDPO ended below its start ({ddpo['final_mean']:.4f} < {x['start']:.4f}): nothing to reach", "-"
            elif x["samples_to_ddpo_final"] is None:
                got, met = f"RLR did not reach DDPO's final {ddpo['final_mean']:.4f} within {x['budget_samples']} samples", "no"
            else:
                frac = x["samples_to_ddpo_final"] / x["budget_samples"]
                got = (f"RLR reached DDPO's final {ddpo['final_mean']:.4f} (lr {ddpo['lr']:g}) after "
                       f"{x['samples_to_ddpo_final']:.0f} of {x['budget_samples']} samples ({frac:.2f})")
                met = "yes" if frac <= 0.2 else "no"
            lines.append(f"| RLR reaches DDPO's final eval reward with <= 1/5 of its samples (prompt alignment) | {got} | {met} |")
    return lines + [""] if len(lines) > 4 else []


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
    from .memory_model import with_margin

    m = r["machine"]
    lines = [f"## Where each estimator runs out of memory on a {CARD_GB} GB card (SD sizes, predicted)", "",
             f"*{r['budget']} run, {r['started']}; {m['cpu']}, {m['cores']} cores, torch {m['torch']}, commit "
             f"{m['commit']}. Command: `{r['command']}`; details, fits and validation in [memory.md](memory.md).*", "",
             "The models above are too small to run out of memory. The memory model fitted to CPU measurements of the "
             "real SD1.5 and SDXL UNets, the SD VAE and a CLIP ViT-L/14 aesthetic reward predicts the peak of one "
             "update at T=50, h=2, LoRA rank 4, fp16. Each cell is the predicted peak plus a 15% + 0.5 GB margin, in GB; "
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
                gb = with_margin(hit[0]["bytes"]) / GB if hit else None
                cells.append("-" if gb is None else (f"**{gb:.1f}**" if gb <= CARD_GB else f"{gb:.1f}"))
            if set(cells) == {"-"}:
                continue
            name = {"rlr": "rlr h=2" + (f" fo_steps={fo}" if fo > 1 else ""), "ddpo": "ddpo",
                    "full_bp": "full_bp (T=50 steps)"}[est]
            lines.append(f"| {ARCH_NAMES.get(arch, arch)} {px} px | {batch} | {name} | " + " | ".join(cells) + " |")
    return lines + ["", "With checkpointing every estimator's peak is about one checkpointed step plus the decode and "
                    "reward backward, so they all fit; what differs is the time (full backprop then recomputes every "
                    "step: `full_bp + checkpointing` in the cost tables above).", ""]


def render(results: Path, out: Path) -> None:
    images = out.parent / "images"
    lines = ["# Benchmarks", "", "Every figure on this page comes from `python -m benchmarks.run` "
             "(`--suite quick` in minutes, `--suite full` in about six hours on 2 CPU cores); the JSON behind it is in "
             "`benchmarks/results/`. Ratios are measured in one run, so load on a shared machine cancels out.", ""]
    lines += headline_section(results)
    sections = {"cost": cost_section, "quality": quality_section, "efficiency": efficiency_section,
                "collapse": collapse_section, "scaling": scaling_section, "bias": bias_map.section,
                "longrun": long_run.section}
    for suite, fn in sections.items():
        r = _load(results, suite)
        lines += fn(r, images) if r else [f"## {suite}", "", f"(no results yet: `python -m benchmarks.run --only {suite}`)", ""]
    mem = _load_memory_model(results)
    lines += memory_model_section(mem, images) if mem else [
        "## memory", "", "(no results yet: `python -m benchmarks.run --only memory`)", ""]
    guard = results / "guard-cost.json"
    if guard.is_file():
        from .guard_cost import render as guard_cost_lines

        lines += ["## What the structure rewards and the KL guard cost", "",
                  *guard_cost_lines(json.loads(guard.read_text())), ""]
    from .gpu_check.report import benchmarks_doc_section

    lines += benchmarks_doc_section(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")
