"""docs/benchmarks.md: what training gets out of each estimator: gradient quality against the truth, reward
per sample (efficiency) and the collapse runs."""

from __future__ import annotations

import statistics
from pathlib import Path

from ..efficiency import final_runs, run_lr, summarize, sweep_rows
from .common import _about, _dims, _fmt, _plt, _save


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
                 "(benchmarks/hotelling.py): uniform on [0, 1] when unbiased, small when biased; full_bp's own row "
                 "is the test's null case." if hotelling else
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


