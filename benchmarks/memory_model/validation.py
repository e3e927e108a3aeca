"""The composition checked against whole estimator updates on small SD-shaped stacks (benchmarks.stacks): each
update measured end to end against the prediction from the same stack's step and reward segments."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch

from .measure import SegmentMemory, live_bytes_trace, measure_nograd, measure_segment
from .model import chain_store_bytes, checkpointed, full_bp_phases, update_phases


@dataclass(frozen=True)
class ValidationCase:
    model: str  # benchmarks.stacks model
    estimator: str  # rlr | full_bp | full_bp_ckpt | ddpo
    T: int
    batch: int
    pixels: int
    h: int = 2
    fo_steps: int = 1

    @property
    def key(self) -> str:
        return (f"validation/{self.model}/{self.estimator}/T{self.T}/h{self.h}/fo{self.fo_steps}/B{self.batch}/"
                f"px{self.pixels}")


def validation_cases(quick: bool) -> list[ValidationCase]:
    """Whole updates to check the composition on: T, h, FO steps, batch, resolution and model varied."""
    V = ValidationCase
    if quick:
        return [V("sd-small", "rlr", 6, 2, 64), V("sd-small", "rlr", 8, 2, 64, h=4, fo_steps=3)]
    return [V("sd-small", "rlr", 6, 2, 64), V("sd-small", "rlr", 12, 2, 64), V("sd-small", "rlr", 8, 2, 64, h=4),
            V("sd-small", "rlr", 6, 4, 64), V("sd-small", "rlr", 8, 2, 64, fo_steps=4), V("sd-mid", "rlr", 6, 2, 64),
            V("sd-small", "full_bp", 6, 2, 64), V("sd-small", "full_bp_ckpt", 6, 2, 64),
            V("sd-small", "ddpo", 6, 2, 64)]


def stack_components(problem, latent_shape: tuple[int, ...], *, device: str | torch.device = "cpu",
                     measure: Callable[[Callable[[], torch.Tensor]], SegmentMemory] | None = None
                     ) -> tuple[SegmentMemory, SegmentMemory]:
    """Measure a stack's step (rlr_backend.sampling.model_step: CFG UNet call + DDIM step, input
    requiring grad) and its reward (decode + reward) as segments, on the stack itself. ``measure``
    (default: the CPU profiler's ``measure_segment`` + ``measure_nograd``) measures one forward; a GPU
    passes its own, with the latents on ``device``."""
    from rlr_backend.sampling import model_step

    g = torch.Generator().manual_seed(0)
    x = torch.randn(latent_shape, generator=g).to(device)
    k = problem.num_steps // 2

    def step_fwd() -> torch.Tensor:
        return model_step(problem.model, problem.schedule, problem.prompts, k, x.requires_grad_(True), None).mean

    def reward_fwd() -> torch.Tensor:
        return problem.reward(x.requires_grad_(True))

    measure = measure or (lambda fwd: replace(measure_segment(fwd), nograd=measure_nograd(fwd)))
    return measure(step_fwd), measure(reward_fwd)


def validate(case: ValidationCase) -> dict:
    """Measured peak of one whole update on a benchmarks.stacks stack vs the composed prediction."""
    from benchmarks.stacks import build_stack

    stack = build_stack(case.model, num_steps=case.T, batch=case.batch, pixels=case.pixels)
    res = validate_problem(stack.problem, stack.latent_shape, stack.weight_bytes, case.estimator, case.h,
                           case.fo_steps)
    return {**asdict(case), "key": case.key, "component": "validation", **res}


def validate_problem(problem, latent_shape: tuple[int, ...], weights: int, estimator: str, h: int = 2,
                     fo_steps: int = 1) -> dict:
    """Run one ``estimator`` update (rlr | full_bp | full_bp_ckpt | ddpo) on ``problem`` and measure its
    peak (weights + peak tensor allocations, as benchmarks.cost does); measure the problem's step and
    reward segments separately and compose them; return both and the relative error."""
    from rlr_backend.estimators import (BaselineState, DDPOConfig, FullBPConfig, RLRConfig, ddpo_estimate,
                                        full_bp_estimate, rlr_estimate)

    p, T = problem, problem.num_steps
    batch = latent_shape[0]
    x_T = torch.randn(latent_shape, generator=torch.Generator().manual_seed(0))
    fn, kw = {"rlr": (rlr_estimate, {"config": RLRConfig(h=h, fo_steps=fo_steps)}),
              "full_bp": (full_bp_estimate, {"config": FullBPConfig()}),
              "full_bp_ckpt": (full_bp_estimate, {"config": FullBPConfig(use_checkpoint=True)}),
              "ddpo": (ddpo_estimate, {"config": DDPOConfig()})}[estimator]

    def run() -> None:
        for q in p.params:
            q.grad = None
        fn(p, x_T, generator=torch.Generator().manual_seed(1), baseline_state=BaselineState(), **kw)

    run()  # warm-up
    measured = weights + live_bytes_trace(run)[0]
    step, rew = stack_components(p, latent_shape)
    px = latent_shape[-1] * latent_shape[-2]
    if estimator == "full_bp_ckpt":
        phases = full_bp_phases(checkpointed(step, 4.0 * math.prod(latent_shape)), rew, T)
    else:
        phases = update_phases(estimator, step, rew, T=T, h=h, fo_steps=fo_steps)
    act, phase = phases.peak()
    grads = 4.0 * sum(q.numel() for q in p.params)  # the LoRA gradients, allocated by the first backward
    predicted = weights + grads + chain_store_bytes(T, batch, px) + act
    return {"measured": measured, "predicted": predicted, "rel_error": predicted / measured - 1,
            "binding_phase": phase, "weights": weights, "step_peak": step.peak, "step_retained": step.retained,
            "reward_peak": rew.peak, "reward_retained": rew.retained}

