"""How time and memory of an update grow with T, resolution, batch and model size.

The extra memory of an update over a no-grad sample (its activations) is fitted, per estimator, as
``bytes = c * T^a * batch^b * pixels^(2d)`` (least squares in log space over the measured points);
the fit answers "where does each estimator run out of memory on a 24 GB machine" for the measured
model at larger T, batch and resolution. It is an extrapolation from small random-init models.
"""

from __future__ import annotations

import math

import torch

from .cost import measure_costs

ESTIMATORS = ("rlr latent_lr h=2", "rlr param_1pt h=2", "ddpo", "truncated_bp K=2", "full_bp")
BUDGET = 24e9


def grid(quick: bool) -> list[tuple[str, int, int, int | None]]:
    """(model, T, batch, pixels) points: one axis varied at a time around a centre point."""
    if quick:
        return [("default", 10, 2, None), ("default", 20, 2, None), ("default", 20, 1, None), ("default", 20, 4, None)]
    pts = [("sd-small", t, 2, 64) for t in (10, 20, 50)]
    pts += [("sd-small", 20, b, 64) for b in (1, 4)]
    pts += [("sd-small", 20, 2, px) for px in (32, 128)]
    pts += [("default", 20, 2, None), ("sd-mid", 20, 2, 64)]
    return pts


def fit(rows: list[dict]) -> dict | None:
    """Least-squares fit of log(activation bytes) on log T, log batch, log pixels (axes that vary)."""
    pts = rows
    axes = [k for k in ("T", "batch", "pixels") if len({r[k] for r in pts}) > 1]
    if len(pts) < len(axes) + 1:
        return None
    X = torch.tensor([[1.0] + [math.log(r[k]) for k in axes] for r in pts], dtype=torch.float64)
    y = torch.tensor([math.log(r["activation_bytes"]) for r in pts], dtype=torch.float64)
    coef = torch.linalg.lstsq(X, y.unsqueeze(1)).solution.squeeze(1)
    pred = X @ coef
    err = float(((pred - y).exp() - 1).abs().max())
    return {"axes": axes, "log_c": float(coef[0]), "exponents": {k: float(v) for k, v in zip(axes, coef[1:])},
            "max_relative_error": err}


def predict(f: dict, **point: float) -> float:
    return math.exp(f["log_c"] + sum(e * math.log(point[k]) for k, e in f["exponents"].items()))


def run_suite(quick: bool) -> dict:
    rows = []
    for model, T, batch, px in grid(quick):
        for r in measure_costs(model, T, batch, list(ESTIMATORS), pixels=px, timing=True):
            rows.append(r)
    for r in rows:  # what the update needs on top of a no-grad sample (weights + sampling activations)
        r["activation_bytes"] = max(r["bytes"] - r["sample_bytes"], 1.0)
    fits, oom = {}, {}
    model = "default" if quick else "sd-small"
    for est in ESTIMATORS:
        mine = [r for r in rows if r["estimator"] == est and r["model"] == model]
        f = fit(mine)
        if f is None:
            continue
        fits[est] = f
        ref = mine[0]
        # the largest T at batch 1 and the measured resolution that stays under the budget
        base = ref["sample_bytes"]
        limit = None
        for T in (10, 20, 50, 100, 200, 500, 1000):
            pt = {"T": T, "batch": 1, "pixels": ref["pixels"]}
            if base + predict(f, **pt) > BUDGET:
                break
            limit = T
        oom[est] = limit
    return {"rows": rows, "fit_model": model, "fits": fits, "largest_T_under_24GB": oom}
