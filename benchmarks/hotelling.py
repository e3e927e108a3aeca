"""Hotelling's T^2 tests of a mean gradient: is an estimator's mean the target, given correlated coordinates?

A per-coordinate summary such as the mean of z^2 over the coordinates has expectation about 1 when
unbiased, but its spread depends on how the coordinates are correlated, so no threshold on it has a
known false-alarm rate. Hotelling's T^2 whitens the mean difference with the estimated covariance and
has an F distribution under the null hypothesis (Gaussian estimates), so its p-value is calibrated:

* ``one_sample(est, target)``: the target is exact (the analytic chain's gradient).
  T^2 = n d' S^-1 d,  F = (n - q) / (q (n - 1)) T^2 ~ F(q, n - q).
* ``two_sample(est, ref)``: the target is itself an estimate (the mean of full backprop over other
  seeds), with a different covariance. T^2 = d' (S1/n1 + S2/n2)^-1 d with Krishnamoorthy & Yu's
  (2004) degrees of freedom nu (taken with n_i - 1 per sample, so that one dimension gives Welch's
  t-test): F = (nu - q + 1) / (q nu) T^2 ~ F(q, nu - q + 1).

With more coordinates than the samples support (a LoRA has thousands of parameters, a benchmark a few
dozen seeds), the covariance cannot be inverted: both samples are first projected on a fixed random
q-dimensional orthonormal subspace (seeded, independent of the data, so the test stays calibrated),
q = max(1, n_min // 4) when p > n_min // 4. The test then sees the bias's component in that subspace
only, which lowers its power against a bias in a few directions; the result says which q was used.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def f_sf(f: float, d1: float, d2: float) -> float:
    """P(F > f) for F ~ F(d1, d2): the regularised incomplete beta I_x(d2/2, d1/2) at x = d2 / (d2 + d1 f)."""
    if not f > 0:
        return 1.0
    if math.isinf(f):
        return 0.0
    return _betainc(d2 / 2, d1 / 2, d2 / (d2 + d1 * f))


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b) by its continued fraction (modified Lentz)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast on this side; use the symmetry otherwise
        return 1.0 - _betainc(b, a, 1 - x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return math.exp(log_front) * h / a


def reduced_dims(p: int, n_min: int) -> int:
    """The dimension tested: all p coordinates when n_min is at least 4 p, else max(1, n_min // 4)."""
    return p if 4 * p <= n_min else max(1, n_min // 4)


def _project(samples: list[Tensor], q: int, seed: int) -> list[Tensor]:
    p = samples[0].shape[1]
    if q >= p:
        return samples
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(p, q, generator=g, dtype=torch.float64))
    return [s @ basis for s in samples]


def one_sample(est: Tensor, target: Tensor, *, dims: int | None = None, seed: int = 0) -> dict:
    """Test mean(est) == target for estimates (n, p) against an exact (p,) target."""
    est = est.double()
    n, p = est.shape
    q = dims or reduced_dims(p, n)
    if not 1 <= q < n:
        raise ValueError(f"a one-sample T^2 test in {q} dimensions needs more than {q} estimates, got {n}")
    x, mu = _project([est, target.double().reshape(1, -1)], q, seed)
    d = x.mean(0) - mu[0]
    cov = torch.cov(x.T).reshape(q, q)
    t2 = float(n * d @ torch.linalg.solve(cov, d))
    f = (n - q) / (q * (n - 1)) * t2
    return {"t2": t2, "dims": q, "df1": float(q), "df2": float(n - q), "p_value": f_sf(f, q, n - q),
            "projected": q < p}


def two_sample(est: Tensor, ref: Tensor, *, dims: int | None = None, seed: int = 0) -> dict:
    """Test mean(est) == mean(ref) for independent estimates (n1, p) and (n2, p) with unequal covariances."""
    est, ref = est.double(), ref.double()
    (n1, p), n2 = est.shape, ref.shape[0]
    q = dims or reduced_dims(p, min(n1, n2))
    if not 1 <= q < min(n1, n2):
        raise ValueError(f"a two-sample T^2 test in {q} dimensions needs more than {q} estimates in each sample")
    x1, x2 = _project([est, ref], q, seed)
    v1, v2 = torch.cov(x1.T).reshape(q, q) / n1, torch.cov(x2.T).reshape(q, q) / n2
    w_inv = torch.linalg.inv(v1 + v2)
    d = x1.mean(0) - x2.mean(0)
    t2 = float(d @ w_inv @ d)
    denom = sum((float(torch.trace(m @ m)) + float(torch.trace(m)) ** 2) / (n - 1)
                for m, n in ((v1 @ w_inv, n1), (v2 @ w_inv, n2)))
    nu = (q + q * q) / denom
    df2 = nu - q + 1
    if not df2 > 0:
        raise ValueError(f"too few estimates for a two-sample T^2 test in {q} dimensions (nu = {nu:.1f})")
    f = df2 / (q * nu) * t2
    return {"t2": t2, "dims": q, "df1": float(q), "df2": df2, "p_value": f_sf(f, q, df2), "projected": q < p}
