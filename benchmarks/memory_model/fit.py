"""Fitting: each component's bytes as ``c + n * (b + a * P + q * P^2)`` (non-negative, relative-error least
squares), one fit per (component, arch, variant, quantity)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Sequence

import torch

FIT_TERMS = ("c", "b", "a", "q")  # c + n * (b + a P + q P^2)


def _design(n: float, pixels: float) -> list[float]:
    return [1.0, n, n * pixels, n * pixels * pixels]


@dataclass(frozen=True)
class Fit:
    """``bytes = c + n * (b + a * P + q * P^2)``, P = latent pixels (h x w), n = batch of the call."""

    c: float
    b: float
    a: float
    q: float
    max_rel_error: float = 0.0
    points: int = 0

    def __call__(self, n: float, pixels: float) -> float:
        return self.c + n * (self.b + self.a * pixels + self.q * pixels * pixels)

    def quadratic_share(self, n: float, pixels: float) -> float:
        """Fraction of the bytes at (n, P) that come from the quadratic (attention-score) term."""
        return n * self.q * pixels * pixels / max(self(n, pixels), 1.0)


def fit_bytes(points: Sequence[tuple[float, float, float]], terms: Sequence[str] = FIT_TERMS) -> Fit:
    """Non-negative least squares of ``bytes`` on the ``terms`` of FIT_TERMS, weighted by 1/bytes so
    every point counts by its relative error (the points span 30x in size). Exact NNLS by trying
    every subset of terms (at most 16) and keeping the best fit with all-non-negative coefficients.

    ``points``: (n, latent pixels, bytes)."""
    if not points:
        raise ValueError("no points to fit")
    idx = [FIT_TERMS.index(t) for t in terms]
    rows = torch.tensor([[_design(n, px)[i] for i in idx] for n, px, _ in points], dtype=torch.float64)
    y = torch.tensor([b for _, _, b in points], dtype=torch.float64)
    w = 1.0 / y.clamp_min(1.0)
    best: tuple[float, dict[str, float]] | None = None
    for k in range(1, len(idx) + 1):
        for subset in itertools.combinations(range(len(idx)), k):
            if len(subset) > len(points):
                continue
            X = rows[:, list(subset)] * w[:, None]
            sol = torch.linalg.lstsq(X, (y * w)[:, None], driver="gelsd").solution.squeeze(1)
            if (sol < 0).any():
                continue
            res = float(((X @ sol) - y * w).square().sum())
            if best is None or res < best[0] - 1e-15:
                best = (res, {terms[j]: float(v) for j, v in zip(subset, sol)})
    coef = {t: 0.0 for t in FIT_TERMS} | (best[1] if best else {})
    f = Fit(**coef)
    err = max(abs(f(n, px) / b - 1) for n, px, b in points)
    return replace(f, max_rel_error=err, points=len(points))



@dataclass
class Fits:
    """Fitted component models (bytes), keyed by (component, arch, variant, quantity)."""

    table: dict[tuple[str, str, str, str], Fit] = field(default_factory=dict)

    def get(self, component: str, arch: str, variant: str, quantity: str) -> Fit:
        return self.table[(component, arch, variant, quantity)]

    def has(self, component: str, arch: str, variant: str, quantity: str) -> bool:
        return (component, arch, variant, quantity) in self.table


def fit_components(rows: list[dict]) -> Fits:
    """One Fit per (component, arch, variant) and quantity (peak, retained, nograd_peak). The reward
    runs at a fixed 224 px input, so it is fitted on n only (terms c, b)."""
    fits = Fits()
    fams = sorted({(r["component"], r["arch"], r["variant"]) for r in rows})
    for comp, arch, var in fams:
        mine = [r for r in rows if (r["component"], r["arch"], r["variant"]) == (comp, arch, var)]
        terms = ("c", "b") if comp == "reward" else FIT_TERMS
        for q in ("peak", "retained", "nograd_peak"):
            pts = [(r["n"], r["pixels"], r[q]) for r in mine if r.get(q) is not None]
            if pts:
                fits.table[(comp, arch, var, q)] = fit_bytes(pts, terms)
    return fits
