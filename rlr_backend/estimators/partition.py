"""How RLR splits the chain into first-order, half-order and zeroth-order steps, and how j is drawn.

Paper order t = T..1 (t = 1 is the last step). The normalised partition of spec §1.2:
FO = {1}, HO = S = {j, ..., j+h-1} with j in {2, ..., T-h+1}, ZO = C = {2..T} \\ S.
With a non-differentiable reward step 1 moves to ZO. Any j gives an unbiased sum (each step is
estimated exactly once), so the j distribution only changes variance and needs no reweighting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..sampling import paper_to_sampler


@dataclass(frozen=True)
class ChainSplit:
    """Sampler-order step sets (k = T - t) of one RLR draw."""

    num_steps: int
    j: int  # paper-order start of the half-order sub-chain (its step nearest x_0)
    h: int
    fo: tuple[int, ...]  # sampler indices; () when the reward is not differentiable
    ho: tuple[int, ...]  # ascending sampler indices; ho[-1] is the step whose noise is "borrowed"
    zo: tuple[int, ...]


def split_chain(num_steps: int, h: int, j: int, *, reward_differentiable: bool = True,
                fo_steps: int = 1) -> ChainSplit:
    """Partition the steps for a given j (paper order); raises on an impossible (h, j).

    ``fo_steps`` = K > 1 generalises the first-order part to the last K steps (backprop through
    them, DRaFT-K style); S and C then cover {K+1..T}. The sum stays unbiased.
    """
    check_h(h, num_steps, fo_steps)
    lo, hi = fo_steps + 1, num_steps - h + 1
    if not lo <= j <= hi:
        raise ValueError(f"j={j} is outside {lo}..{hi} (paper order, T={num_steps}, h={h}, fo_steps={fo_steps})")
    ho = tuple(sorted(paper_to_sampler(t, num_steps) for t in range(j, j + h)))
    fo = tuple(sorted(paper_to_sampler(t, num_steps) for t in range(1, fo_steps + 1))) if reward_differentiable else ()
    zo = tuple(k for k in range(num_steps) if k not in ho and k not in fo)
    return ChainSplit(num_steps, j, h, fo, ho, zo)


def likelihood_ratio_steps(num_steps: int, h: int, js, *, latent_zo: bool, reward_differentiable: bool = True,
                           fo_steps: int = 1) -> set[int]:
    """Sampler steps at which RLR takes a likelihood ratio for some j in ``js`` (paper order), so they must be
    stochastic: the half-order term's last step (paper step j) and, with ``latent_zo`` (zo_mode 'latent_lr'),
    every zeroth-order step. Pathwise steps (first-order, the rest of S) and parameter-space zeroth-order steps
    may be deterministic (an ODE step of a flow chain outside its SDE window)."""
    js = list(js)
    need = {paper_to_sampler(j, num_steps) for j in js}
    if latent_zo and js:
        fo = set(range(num_steps - fo_steps, num_steps)) if reward_differentiable else set()
        # a step is zeroth-order for some j unless it is first-order or in every S = {j..j+h-1}
        in_every_s = {paper_to_sampler(t, num_steps) for t in range(max(js), min(js) + h)}
        need |= set(range(num_steps)) - fo - in_every_s
    return need


def check_h(h: int, num_steps: int, fo_steps: int = 1) -> None:
    if h < 1:
        raise ValueError(f"the half-order sub-chain length h must be >= 1, got {h}")
    if fo_steps < 1:
        raise ValueError(f"fo_steps must be >= 1, got {fo_steps}")
    if h + fo_steps > num_steps:
        raise ValueError(
            f"h={h} leaves no room for the first-order step(s): use h <= T-fo_steps = {num_steps - fo_steps} "
            f"(or more sampling steps)"
        )


J_DISTRIBUTIONS: tuple[str, ...] = ("uniform", "range", "softmax_gradnorm")


@dataclass
class JSampler:
    """Draws the HO start j (paper order).

    * ``uniform``: j ~ U{2..T-h+1} (Thm 6.3).
    * ``range``: j ~ U{a..b} (DCoT: focus on the steps where the image is weak), ``a..b`` inside the chain.
    * ``softmax_gradnorm``: P(j) = (1-floor) softmax(log-norm EMA / temperature) + floor * uniform,
      where the EMA tracks the HO gradient norm seen at each j (paper §3.2).
    """

    kind: str = "uniform"
    j_range: tuple[int, int] | None = None
    temperature: float = 1.0
    uniform_floor: float = 0.2
    ema_decay: float = 0.9
    norms: dict[int, float] = field(default_factory=dict)

    def support(self, num_steps: int, h: int, fo_steps: int = 1) -> range:
        check_h(h, num_steps, fo_steps)
        lo, hi = fo_steps + 1, num_steps - h + 1
        if self.kind == "range":
            if self.j_range is None:
                raise ValueError("j distribution 'range' needs j_range=(a, b)")
            a, b = self.j_range
            if not lo <= a <= b <= hi:
                raise ValueError(
                    f"j range ({a}, {b}) must lie inside {lo}..{hi} (paper order: t=1 is the last step; T={num_steps}, h={h})"
                )
            return range(a, b + 1)
        if self.kind in ("uniform", "softmax_gradnorm"):
            return range(lo, hi + 1)
        raise ValueError(f"unknown j distribution {self.kind!r}; choose 'uniform', 'range' or 'softmax_gradnorm'")

    def probabilities(self, num_steps: int, h: int, fo_steps: int = 1) -> tuple[list[int], torch.Tensor]:
        js = list(self.support(num_steps, h, fo_steps))
        uniform = torch.full((len(js),), 1.0 / len(js), dtype=torch.float64)
        if self.kind != "softmax_gradnorm" or not self.norms:
            return js, uniform
        mean_norm = sum(self.norms.values()) / len(self.norms)
        logits = torch.tensor([math.log(self.norms.get(j, mean_norm) + 1e-12) for j in js], dtype=torch.float64)
        soft = torch.softmax(logits / self.temperature, 0)
        return js, (1 - self.uniform_floor) * soft + self.uniform_floor * uniform

    def draw(self, num_steps: int, h: int, generator: torch.Generator | None = None, fo_steps: int = 1) -> int:
        js, p = self.probabilities(num_steps, h, fo_steps)
        return js[int(torch.multinomial(p, 1, generator=generator))]

    def observe(self, j: int, grad_norm: float) -> None:
        if math.isfinite(grad_norm):
            old = self.norms.get(j)
            self.norms[j] = grad_norm if old is None else self.ema_decay * old + (1 - self.ema_decay) * grad_norm
