"""docs/benchmarks.md's first section: the project's targets against what the newest results show."""

from __future__ import annotations

from pathlib import Path

from ..efficiency import summarize
from .common import _load


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

