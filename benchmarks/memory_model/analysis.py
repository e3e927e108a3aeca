"""From saved measurements to the page's numbers: fits, holdout checks and predictions (no measuring)."""

from __future__ import annotations

from dataclasses import asdict, replace

from ..sd_archs import ARCHS
from .fit import fit_bytes, fit_components
from .gpu_correction import check_rows, corrected_bytes, part_scales
from .model import OPTION_SETS, Scenario, model_counts, predict


def analyse(data: dict, gpu: dict | None = None) -> dict:
    """Fits, holdout checks and predictions from the saved measurements (no measuring); with a GPU check's
    record ``gpu``, each prediction also gets its GPU-corrected bytes (``gpu_bytes``, or None)."""
    rows = data.get("points", [])
    fits = fit_components(rows)
    counts = data.get("counts") or model_counts()
    out: dict = {"fits": {"/".join(k): asdict(f) for k, f in fits.table.items()}, "counts": counts}
    # holdout: fit each UNet/VAE family without its largest point and predict that point
    holdout = []
    for (comp, arch, var) in sorted({(r["component"], r["arch"], r["variant"]) for r in rows}):
        mine = [r for r in rows if (r["component"], r["arch"], r["variant"]) == (comp, arch, var)]
        if comp == "reward" or len({r["pixels"] for r in mine}) < 4:
            continue
        big = max(mine, key=lambda r: r["n"] * r["pixels"])
        rest = [r for r in mine if r is not big]
        for q in ("peak", "retained"):
            f = fit_bytes([(r["n"], r["pixels"], r[q]) for r in rest])
            lin = fit_bytes([(r["n"], r["pixels"], r[q]) for r in rest], ("c", "b", "a"))
            holdout.append({"family": f"{comp}/{arch}/{var}", "quantity": q, "n": big["n"], "lat": big["lat"],
                            "measured": big[q], "predicted": f(big["n"], big["pixels"]),
                            "predicted_linear": lin(big["n"], big["pixels"])})
    out["holdout"] = holdout
    # the same families fitted without the quadratic term: does P^2 earn its place?
    out["linear_only"] = {}
    for (comp, arch, var, q), f in fits.table.items():
        mine = [r for r in rows if (r["component"], r["arch"], r["variant"]) == (comp, arch, var)]
        if comp != "reward" and q == "peak":
            lin = fit_bytes([(r["n"], r["pixels"], r[q]) for r in mine], ("c", "b", "a"))
            out["linear_only"]["/".join((comp, arch, var, q))] = asdict(lin)
    preds = []
    needed = [("unet", a, v, "peak") for a in ARCHS for v in ("plain", "ckpt")] + \
             [("vae", "sd-vae", v, "peak") for v in ("plain", "ckpt")] + [("vae", "sd-vae", "plain", "nograd_peak")] + \
             [("reward", "clip-vit-l14", "plain", q) for q in ("peak", "nograd_peak")]
    missing = [k for k in needed if k not in fits.table]
    for arch, res, batches in (("sd15", 512, (1, 4)), ("sdxl", 1024, (1, 2))):
        if any(k[1] == arch for k in missing) or any(k[0] != "unet" for k in missing):
            continue
        for b in batches:
            for fo in (1, 4):
                s = Scenario(arch, res, b, fo_steps=fo)
                for opts in OPTION_SETS:
                    preds.append(predict(fits, s, opts, counts, "rlr"))
                    if fo == 1 and not opts.adam_8bit and not opts.reward_fp32:
                        preds.append(predict(fits, s, opts, counts, "full_bp"))
                        preds.append(predict(fits, replace(s, fo_steps=2), opts, counts, "truncated_bp"))
                        preds.append(predict(fits, s, opts, counts, "ddpo"))
                        preds.append(predict(fits, s, opts, counts, "zo"))
    scales = part_scales(fits, gpu) if not missing else {}
    for p in preds:
        p["gpu_bytes"] = corrected_bytes(fits, p, counts, scales)
    out["gpu_scales"] = {k: asdict(v) for k, v in scales.items()}
    out["gpu_check_rows"] = check_rows(fits, counts, gpu, scales) if scales else []
    out["predictions"] = preds
    out["missing_fits"] = ["/".join(k) for k in missing]
    return out
