"""Baselines and advantages A = R - b for the likelihood-ratio and zeroth-order terms.

Unbiasedness needs b independent of the sample's own noise: leave-one-out (per prompt group) and an
EMA of *earlier* batches qualify; dividing by a batch std (DDPO, the official RLR code) does not,
and is offered for fidelity only. Samples with a non-finite reward get A = 0 and are left out of
every statistic.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

BaselineKind = Literal["loo", "ema", "none", "batch_norm", "per_prompt_norm"]
BASELINES: tuple[str, ...] = ("loo", "ema", "none", "batch_norm", "per_prompt_norm")


@dataclass
class BaselineState:
    """Mutable statistics carried across batches (owned by the trainer, checkpointed with it)."""

    ema_decay: float = 0.9
    ema_value: float | None = None
    per_prompt_buffer: int = 32
    history: dict[int, deque] = field(default_factory=lambda: defaultdict(deque))

    def state_dict(self) -> dict:
        return {"ema_value": self.ema_value, "history": {int(k): list(v) for k, v in self.history.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.ema_value = state["ema_value"]
        self.history = defaultdict(deque, {int(k): deque(v) for k, v in state["history"].items()})


def _loo(r: Tensor, valid: Tensor) -> Tensor:
    n = valid.sum()
    if n < 2:
        return torch.zeros_like(r)
    total = r[valid].sum()
    return torch.where(valid, r - (total - r) / (n - 1), torch.zeros_like(r))


def compute_advantages(rewards: Tensor, kind: str = "loo", *, groups: Tensor | None = None,
                       state: BaselineState | None = None, clip: float | None = None) -> Tensor:
    """(B,) advantages. ``groups`` (B,) prompt ids make ``loo`` / ``per_prompt_norm`` per prompt."""
    if kind not in BASELINES:
        raise ValueError(f"unknown baseline {kind!r}; choose one of {list(BASELINES)}")
    r = rewards.detach().double()
    valid = torch.isfinite(r)
    r = torch.where(valid, r, torch.zeros_like(r))
    zeros = torch.zeros_like(r)
    if kind == "none":
        adv = r
    elif kind == "loo":
        adv = _loo(r, valid)
        if groups is not None:
            for g in groups.unique():
                members = (groups == g) & valid
                if members.sum() >= 2:  # singleton groups keep the batch leave-one-out baseline
                    adv = torch.where(members, _loo(r, members), adv)
    elif kind == "ema":
        if state is None:
            raise ValueError("the 'ema' baseline needs a BaselineState carried across batches")
        base = state.ema_value
        adv = r if base is None else r - base  # first batch: no baseline (a constant keeps it unbiased)
        if valid.any():
            m = float(r[valid].mean())
            state.ema_value = m if base is None else state.ema_decay * base + (1 - state.ema_decay) * m
    elif kind == "batch_norm":
        v = r[valid]
        std = float(v.std()) if v.numel() > 1 else 0.0
        adv = (r - v.mean()) / (std if std > 0 else 1.0)
    else:  # per_prompt_norm: ddpo-pytorch's PerPromptStatTracker
        if groups is None:
            groups = torch.zeros_like(r, dtype=torch.long)
        adv = zeros.clone()
        for g in groups.unique().tolist():
            members = (groups == g) & valid
            vals = r[members]
            if state is not None:
                buf = state.history[int(g)]
                buf.extend(vals.tolist())
                while len(buf) > state.per_prompt_buffer:
                    buf.popleft()
                hist = torch.tensor(list(buf), dtype=r.dtype)
            else:
                hist = vals
            mean = hist.mean() if hist.numel() else 0.0
            std = float(hist.std()) if hist.numel() > 1 else 0.0
            adv = torch.where(members, (r - mean) / (std + 1e-6), adv)
    adv = torch.where(valid, adv, zeros)
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return adv.to(rewards.dtype)
