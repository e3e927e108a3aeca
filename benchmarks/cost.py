"""Cost of one update per estimator: wall time and peak memory as ratios to a no-grad sample.

The baseline (a no-grad sample of the same batch, plus the reward) is re-timed right before every
case, so machine load hits both sides of a ratio alike. Memory = weights + peak tensor allocations
during the call (from the profiler's allocation events).

Cost model, in UNet forward-equivalents of one batch (a backward costs about 2 forwards):
sampling T forwards (every estimator samples first); then first-order: K forward+backward
(+ decoder and reward backward); half-order: h forward+backward; zeroth-order param_1pt: nothing,
param_2pt: 2T forwards, latent_lr: T-K-h forward+backward; DDPO and zo: T forward+backward;
truncated_bp: K backward (its forwards are the last sampling steps); full_bp: 2T backward
(checkpointing: +T forwards). Predicted ratio = (forwards + 2 x backpropagated forwards) / T,
counted by each estimator in its metrics.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from rlr_backend.estimators import (BaselineState, CodeCompatConfig, DDPOConfig, FullBPConfig, RLRConfig,
                                    TruncatedBPConfig, ZOConfig, code_compat_estimate, ddpo_estimate,
                                    full_bp_estimate, rlr_estimate, truncated_bp_estimate, zo_estimate)
from rlr_backend.sampling import sample_chain

from .common import peak_allocated, timed
from .stacks import build_stack

logger = logging.getLogger(__name__)


#: cases that run with the stack's gradient checkpointing (UNet blocks + one-image decode) switched on
CHECKPOINTED = ("rlr latent_lr h=2 + checkpointing", "rlr param_1pt h=2 + checkpointing", "full_bp + checkpointing")


def estimator_cases() -> dict:
    """Every estimator configuration the cost tables cover: name -> (function, keyword arguments).
    Names in CHECKPOINTED also run with the trainer's ``--gradient-checkpointing`` memory savings."""
    c = {}
    for mode in ("latent_lr", "param_1pt", "param_2pt"):
        for h in (1, 2, 4):
            extra = {"baseline": "ema"} if mode == "param_1pt" else {}
            c[f"rlr {mode} h={h}"] = (rlr_estimate, {"config": RLRConfig(h=h, zo_mode=mode, **extra)})
    c["rlr latent_lr h=2 fo_steps=4"] = (rlr_estimate, {"config": RLRConfig(h=2, fo_steps=4)})
    c["rlr latent_lr h=2 + checkpointing"] = (rlr_estimate, {"config": RLRConfig(h=2, use_checkpoint=True)})
    c["rlr param_1pt h=2 + checkpointing"] = (rlr_estimate, {"config": RLRConfig(
        h=2, zo_mode="param_1pt", baseline="ema", use_checkpoint=True)})
    c["code_compat"] = (code_compat_estimate, {"config": CodeCompatConfig()})
    c["ddpo"] = (ddpo_estimate, {"config": DDPOConfig()})
    c["zo"] = (zo_estimate, {"config": ZOConfig()})
    for k in (1, 2, 5):
        c[f"truncated_bp K={k}"] = (truncated_bp_estimate, {"config": TruncatedBPConfig(k=k)})
    c["full_bp"] = (full_bp_estimate, {"config": FullBPConfig()})
    c["full_bp + checkpointing"] = (full_bp_estimate, {"config": FullBPConfig(use_checkpoint=True)})
    return c


def predicted_time_ratio(metrics: dict, num_steps: int) -> float:
    """The cost model's time of an update over a no-grad sample: (forwards + 2 x backpropagated forwards) / T,
    from the model calls an estimator counts in its metrics."""
    return (metrics.get("model_calls", 0.0) + 2 * metrics.get("model_calls_with_grad", 0.0)) / num_steps


def measure_costs(model: str, num_steps: int, batch: int, names: list[str], pixels: int | None = None,
                  timing: bool = True) -> list[dict]:
    """One row per case: seconds, bytes, their ratios to a no-grad sample, and the predicted time ratio."""
    cases = estimator_cases()
    stack = build_stack(model, num_steps=num_steps, batch=batch, pixels=pixels)
    p = stack.problem
    x_T = torch.randn(stack.latent_shape, generator=torch.Generator().manual_seed(0))

    def sample():
        with torch.no_grad():
            t = sample_chain(p.model, p.schedule, p.prompts, x_T, generator=torch.Generator().manual_seed(1))
            p.reward(t.final)

    sample()  # warm-up
    base_mem = stack.weight_bytes + peak_allocated(sample)
    rows = []
    for name in names:
        fn, kw = cases[name]
        metrics: dict = {}

        def run():
            for q in p.params:
                q.grad = None
            with stack.gradient_checkpointing() if name in CHECKPOINTED else contextlib.nullcontext():
                est = fn(p, x_T, generator=torch.Generator().manual_seed(1), baseline_state=BaselineState(), **kw)
            metrics.update(est.metrics)

        run()  # warm-up
        base_t = timed(sample, 2) if timing else float("nan")
        t = timed(run) if timing else float("nan")
        mem = stack.weight_bytes + peak_allocated(run)
        predicted = predicted_time_ratio(metrics, num_steps)
        rows.append({"model": model, "pixels": stack.pixels, "unet_params": stack.unet_params, "T": num_steps,
                     "batch": batch, "estimator": name, "seconds": t, "sample_seconds": base_t,
                     "time_ratio": t / base_t, "predicted_time_ratio": predicted, "bytes": mem,
                     "sample_bytes": base_mem, "memory_ratio": mem / base_mem,
                     "steps_in_memory": metrics.get("steps_in_memory", float("nan"))})
        logger.info("%s T=%d B=%d %s: %.2fx time (predicted %.2fx), %.2fx memory (%.1f MB)", model, num_steps,
                    batch, name, t / base_t, predicted, mem / base_mem, mem / 1e6)
    return rows


def run_suite(quick: bool) -> dict:
    names = list(estimator_cases())
    rows = []
    if quick:
        rows += measure_costs("default", 20, 4, names)
    else:
        for T in (10, 20, 50):
            rows += measure_costs("default", T, 4, names)
        for T in (20, 50):
            rows += measure_costs("sd-small", T, 2, names, pixels=64)
    return {"rows": rows}
