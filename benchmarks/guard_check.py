"""What the best-LoRA guard keeps, measured on an evaluation large enough to tell.

The long-run suite (``long_run``) scores every evaluation on two 8-image seed sets: set A, which the guard
selects on (as a user's run does), and set B, which reports. On a reward with a small gain that is too noisy
to measure the guard: on ``size:0.4`` one 8-image evaluation's noise (0.007-0.009, ``long_run.eval_noise``)
is 10-17% of the whole gain (0.05-0.07), so the maximum of 13 noisy set-B points sits above the true peak
and a guard that kept the truly best LoRA would often read below 90% of "its peak". This suite retrains the long-run suite's runs (same
variant, rate, seed and settings; the rate is the long-run sweep's choice) and also scores every evaluation
on a third seed set, set C (``CHECK_SEED``), with 32 images per prompt (128 images). The guard still selects
on set A; the share of the peak gain it keeps is measured on set C. Set B is recorded again, which checks
that the retrained run is the long-run suite's run (training is deterministic on the CPU).

``--only flowguard`` does the same for the flow-matching suite (``--only flowrun``, ``default-flow``) at its
sweep's rates; its rows are on the same page table, marked ``(default-flow)``.

    python -m benchmarks.run --suite full --only guardrun [--variants ...] [--seeds ...] [--Ts ...]
    python -m benchmarks.run --suite full --only flowguard [--variants ...] [--seeds ...]
"""

from __future__ import annotations

import logging
import math
import statistics

from . import long_run
from .efficiency import forget, train_curve, work_dir

logger = logging.getLogger(__name__)

CHECK_SEED = 24680
#: the suite's cells by default: the reward whose gain is small against one evaluation's noise, where the
#: long-run suite's set-B measurement of the guard fell below 90%
REWARDS, TS, VARIANTS = ["size:0.4"], [20, 50], ["rlr + step baseline", "truncated_bp"]


def settings(quick: bool, flow: bool = False) -> dict:
    """The long-run suite's settings (``flow``: the flow-matching suite's) narrowed to the guard's cells."""
    cfg = dict(long_run.settings(quick, flow))
    if quick:
        return {**cfg, "check_per_prompt": 4, "seeds": [0]}
    return {**cfg, "rewards": REWARDS, "Ts": [T for T in TS if T in cfg["Ts"]], "variants": VARIANTS,
            "check_per_prompt": 32}


def run_suite(quick: bool, *, done: list | None = None, save=None, longrun: list | None = None,
              variants: list[str] | None = None, seeds: list[int] | None = None, Ts: list[int] | None = None,
              rewards: list[str] | None = None, flow: bool = False) -> dict:
    """Train every (reward, T, variant, seed) of the suite not in ``done`` at the rate the long-run suite's
    sweep chose (``longrun``: its runs; a cell whose sweep is not done is skipped with a log line).
    ``flow``: the flow-matching suite's cells on ``default-flow`` (``longrun`` then holds that suite's runs)."""
    cfg = settings(quick, flow)
    suite = long_run.settings(quick, flow)
    for key, wanted in (("variants", variants), ("seeds", seeds), ("Ts", Ts), ("rewards", rewards)):
        if wanted:
            unknown = [x for x in wanted if x not in suite[key]]
            if unknown:
                raise ValueError(f"{key} {unknown} are not in the {'flow' if flow else 'long'}-run suite's {suite[key]}")
            cfg[key] = list(wanted)
    runs = list(done or [])
    have = {long_run._key(r) for r in runs}
    model = {"model": cfg["model"]} if "model" in cfg else {}
    tmp = work_dir(("flowguard" if flow else "guardrun") + ("-quick" if quick else ""))
    for reward in cfg["rewards"]:
        for T in cfg["Ts"]:
            for variant in cfg["variants"]:
                lr = long_run.chosen_lr(longrun or [], reward, T, variant)
                if lr is None:
                    logger.info("%s %s T=%d: the long-run sweep has not chosen a rate; skipped", reward, variant, T)
                    continue
                for seed in cfg["seeds"]:
                    if (reward, T, variant, lr, seed) in have:
                        continue
                    estimator, overrides = long_run.VARIANTS[variant]
                    run = train_curve(estimator, reward, seed, cfg["updates"], cfg["eval_every"], cfg["batch"],
                                      cfg["images_per_prompt"], T, tmp, lr=lr, overrides={**overrides, **model},
                                      tag=f"-{variant}" + (f"-T{T}" if T != 20 else ""),
                                      heldout_seed=long_run.HELDOUT_SEED, eval_seeds=cfg["eval_seeds"],
                                      check=(CHECK_SEED, cfg["check_per_prompt"]))
                    name = run.pop("run_name")
                    runs.append({**run, "variant": variant, "T": T, **model})
                    have.add((reward, T, variant, lr, seed))
                    if save is not None:
                        save({"settings": cfg, "runs": runs})
                    forget(tmp, name)
    return {"settings": cfg, "runs": runs}


def _share(value: float, start: float, peak: float) -> float:
    return (value - start) / (peak - start) if peak > start else math.nan


def run_row(run: dict, longrun: list | None = None) -> dict:
    """One run: the guard's pick (the evaluation with the best set-A reward), its and the end's share of the
    peak gain on set C (128 images) and on set B (8 images, as the long-run suite reports it), and whether
    set B matches the long-run suite's run of the same key: the largest difference (inf when their numbers of
    evaluations differ, None when that suite has no such run)."""
    pts = run["points"]
    first = max(pts, key=lambda p: p["eval_reward"])  # the best evaluation on set A
    pick = long_run.guard_pick(run)  # lora_best after the final check (the same for runs without it)
    c = [p["check_reward"] for p in pts]
    b = [p["heldout_reward"] for p in pts]
    twin = next((r for r in longrun or [] if long_run._key(r) == long_run._key(run)), None)
    same = (None if twin is None else math.inf if len(twin["points"]) != len(pts)
            else max(abs(x - p["heldout_reward"]) for x, p in zip(b, twin["points"])))
    return {"seed": run["seed"], "best_a_step": first["step"], "guard_a_c": _share(first["check_reward"], c[0], max(c)),
            "checked": run.get("guard_step") is not None, "pick_step": pick["step"], "peak_step_c": pts[c.index(max(c))]["step"],
            "updates": pts[-1]["step"], "start_c": c[0], "peak_c": max(c), "end_c": c[-1],
            "kept_c": pick["check_reward"], "guard_c": _share(pick["check_reward"], c[0], max(c)),
            "end_share_c": _share(c[-1], c[0], max(c)), "guard_b": _share(pick["heldout_reward"], b[0], max(b)),
            "end_share_b": _share(b[-1], b[0], max(b)), "longrun_diff": same}


def section(r: dict, images=None, longrun: list | None = None, flowrun: list | None = None) -> list[str]:
    """The page's section: ``r`` may hold runs of both suites (a flow run has ``model``); a run's twin is
    looked up in ``longrun`` or, for a flow run, in ``flowrun``."""
    cfg = r.get("settings") or settings(r.get("budget") == "quick")
    lines = ["## What the best-LoRA guard keeps, measured on 128 images", "",
             f"`python -m benchmarks.run --only guardrun` ({r.get('budget', '?')}; {r.get('seconds', 0) / 3600:.1f} h "
             f"so far; `--only flowguard` for the rows marked `(default-flow)`). The long-run suite's runs (or the "
             f"flow-matching suite's, `--only flowrun`: 60 updates, an evaluation every 10) trained again (same "
             f"settings, its sweep's rate), each evaluation "
             f"also scored on seed set C: {cfg['check_per_prompt']} images for each of 4 prompts. The guard keeps the "
             "LoRA of the best evaluation on set A (8 images, as in a user's run: *best on A*), then, at the end, "
             "scores it and the last LoRA on 32 fresh images of its own and keeps the better (*kept*; `-`: a run "
             "recorded before that final check existed, whose guard is the best on A). *keeps*: the share of the "
             "peak gain, (kept - start) / (peak - start), on set C or on set B (8 images: what the long-run table "
             "reports); *end*: the same share for the last LoRA. *same run*: the largest difference between this "
             "run's set-B rewards and the long-run suite's run of the same rate and seed (0: the same run).", "",
             "| reward | T | variant | lr | seed | best on A (update) | kept (update) | set-C start -> kept (peak at "
             "update) | best on A keeps, set C | kept keeps, set C | end, set C | kept keeps, set B | same run |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["runs"]:
        y = run_row(x, flowrun if x.get("model") else longrun)
        same = "-" if y["longrun_diff"] is None else f"{y['longrun_diff']:.1g}"
        where = f" ({x['model']})" if x.get("model") else ""
        lines.append(f"| `{x['reward']}`{where} | {x['T']} | {x['variant']} | {x['lr']:g} | {x['seed']} | {y['best_a_step']} | "
                     f"{y['pick_step'] if y['checked'] else '-'} | "
                     f"{y['start_c']:.4f} -> {y['kept_c']:.4f} ({y['peak_c']:.4f} at {y['peak_step_c']}) | "
                     f"{y['guard_a_c']:.2f} | {y['guard_c']:.2f} | {y['end_share_c']:.2f} | {y['guard_b']:.2f} | {same} |")
    models = dict.fromkeys(x.get("model") for x in r["runs"])
    for model in models:
        rows = [run_row(x) for x in r["runs"] if x.get("model") == model]
        kept, first = [y["guard_c"] for y in rows], [y["guard_a_c"] for y in rows]
        checked = sum(y["checked"] for y in rows)
        where = f" on `{model}`" if model else (" on the embedded model" if len(models) > 1 else "")
        lines += ["", f"Across the {len(rows)} runs{where} ({checked} with the final check) the kept LoRA holds "
                  f"{statistics.mean(kept):.2f} of the peak gain on set C (min {min(kept):.2f}); the best on set A "
                  f"alone {statistics.mean(first):.2f} (min {min(first):.2f}); measured on set B, as the long-run "
                  f"table does, the kept LoRA holds {statistics.mean(y['guard_b'] for y in rows):.2f} (min "
                  f"{min(y['guard_b'] for y in rows):.2f})."]
    return lines + [""]
