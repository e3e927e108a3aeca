"""Baselines and advantages A = R - b for the likelihood-ratio and zeroth-order terms.

Unbiasedness needs b independent of the sample's own noise: leave-one-out (per prompt group) and an
EMA of *earlier* batches qualify; dividing by a batch std (DDPO, the official RLR code) does not,
and is offered for fidelity only. Samples with a non-finite reward get A = 0 and are left out of
every statistic.

A sample with no other valid sample in its batch (batch size 1, or every other reward NaN) has no
leave-one-out partner. Its baseline is then the running mean of *earlier* batches' rewards (its
prompt's when that prompt was seen, else all prompts'), kept in the ``BaselineState``; with no
state or no history yet, b = 0. Both are independent of the sample, so the estimate stays unbiased
(with more variance than a leave-one-out baseline gives).
"""

from __future__ import annotations

import logging
from collections import defaultdict, deque
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .notes import log_once

BASELINES: tuple[str, ...] = ("loo", "ema", "none", "batch_norm", "per_prompt_norm")


@dataclass
class BaselineState:
    """Mutable statistics carried across batches (owned by the trainer, checkpointed with it)."""

    ema_decay: float = 0.9
    ema_value: float | None = None  # EMA of earlier batches' mean reward
    per_prompt_buffer: int = 32
    history: dict[int, deque] = field(default_factory=lambda: defaultdict(deque))
    prompt_ema: dict[int, float] = field(default_factory=dict)  # EMA of earlier batches' mean reward, per prompt

    def state_dict(self) -> dict:
        return {"ema_value": self.ema_value, "history": {int(k): list(v) for k, v in self.history.items()},
                "prompt_ema": {int(k): v for k, v in self.prompt_ema.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.ema_value = state["ema_value"]
        self.history = defaultdict(deque, {int(k): deque(v) for k, v in state["history"].items()})
        self.prompt_ema = {int(k): float(v) for k, v in state.get("prompt_ema", {}).items()}  # older checkpoints: none

    def earlier_mean(self, group: int) -> float | None:
        """The running mean of earlier batches: the prompt's own, else all prompts', else None."""
        return self.prompt_ema.get(int(group), self.ema_value)

    def observe(self, r: Tensor, valid: Tensor, groups: Tensor) -> None:
        """Fold this batch's valid rewards into the running means (call after its advantages are computed)."""
        if not valid.any():
            return
        d = self.ema_decay
        m = float(r[valid].mean())
        self.ema_value = m if self.ema_value is None else d * self.ema_value + (1 - d) * m
        for g in groups[valid].unique().tolist():
            m = float(r[valid & (groups == g)].mean())
            old = self.prompt_ema.get(int(g))
            self.prompt_ema[int(g)] = m if old is None else d * old + (1 - d) * m


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
    groups = groups.to(r.device) if groups is not None else None  # prompt ids may be made on the CPU
    group_ids = groups if groups is not None else torch.zeros_like(r, dtype=torch.long)
    if kind == "none":
        adv = r
    elif kind == "loo":
        if valid.sum() == 1:  # nobody to leave one out with: earlier batches' mean (independent of the sample)
            (i,) = valid.nonzero()[:, 0].tolist()
            base = state.earlier_mean(int(group_ids[i])) if state is not None else None
            log_once("loo-single", logging.WARNING, "a batch with a single valid sample has no leave-one-out "
                     "baseline; using the running mean of earlier batches (0 before the first); still unbiased")
            adv = r - (base or 0.0)
        else:
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
                hist = torch.tensor(list(buf), dtype=r.dtype, device=r.device)
            else:
                hist = vals
            mean = hist.mean() if hist.numel() else 0.0
            std = float(hist.std()) if hist.numel() > 1 else 0.0
            adv = torch.where(members, (r - mean) / (std + 1e-6), adv)
    if valid.sum() < 2 and (kind == "batch_norm" or kind == "per_prompt_norm" and state is None):
        log_once(f"{kind}-single", logging.WARNING, "baseline %r with fewer than 2 valid samples: every "
                 "advantage is 0, so the likelihood-ratio terms are 0 (use 'loo' or 'ema', or a larger batch)", kind)
    if state is not None and kind in ("loo", "ema"):
        state.observe(r, valid, group_ids)
    adv = torch.where(valid, adv, zeros)
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return adv.to(rewards.dtype)
