"""``rlr-advise``: which estimator to train with, measured on the user's own model, reward and prompts.

On a few batches (common random numbers, so every estimator sees the same images) it measures, for
each candidate estimator:

* **bias** of the backprop estimators that skip steps (truncated backprop): from the per-step shares
  of the full-backprop gradient (``estimators/per_step.py``), the cosine of its mean gradient to full
  backprop's and the share of full backprop's gradient it recovers along that direction. The other
  candidates are unbiased by construction (tested on a chain with a known gradient), so theirs is 0.
* **noise x cost**: the total variance of one update's gradient (trace of its covariance over the
  batches) times the CPU (or GPU) seconds of one update. Lower is better; for an unbiased estimator it
  is what decides how fast it learns per second.
* **peak memory** of one update (beyond the weights).

The recommendation: when truncated backprop is nearly unbiased for this reward (cosine and recovered
share above the thresholds below), its low noise wins and it is recommended; otherwise the unbiased
candidate with the lowest noise x cost. The thresholds come from docs/estimators.md's measurements.
This rule answers "which gradient is right"; ``--estimator auto`` answers "which trains well for least
cost" (truncated backprop: about 90% or more of the best gain on every differentiable task measured, at a
third or less of full backprop's CPU time), and the advice says so when they differ.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from .estimators import BaselineState, get_estimator
from .estimators.per_step import cosine_with_se, flat, per_step_gradients, projection_with_se
from .train.config import TrainConfig, measured_lr
from .train.memory import peak_allocated

logger = logging.getLogger(__name__)

#: truncated backprop counts as nearly unbiased above both (cosine to full backprop, share recovered)
COSINE_OK, SHARE_OK = 0.9, 0.5

#: candidate -> TrainConfig changes; "full_bp + ckpt" is full backprop with gradient checkpointing
CANDIDATES: dict[str, dict] = {
    "rlr": {"estimator": "rlr"},
    "rlr paper (fo_steps=1)": {"estimator": "rlr", "fo_steps": 1, "step_baseline": False},  # the paper's estimator
    "ddpo": {"estimator": "ddpo"},
    "truncated_bp (K=2)": {"estimator": "truncated_bp", "truncation": 2},
    "full_bp + ckpt": {"estimator": "full_bp", "gradient_checkpointing": True},
}


@dataclass
class Measured:
    name: str
    unbiased: bool
    variance: float = float("nan")  # trace of the per-update gradient's covariance
    seconds: float = float("nan")  # CPU (or GPU wall) seconds of one update
    peak_mb: float = float("nan")
    cosine: tuple[float, float] | None = None  # (value, standard error) to full backprop's mean gradient
    share: tuple[float, float] | None = None  # share of full backprop's gradient recovered along its direction
    skipped: str = ""

    @property
    def noise_x_cost(self) -> float:
        return self.variance * self.seconds


@dataclass
class Advice:
    config: TrainConfig
    batches: int
    measured: list[Measured]
    recommended: str
    reasons: list[str] = field(default_factory=list)
    step_share: list[float] = field(default_factory=list)  # where the gradient lives, sampler order
    reward_differentiable: bool = True


def _timer(device: torch.device) -> Callable[[], float]:
    if device.type == "cuda":
        def clock() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()
        return clock
    return time.process_time


def advise(config: TrainConfig, *, batches: int = 4, progress: Callable[[int, int, str], None] | None = None,
           model=None, measure_memory: bool = True) -> Advice:
    """Measure every candidate estimator on ``batches`` batches of ``config``'s model, reward and prompts
    (``measure_memory``: the peak of each estimator's first update; on a CPU it runs under the profiler)."""
    if batches < 2:
        raise ValueError(f"batches must be >= 2 (a variance needs two), got {batches}")
    from .train import Trainer

    with tempfile.TemporaryDirectory() as tmp:  # the trainer is used for its model, never writes here
        base = replace(config, estimator="rlr", output_dir=Path(tmp), run_name="advise", eval_every=0)
        trainer = Trainer(base, progress=False, model=model)
    reward, device, clock = trainer.reward, trainer.device, _timer(trainer.device)
    candidates = {name: kw for name, kw in CANDIDATES.items()
                  if reward.differentiable or not get_estimator(kw["estimator"]).needs_differentiable_reward}
    g = torch.Generator().manual_seed(config.seed)
    draws = []
    for _ in range(batches):
        groups = config.batch_size // config.images_per_prompt
        ids = torch.randint(0, len(config.prompts), (groups,), generator=g).repeat_interleave(config.images_per_prompt)
        draws.append((ids.tolist(), torch.randn((config.batch_size, *trainer.latent_shape), generator=g),
                      int(torch.randint(0, 2**62, (1,), generator=g))))
    total = batches * (len(candidates) + (1 if reward.differentiable else 0))
    done = 0

    def tick(what: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total, what)

    shares = []
    if reward.differentiable:
        for ids, x_T, seed in draws:
            shares.append(per_step_gradients(trainer.problem(ids), x_T.to(device),
                                             generator=torch.Generator().manual_seed(seed)).shares.double())
            tick("per-step gradient shares")
    full = torch.stack(shares).sum(1) if shares else None
    measured = []
    for name, kw in candidates.items():
        cfg = replace(base, **kw)
        spec = get_estimator(cfg.estimator)
        est_config = cfg.estimator_config()
        grads, secs, peak = [], [], float("nan")
        for i, (ids, x_T, seed) in enumerate(draws):
            problem = trainer.problem(ids)
            for p in trainer.params:
                p.grad = None

            def call() -> None:
                spec.fn(problem, x_T.to(device), config=est_config, generator=torch.Generator().manual_seed(seed),
                        baseline_state=BaselineState(), j_sampler=trainer.state.j_sampler)

            t0 = clock()
            if i == 0 and measure_memory:
                peak = peak_allocated(call, device)
            else:
                call()
            secs.append(clock() - t0)
            grads.append(-flat(p.grad if p.grad is not None else torch.zeros_like(p) for p in trainer.params).double())
            tick(name)
        v = torch.stack(grads)
        m = Measured(name, spec.unbiased, variance=float(v.var(0).sum()),
                     seconds=sorted(secs)[len(secs) // 2], peak_mb=peak / 2**20)
        if full is not None:
            m.cosine, m.share = cosine_with_se(v, full), projection_with_se(v, full)
        measured.append(m)
    step_share = []
    if shares:
        s = torch.stack(shares)
        mean_full = full.mean(0)
        step_share = ((s.mean(0) @ mean_full) / float(mean_full @ mean_full)).tolist()
    recommended, reasons = recommend(measured)
    return Advice(config, batches, measured, recommended, reasons, step_share, bool(reward.differentiable))


def recommend(measured: list[Measured]) -> tuple[str, list[str]]:
    """The rule in the module docstring; returns (name, the reasons in words with their figures)."""
    unbiased = [m for m in measured if m.unbiased and m.noise_x_cost == m.noise_x_cost]
    best = min(unbiased, key=lambda m: m.noise_x_cost)
    reasons = [f"lowest noise x cost among the unbiased estimators: {best.name} ({best.noise_x_cost:.3g}; "
               + ", ".join(f"{m.name} {m.noise_x_cost:.3g}" for m in unbiased if m is not best) + ")"]
    for m in measured:
        if m.unbiased or m.cosine is None:
            continue
        cos, share = m.cosine[0], m.share[0]
        if cos >= COSINE_OK and share >= SHARE_OK:
            reasons.append(f"{m.name} is nearly unbiased for this reward (cosine {cos:.2f} >= {COSINE_OK}, recovers "
                           f"{share:.0%} >= {SHARE_OK:.0%} of the full gradient) and its noise x cost is "
                           f"{m.noise_x_cost:.3g}: low noise wins")
            if m.noise_x_cost < best.noise_x_cost:
                return m.name, reasons
        else:
            reasons.append(f"{m.name} is biased for this reward: cosine {cos:.2f} to full backprop's gradient, "
                           f"recovers {share:.0%} of it (thresholds {COSINE_OK} and {SHARE_OK:.0%}); it optimises "
                           "the last steps only")
            reasons.append(f"but on every differentiable task measured on the embedded model a biased {m.name} "
                           "reached about 90% or more of the best estimator's gain (its noise is lower), in a third "
                           "or less of full backprop's CPU time where both ran, which is why --estimator auto uses "
                           "it; unbiased estimators went further where the reward needs early changes and the "
                           "chain is long (position:left and size:0.4 at T=50; docs/estimators.md)")
    return best.name, reasons


def format_advice(advice: Advice) -> str:
    cfg = advice.config
    lines = [f"rlr-advise: {cfg.model or 'the embedded default model'}, reward {cfg.reward}, T={cfg.num_inference_steps}, "
             f"batch {cfg.batch_size}, {advice.batches} batches", "",
             f"{'estimator':<24} {'unbiased':>8} {'cos to full':>12} {'share':>7} {'variance':>10} {'s/update':>9} "
             f"{'noise x cost':>13} {'peak MB':>8}"]
    for m in advice.measured:
        cos = f"{m.cosine[0]:.2f}±{m.cosine[1]:.2f}" if m.cosine else "-"
        share = f"{m.share[0]:.2f}" if m.share else "-"
        lines.append(f"{m.name:<24} {'yes' if m.unbiased else 'NO':>8} {cos:>12} {share:>7} {m.variance:>10.3g} "
                     f"{m.seconds:>9.2f} {m.noise_x_cost:>13.3g} {m.peak_mb:>8.0f}")
    if advice.step_share:
        n = len(advice.step_share)
        last = sum(advice.step_share[-max(1, n // 10):])
        lines += ["", f"the last {max(1, n // 10)} of {n} steps carry {last:.0%} of the full-backprop gradient "
                      f"(along its direction); the first half carries {sum(advice.step_share[:n // 2]):.0%}"]
    lines += ["", f"recommended: {advice.recommended}"] + [f"  - {r}" for r in advice.reasons]
    lines += [f"train with: rlr-train (your options) "
              f"{candidate_flags(advice.recommended, cfg, advice.reward_differentiable)}"]
    return "\n".join(lines)


def candidate_flags(name: str, config: TrainConfig, reward_differentiable: bool) -> str:
    """rlr-train's options for a candidate, and the learning rate it will train at: the one given, else the
    estimator's measured rate (``TrainConfig.resolve``)."""
    kw = CANDIDATES[name]
    flags = [f"--estimator {kw['estimator']}"]
    for key, value in kw.items():
        if key == "estimator":
            continue
        option = "--" + key.replace("_", "-")
        flags.append(option if value is True else f"--no-{option[2:]}" if value is False else f"{option} {value}")
    sb = kw.get("step_baseline", config.step_baseline)
    lr = config.lr if config.lr is not None else measured_lr(kw["estimator"], sb, reward_differentiable)
    return " ".join(flags) + f" (lr {lr:g}{'' if config.lr is not None else ', its default'})"
