"""Long runs on rewards that need early changes: sample efficiency, stability and what the guards keep.

Every variant trains the embedded default model for the same number of updates and images. Each is
trained at the best of a few learning rates (swept on seed 0), then on the other seeds at that rate, once
the whole sweep is done (a process given some of the rates leaves the other seeds to whoever ends the sweep).
At every evaluation two fixed seed sets are scored: set A (the trainer's own evaluation, which the
best-LoRA guard selects on) and set B (``HELDOUT_SEED``, never used for any choice), so the reported
rewards are not inflated by selection. Reported per reward and T:

* set-B reward at the end and at the LoRA the best-LoRA guard keeps (selected on set A);
* the share of the peak gain kept at the end, (final - start) / (peak - start), from set B;
* images and training CPU seconds to reach 90% of the best variant's final gain;
* sample diversity at the end against the start.

    python -m benchmarks.run --only longrun [--suite full]     # resumable: a killed run continues from its
                                                               # last evaluation (see efficiency.work_dir)
    # share the work between processes (each saves its own results file; the page merges them):
    python -m benchmarks.run --suite full --only longrun --variants "rlr + step baseline" --lrs 0.001 --seeds 0 --Ts 20 \
        --longrun-rewards position:left

``--only flowrun`` runs the same suite on the flow-matching default (``default-flow``): shorter (60 updates,
T=20), the structure rewards, RLR (with and without the step baseline) / DDPO / truncated backprop, each at
the best of two learning rates.
"""

from __future__ import annotations

import logging
import math
import statistics
from pathlib import Path

from rlr_backend.rewards import make_reward

from .efficiency import forget, train_curve, work_dir

logger = logging.getLogger(__name__)

HELDOUT_SEED = 98765
KL_WEIGHT = 1e-3
#: variant -> (estimator, TrainConfig overrides); "rlr" is the trainer's recipe (fo_steps=4, h=2) without the step
#: baseline (these rows were measured before it existed; the trainer's default has it: "rlr + step baseline")
NO_SB = {"step_baseline": False}
VARIANTS: dict[str, tuple[str, dict]] = {
    "rlr": ("rlr", NO_SB),
    "rlr paper": ("rlr", {"fo_steps": 1, **NO_SB}),
    "ddpo": ("ddpo", {}),
    "truncated_bp": ("truncated_bp", {"truncation": 2}),
    "full_bp + ckpt": ("full_bp", {"gradient_checkpointing": True}),
    "rlr + kl": ("rlr", {"kl_weight": KL_WEIGHT, **NO_SB}),
    "rlr + step baseline": ("rlr", {"step_baseline": True}),
}
#: variants trained at another variant's chosen learning rate instead of their own sweep
SHARES_LR = {"rlr + kl": "rlr"}


#: the flow-matching default's model option (``--only flowrun``)
FLOW_MODEL = "default-flow"


def settings(quick: bool, flow: bool = False) -> dict:
    if quick:
        return {"rewards": ["position:left"], "Ts": [6], "updates": 4, "eval_every": 2, "batch": 2,
                "images_per_prompt": 2, "eval_seeds": 2, "seeds": [0, 1], "lrs": [1e-3, 3e-3],
                "variants": ["rlr", "truncated_bp", "rlr + kl"], **({"model": FLOW_MODEL} if flow else {})}
    if flow:  # an RLR update costs ~4x a sample on default-flow: the structure rewards at T=20, 60 updates
        return {"rewards": ["position:left", "size:0.4"], "Ts": [20], "updates": 60, "eval_every": 10, "batch": 8,
                "images_per_prompt": 4, "eval_seeds": 2, "seeds": [0, 1, 2], "lrs": [1e-3, 3e-3],
                "variants": ["rlr", "ddpo", "truncated_bp", "rlr + step baseline"], "model": FLOW_MODEL}
    # the order runs are made in (a structure reward at both T, where truncation costs most at T=50, then the
    # late-step one): a partial suite has the most telling part first
    return {"rewards": ["position:left", "brightness", "size:0.4"], "Ts": [20, 50], "updates": 300,
            "eval_every": 25, "batch": 8, "images_per_prompt": 4, "eval_seeds": 2, "seeds": [0, 1, 2],
            "lrs": [1e-3, 3e-3, 3e-4], "variants": list(VARIANTS)}  # rates in the order they are tried


def _key(r: dict) -> tuple:
    return (r["reward"], r["T"], r["variant"], r["lr"], r["seed"])


#: the sweep scores a rate by the mean set-A reward of its seed-0 run's last this-many evaluations: one 8-image
#: evaluation is noisy enough that a run which collapsed and half-recovered at the last one can win on it
SELECT_LAST = 3


def sweep_score(run: dict) -> float:
    """A seed-0 run's score in the sweep: the mean set-A reward of its last ``SELECT_LAST`` evaluations."""
    return statistics.mean(p["eval_reward"] for p in run["points"][-SELECT_LAST:])


def sweep_runs(runs: list[dict], reward: str, T: int, variant: str) -> list[dict]:
    """The seed-0 runs of the sweep that sets ``variant``'s rate (its own, or the one it shares)."""
    source = SHARES_LR.get(variant, variant)
    return [r for r in runs if (r["reward"], r["T"], r["variant"], r["seed"]) == (reward, T, source, 0)]


def chosen_lr(runs: list[dict], reward: str, T: int, variant: str) -> float | None:
    """The rate whose seed-0 run scored best so far (``sweep_score``; None before any rate is tried)."""
    tried = {r["lr"]: sweep_score(r) for r in sweep_runs(runs, reward, T, variant)}
    return max(tried, key=tried.get) if tried else None


def run_suite(quick: bool, *, done: list | None = None, save=None, variants: list[str] | None = None,
              flow: bool = False, others: list | None = None, lrs: list[float] | None = None,
              seeds: list[int] | None = None, Ts: list[int] | None = None, rewards: list[str] | None = None) -> dict:
    """Train what is not in ``done``; ``variants`` restricts the suite to some variants, so two processes can
    share the work (their result files are merged by the page); ``others``: runs other processes saved, which
    are neither trained again nor saved here (a variant may take its rate from another's sweep there);
    ``flow``: on ``default-flow``; ``lrs``: only these rates of the sweep (two processes can sweep in
    parallel; a rate outside the grid extends it, for a choice that sat at the grid's edge); ``seeds``: only
    these seeds after the sweep, which wait until every rate of it has a seed-0 run here or in ``others`` (the
    sweep is on the first seed whatever ``seeds`` says); ``Ts``, ``rewards``: only these."""
    cfg = settings(quick, flow)
    beyond = [lr for lr in lrs or [] if lr not in cfg["lrs"]]  # rates past the grid's edge extend this sweep
    cfg["lrs"] = list(cfg["lrs"]) + beyond
    grid = list(cfg["lrs"])  # the whole sweep: seeds 1+ wait for all of it, whichever rates this process tries
    if variants:
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
        cfg["variants"] = [v for v in cfg["variants"] if v in variants]
    for key, wanted, label in (("lrs", lrs, "rates"), ("Ts", Ts, "T"), ("rewards", rewards, "rewards")):
        if wanted:  # this process's share: a subset of the suite's values
            unknown = [x for x in wanted if x not in cfg[key]]
            if unknown:
                raise ValueError(f"{label} {unknown} are not in the suite's {cfg[key]}")
            cfg[key] = [x for x in cfg[key] if x in wanted]
    runs = list(done or [])
    known = runs + list(others or [])  # for the sweep's choice of rate; only ``runs`` is saved
    have = {_key(r) for r in known}

    def ensure(reward: str, T: int, variant: str, lr: float, seed: int, tmp: Path) -> None:
        if (reward, T, variant, lr, seed) in have:
            return
        estimator, overrides = VARIANTS[variant]
        model = {"model": cfg["model"]} if "model" in cfg else {}
        run = train_curve(estimator, reward, seed, cfg["updates"], cfg["eval_every"], cfg["batch"],
                          cfg["images_per_prompt"], T, tmp, lr=lr, overrides={**overrides, **model},
                          tag=f"-{variant}" + (f"-T{T}" if T != 20 else ""),  # T=20 and T=50 runs: own folders
                          heldout_seed=HELDOUT_SEED, eval_seeds=cfg["eval_seeds"])
        name = run.pop("run_name")
        runs.append({**run, "variant": variant, "T": T})
        known.append(runs[-1])
        have.add((reward, T, variant, lr, seed))
        if save is not None:
            save({"settings": cfg, "runs": runs})
        forget(tmp, name)

    tmp = work_dir(("flowrun" if flow else "longrun") + ("-quick" if quick else ""))  # a killed run resumes from its last evaluation
    for reward in cfg["rewards"]:
        differentiable = make_reward(reward).differentiable
        for T in cfg["Ts"]:
            variants = [v for v in cfg["variants"] if differentiable or VARIANTS[v][0] not in
                        ("truncated_bp", "full_bp")]
            for lr in cfg["lrs"]:  # the sweep, on seed 0: every variant at the first rate, then the next
                for variant in variants:
                    if variant not in SHARES_LR:
                        ensure(reward, T, variant, lr, cfg["seeds"][0], tmp)
            for seed in [s for s in cfg["seeds"] if not seeds or s in seeds]:
                for variant in variants:
                    swept = {r["lr"] for r in sweep_runs(known, reward, T, variant)}
                    if not set(grid) <= swept:  # rates still to try, here or in another process: no choice yet
                        logger.info("%s %s T=%d: waiting for %s's sweep (%d of %d rates tried); skipped", reward,
                                    variant, T, SHARES_LR.get(variant, variant), len(swept & set(grid)), len(grid))
                        continue
                    lr = chosen_lr(known, reward, T, variant)
                    ensure(reward, T, variant, lr, seed, tmp)
    return {"settings": cfg, "runs": runs}


# -- summaries and the page ---------------------------------------------------------------------------------
def guard_pick(run: dict) -> dict:
    """The evaluation point of the LoRA the best-LoRA guard keeps: the trainer's ``lora_best`` after its final
    check (``guard_step``), or, for runs recorded before that check existed, the best set-A evaluation."""
    if run.get("guard_step") is not None:
        return next(p for p in run["points"] if p["step"] == run["guard_step"])
    return max(run["points"], key=lambda p: p["eval_reward"])


def _kept(run: dict) -> float:
    """Set-B reward of the LoRA the best-LoRA guard keeps."""
    return guard_pick(run)["heldout_reward"]


def summarize(result: dict) -> list[dict]:
    out = []
    runs = result["runs"]
    order = settings(False)["rewards"]  # tasks and variants in the suite's order, whatever order files merged in
    tasks = sorted(dict.fromkeys((r["reward"], r["T"]) for r in runs),
                   key=lambda k: (k[1], order.index(k[0]) if k[0] in order else len(order), k[0]))
    for reward, T in tasks:
        finals = {}
        for variant in sorted(dict.fromkeys(r["variant"] for r in runs if (r["reward"], r["T"]) == (reward, T)),
                              key=lambda v: (list(VARIANTS).index(v) if v in VARIANTS else len(VARIANTS), v)):
            lr = chosen_lr(runs, reward, T, variant)
            mine = [r for r in runs if (r["reward"], r["T"], r["variant"], r["lr"]) == (reward, T, variant, lr)]
            if mine:
                finals[variant] = mine
        if not finals:
            continue
        start = statistics.mean(r["points"][0]["heldout_reward"] for rs in finals.values() for r in rs)
        best_final = max(statistics.mean(r["points"][-1]["heldout_reward"] for r in rs) for rs in finals.values())
        level = start + 0.9 * (best_final - start)
        noise = eval_noise(runs, reward, T)
        floor = noise if noise > 0 else 0.0  # a peak within one evaluation's noise of the start: no share
        for variant, mine in finals.items():
            ends = [r["points"][-1]["heldout_reward"] for r in mine]
            peaks = [max(p["heldout_reward"] for p in r["points"]) for r in mine]
            rose = [pk - start > floor for pk in peaks]
            kept_share = [(e - start) / (pk - start) for e, pk, up in zip(ends, peaks, rose) if up] or [math.nan]
            guard_share = ([(_kept(r) - start) / (pk - start) for r, pk, up in zip(mine, peaks, rose) if up]
                           or [math.nan])
            tried = {r["lr"] for r in sweep_runs(runs, reward, T, variant)}
            reach = [next((p for p in r["points"] if p["heldout_reward"] >= level), None) for r in mine]
            out.append({
                "reward": reward, "T": T, "variant": variant, "lr": mine[0]["lr"], "seeds": len(mine), "start": start,
                "final_mean": statistics.mean(ends), "final_min": min(ends), "final_max": max(ends),
                "kept_mean": statistics.mean(_kept(r) for r in mine), "peak_mean": statistics.mean(peaks),
                "share_kept_min": min(kept_share), "share_kept_mean": statistics.mean(kept_share),
                "guard_share_min": min(guard_share), "guard_share_mean": statistics.mean(guard_share),
                "seeds_rose": sum(rose),
                "rates_tried": len(tried),
                "images_to_level": [p["samples"] if p else None for p in reach],
                "cpu_to_level": [p["train_cpu_seconds"] if p else None for p in reach],
                "cpu_per_run": statistics.mean(r["points"][-1]["train_cpu_seconds"] for r in mine),
                "diversity_change": statistics.mean(r["points"][-1]["diversity"] / r["points"][0]["diversity"] - 1
                                                    for r in mine),
                "updates": mine[0]["points"][-1]["step"],
            })
    return out


def eval_noise(runs: list[dict], reward: str, T: int) -> float:
    """The standard deviation of one evaluation's reward (one seed set of ``eval_seeds`` x 4 images), from the
    difference between set A and set B at the same update: the two are independent draws of the same LoRA's
    reward, so var(A - B) = 2 sigma^2 once each run's mean difference (the two seed sets' fixed offset) is
    removed. NaN with fewer than 2 evaluations after the start."""
    diffs = []
    for r in runs:
        if (r["reward"], r["T"]) != (reward, T):
            continue
        d = [p["eval_reward"] - p["heldout_reward"] for p in r["points"][1:]]
        if len(d) >= 2:
            m = statistics.mean(d)
            diffs += [x - m for x in d]
    return math.sqrt(statistics.fmean(x * x for x in diffs) / 2) if len(diffs) >= 2 else math.nan


def _noise_line(r: dict, rows: list[dict], flow: bool = False) -> str:
    """One line: each (reward, T)'s evaluation noise against the largest mean peak gain there."""
    parts = []
    for reward, T in dict.fromkeys((x["reward"], x["T"]) for x in rows):
        gain = max(x["peak_mean"] - x["start"] for x in rows if (x["reward"], x["T"]) == (reward, T))
        sigma = eval_noise(r["runs"], reward, T)
        parts.append(f"`{reward}` T={T} {sigma:.4f} ({sigma / gain:.0%})" if gain > 0 else f"`{reward}` T={T} {sigma:.4f}")
    return ("The noise of one evaluation (8 images; the standard deviation from set A - set B at the same update, "
            "each run's mean difference removed), and in brackets its share of the largest mean peak gain: "
            + ", ".join(parts) + ". Where it is a sizeable share of the gain, the peak of the set-B curve is a "
            "maximum of noisy points and sits above the true peak, so the shares of the peak kept read low"
            + ("." if flow else ": the guard suite below measures them on 128 images."))


def _share(x: dict, what: str = "share_kept") -> str:
    """Mean (min) share of the peak gain kept (at the end, or by the guard's LoRA: ``what="guard_share"``) over
    the seeds whose peak rose more than one evaluation's noise above the start: for the others the share is a
    ratio of noise (a peak 0.001 above the start turns a fall of 0.1 into "-100 times the peak gain")."""
    if not x["seeds_rose"]:
        return "no seed rose above noise"
    text = f"{x[f'{what}_mean']:.2f} ({x[f'{what}_min']:.2f})"
    return text if x["seeds_rose"] == x["seeds"] else f"{text}, {x['seeds_rose']} of {x['seeds']} seeds rose"


def _reach(values: list) -> str:
    hit = [v for v in values if v is not None]
    if not hit:
        return "never"
    text = f"{statistics.mean(hit):.0f}"
    return text if len(hit) == len(values) else f"{text} ({len(hit)}/{len(values)} seeds)"


def sweep_table(runs: list[dict], rows: list[dict], grid: list[float]) -> list[str]:
    """Each variant's sweep on seed 0, one column per rate tried anywhere (the grid and any rate added to it):
    the score that picks the rate / the set-B reward at the end; the chosen rate in bold, and whether it sits at
    the grid's edge, where a rate beyond it might do better."""
    sweeps = {(x["reward"], x["T"], x["variant"]): {r["lr"]: r for r in sweep_runs(runs, x["reward"], x["T"], x["variant"])}
              for x in rows if x["variant"] not in SHARES_LR}  # a variant that borrows a rate has no sweep
    rates = sorted(set(grid).union(*sweeps.values()))
    lines = [f"The sweeps, seed 0: the score that picks the rate (the mean set-A reward of the last {SELECT_LAST} "
             "evaluations) / the set-B reward at the end, the chosen rate in bold. *edge*: the chosen rate is the "
             "highest or lowest tried, so one beyond it might do better.", "",
             "| reward | T | variant | " + " | ".join(f"lr {lr:g}" for lr in rates) + " | chosen |",
             "|---|---|---|" + "---|" * (len(rates) + 1)]
    for (reward, T, variant), tried in sweeps.items():
        best = chosen_lr(runs, reward, T, variant)
        cells = [("**{}**" if lr == best else "{}").format(f"{sweep_score(tried[lr]):.3f} / "
                                                            f"{tried[lr]['points'][-1]['heldout_reward']:.3f}")
                 if lr in tried else "" for lr in rates]
        edge = " (edge: highest)" if best == max(tried) and len(tried) > 1 else (
            " (edge: lowest)" if best == min(tried) and len(tried) > 1 else "")
        missing = len(set(grid) - set(tried))
        lines.append(f"| `{reward}` | {T} | {variant} | " + " | ".join(cells) +
                     f" | {best:g}{edge}{f', {missing} of the grid not tried' if missing else ''} |")
    return lines


def section(r: dict, images: Path, flow: bool = False) -> list[str]:
    rows = summarize(r)
    cfg = settings(r.get("budget") == "quick", flow)  # the suite's (a result file holds one process's share)
    kl_note = " (the `+ kl` guard uses RLR's)" if any(x["variant"] in SHARES_LR for x in rows) else ""
    title = ("## The structure rewards on the flow-matching default (`default-flow`)" if flow else
             "## Long runs: rewards that need early changes, stability, guards")
    lines = [title, "",
             f"`python -m benchmarks.run --only {'flowrun' if flow else 'longrun'}` ({r.get('budget', '?')}; "
             f"{r.get('seconds', 0) / 3600:.1f} h so far). {'`default-flow`' if flow else 'Embedded default model'}, "
             f"{cfg['updates']} updates x batch {cfg['batch']}, learning rate the best of "
             f"{cfg['lrs']} on seed 0 (the mean set-A reward of its last {SELECT_LAST} evaluations){kl_note}; where that "
             "choice sat at the grid's edge and a comparison rests on it, one more rate beyond the edge (the sweeps "
             f"table below). Evaluations every {cfg['eval_every']} updates. "
             "Rewards are measured on held-out seed set B; the best-LoRA guard selects on set A. "
             "*kept*: the set-B reward of the LoRA the guard keeps. *share of peak kept*: (end - start) / (peak - start) "
             "per seed, over the seeds whose peak rose more than one evaluation's noise (below) above the start; "
             "*guard keeps*: the same share for the LoRA the guard keeps. *lr*: the chosen rate, with how many of the "
             "rates its sweep has tried so far when not all. *to 90%*: images and training CPU seconds until the "
             "set-B reward first reaches 90% of the best variant's final gain.", "",
             "| reward | T | variant | lr | seeds | start -> end (min, max) | kept | share of peak kept (min) | "
             "guard keeps (min) | images to 90% | CPU s to 90% | CPU s per run | diversity change |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in rows:
        swept = "" if x["rates_tried"] >= len(cfg["lrs"]) else f" ({x['rates_tried']}/{len(cfg['lrs'])} tried)"
        lines.append(f"| `{x['reward']}` | {x['T']} | {x['variant']} | {x['lr']:g}{swept} | {x['seeds']} | {x['start']:.3f} -> "
                     f"{x['final_mean']:.3f} ({x['final_min']:.3f}, {x['final_max']:.3f}) | {x['kept_mean']:.3f} | "
                     f"{_share(x)} | {_share(x, 'guard_share')} | {_reach(x['images_to_level'])} | "
                     f"{_reach(x['cpu_to_level'])} | {x['cpu_per_run']:.0f} | {x['diversity_change']:+.0%} |")
    if rows:
        lines += ["", _noise_line(r, rows, flow), ""] + sweep_table(r["runs"], rows, cfg["lrs"])
    plot = _plot(r, images, "flowrun" if flow else "longrun")
    return lines + ([""] + [f"![{p}](images/{p})" for p in plot] if plot else []) + [""]


def flow_section(r: dict, images: Path) -> list[str]:
    return section(r, images, flow=True)


def _plot(r: dict, images: Path, prefix: str = "longrun") -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    runs = r["runs"]
    for reward, T in dict.fromkeys((x["reward"], x["T"]) for x in runs):
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100)
        for variant in dict.fromkeys(x["variant"] for x in runs if (x["reward"], x["T"]) == (reward, T)):
            lr = chosen_lr(runs, reward, T, variant)
            mine = [x for x in runs if (x["reward"], x["T"], x["variant"], x["lr"]) == (reward, T, variant, lr)]
            if not mine:
                continue
            n = min(len(x["points"]) for x in mine)
            ys = [statistics.mean(x["points"][i]["heldout_reward"] for x in mine) for i in range(n)]
            axes[0].plot([mine[0]["points"][i]["samples"] for i in range(n)], ys, "o-", ms=3, label=variant)
            axes[1].plot([statistics.mean(x["points"][i]["train_cpu_seconds"] for x in mine) for i in range(n)], ys,
                         "o-", ms=3, label=variant)
        axes[0].set_xlabel("generated images")
        axes[1].set_xlabel("training CPU seconds")
        for ax in axes:
            ax.set_ylabel(f"{reward} (held-out set B)")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{reward}, T={T} (mean over seeds)")
        fig.tight_layout()
        name = f"bench_{prefix}_{reward.replace(':', '_').replace('.', '')}_T{T}.png"
        images.mkdir(parents=True, exist_ok=True)
        fig.savefig(images / name)
        plt.close(fig)
        names.append(name)
    return names
