"""The flow transformers' step memory: reduced-depth builds at full width measured on the CPU (bf16, LoRA rank 4 on
the adapter's targets, as ``Measurer`` measures the UNets), fitted per build, and extrapolated to full depth
(``benchmarks.flow_archs``: the bytes grow by a fixed amount per block of each kind).

    python -m benchmarks.memory_model.flow_measure [--budget-minutes 40]   # resumable; then --report-only re-renders

Measurements go to benchmarks/results/memory-flow.json, point by point.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..flow_archs import FLOW_ARCHS, build_transformer, flow_counts, flow_inputs
from .fit import Fit, Fits, fit_bytes
from .measure import measure_nograd, measure_segment, weight_bytes
from .store import GB, load

logger = logging.getLogger(__name__)

FLOW_RESULTS = Path(__file__).parent.parent / "results" / "memory-flow.json"
#: (n, latent side, also without grad) measured for every build and variant; n is the batch of the call
POINTS: tuple[tuple[int, int, bool], ...] = ((1, 16, True), (2, 16, True), (1, 32, True))
#: the extrapolation check: one larger point of each model's base build (plain), left out of the fit
HOLDOUT: tuple[int, int] = (1, 64)
#: the fitted form: c + n (b + a P). Attention runs in torch's SDPA (its memory-efficient kernels on CPU and GPU), so
#: no term in P^2; with four points per build a quadratic term would fit noise (the holdout point checks linearity)
LINEAR_TERMS: tuple[str, ...] = ("c", "b", "a")


@dataclass(frozen=True)
class FlowPoint:
    arch: str
    build: str  # "base" or a block kind of FLOW_ARCHS[arch]["builds"]
    variant: str  # "plain" | "ckpt" (diffusers' per-block gradient checkpointing)
    n: int
    lat: int
    nograd: bool = False
    holdout: bool = False

    @property
    def key(self) -> str:
        return f"flow/{self.arch}:{self.build}/{self.variant}/n{self.n}/lat{self.lat}"


def flow_plan() -> list[FlowPoint]:
    """Every measured model's points, the base builds first; the holdout points last."""
    out = []
    for arch, a in FLOW_ARCHS.items():
        if "measured_as" in a:
            continue
        for build in ("base", *a["builds"]):
            for variant in ("plain", "ckpt"):
                out += [FlowPoint(arch, build, variant, n, lat, nograd and variant == "plain") for n, lat, nograd in POINTS]
    out += [FlowPoint(arch, "base", "plain", *HOLDOUT, holdout=True) for arch, a in FLOW_ARCHS.items()
            if "measured_as" not in a]
    return out


class FlowMeasurer:
    """One build in memory at a time; LoRA rank 4 on the arch's targets with a non-zero B (every LoRA tensor
    gets a gradient), frozen weights in bf16 under CPU autocast."""

    def __init__(self) -> None:
        self._key: tuple[str, str] | None = None
        self._model: torch.nn.Module | None = None

    def model(self, arch: str, build: str) -> torch.nn.Module:
        if self._key != (arch, build):
            self._model = None
            gc.collect()
            from rlr_backend.lora import add_lora

            t0 = time.perf_counter()
            m = build_transformer(arch, build)
            add_lora(m, rank=4, seed=0, target_modules=FLOW_ARCHS[arch]["targets"])
            with torch.no_grad():
                for n, p in m.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0, 0.02)
            self._key, self._model = (arch, build), m
            logger.info("built %s:%s (%.2f GB of weights) in %.0f s", arch, build, weight_bytes(m) / GB,
                        time.perf_counter() - t0)
        return self._model

    def measure(self, p: FlowPoint) -> dict:
        m = self.model(p.arch, p.build)
        (m.enable_gradient_checkpointing if p.variant == "ckpt" else m.disable_gradient_checkpointing)()
        x, call = flow_inputs(p.arch, p.n, p.lat)

        def fwd() -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return call(m, x)

        t0 = time.perf_counter()
        seg = measure_segment(fwd)
        seconds = time.perf_counter() - t0
        nograd = measure_nograd(fwd) if p.nograd else None
        return {"component": "flow", "arch": f"{p.arch}:{p.build}", "variant": p.variant, "n": p.n, "lat": p.lat,
                "pixels": p.lat * p.lat, "key": p.key, "holdout": p.holdout, "peak": seg.peak,
                "retained": seg.retained, "nograd_peak": nograd, "seconds": round(seconds, 1),
                "weights": weight_bytes(m)}


def depth_combination(arch: str) -> dict[str, float]:
    """Build -> weight of its fit in the full-depth model: base + sum_k m_k (build_k - base), m_k = the blocks of
    kind k the full model has beyond the base build."""
    a = FLOW_ARCHS[FLOW_ARCHS[arch].get("measured_as", arch)]
    full = FLOW_ARCHS[arch]["full"]
    weights = {"base": 1.0 - sum(full[k] for k in a["builds"])}
    weights.update({k: float(full[k]) for k in a["builds"]})
    return weights


def flow_fits(rows: list[dict]) -> Fits:
    """Per measured build a linear fit (``LINEAR_TERMS``, holdout points left out), then per arch of FLOW_ARCHS the
    full-depth fit ``("unet", arch, variant, quantity)`` as the depth combination of its builds' coefficients
    (the composition of ``model.predict`` reads it as the UNet's)."""
    per_build = Fits()
    fitted = [r for r in rows if not r.get("holdout")]
    for fam in sorted({(r["arch"], r["variant"]) for r in fitted}):
        mine = [r for r in fitted if (r["arch"], r["variant"]) == fam]
        for q in ("peak", "retained", "nograd_peak"):
            pts = [(r["n"], r["pixels"], r[q]) for r in mine if r.get(q) is not None]
            if pts:
                per_build.table[("flow", *fam, q)] = fit_bytes(pts, LINEAR_TERMS)
    out = Fits(dict(per_build.table))
    for arch, a in FLOW_ARCHS.items():
        src = a.get("measured_as", arch)
        weights = depth_combination(arch)
        for variant in ("plain", "ckpt"):
            for q in ("peak", "retained", "nograd_peak"):
                keys = {b: ("flow", f"{src}:{b}", variant, q) for b in weights}
                if not all(k in per_build.table for k in keys.values()):
                    continue
                coef = {t: sum(w * getattr(per_build.table[keys[b]], t) for b, w in weights.items())
                        for t in ("c", "b", "a", "q")}
                out.table[("unet", arch, variant, q)] = Fit(**coef, points=sum(per_build.table[k].points
                                                                               for k in keys.values()))
    return out


def holdout_errors(rows: list[dict], fits: Fits) -> list[dict]:
    """Each holdout point against its build's fit (fitted on the smaller points only)."""
    out = []
    for r in rows:
        if not r.get("holdout"):
            continue
        for q in ("peak", "retained"):
            key = ("flow", r["arch"], r["variant"], q)
            if key in fits.table:
                pred = fits.table[key](r["n"], r["pixels"])
                out.append({"family": r["arch"], "quantity": q, "n": r["n"], "lat": r["lat"], "measured": r[q],
                            "predicted": pred, "error": pred / r[q] - 1})
    return out


def run(budget_minutes: float, path: Path = FLOW_RESULTS) -> dict:
    data = load(path)
    data.setdefault("points", [])
    data["started"] = data.get("started") or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    from benchmarks.common import machine

    data["machine"] = machine()
    data["counts"] = flow_counts()

    def save() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)

    deadline = time.time() + 60 * budget_minutes
    done = {r["key"] for r in data["points"]}
    meas = FlowMeasurer()
    for p in flow_plan():
        if p.key in done:
            continue
        if time.time() > deadline:
            logger.warning("time budget spent: skipping %s", p.key)
            continue
        row = meas.measure(p)
        data["points"].append(row)
        save()
        logger.info("%-40s peak %7.3f GB  retained %7.3f GB%s  (%.0f s)", p.key, row["peak"] / GB, row["retained"] / GB,
                    f"  no-grad {row['nograd_peak'] / GB:.3f} GB" if row["nograd_peak"] is not None else "",
                    row["seconds"])
    save()
    return data


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.memory_model.flow_measure", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-minutes", type=float, default=60.0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("rlr_backend.lora.inject").setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    data = run(args.budget_minutes)
    fits = flow_fits(data["points"])
    for h in holdout_errors(data["points"], fits):
        logger.info("holdout %s %s n=%d %dx%d: measured %.3f GB, fit %.3f GB (%+.1f%%)", h["family"], h["quantity"],
                    h["n"], h["lat"], h["lat"], h["measured"] / GB, h["predicted"] / GB, 100 * h["error"])


if __name__ == "__main__":
    sys.exit(main())
