"""Memory and time of one training update per estimator on the SD1.5 / SDXL architectures.

For each model (``MODELS``: the published configs at random init, built directly on the device in the
target dtype, LoRA rank 4, the aesthetic reward backpropagated through the VAE decoder, text encoders
offloaded) and each estimator variant (``VARIANTS``, configured through ``TrainConfig`` exactly as
``rlr-train`` configures them), one update (estimator + Adam step) is measured:

* peak tensor memory against two predictions: docs/memory.md's (``memory_model.predict`` on the fits
  of the CPU measurements in benchmarks/results/memory-model.json; "docs") and the same composition fed
  with this device's own measurements of one UNet step and of decode + reward ("composed", which tells a
  wrong component figure from a wrong composition);
* wall time against a no-grad sample of the same batch (with the reward), beside the cost model's
  predicted ratio (model calls counted by the estimator, see benchmarks/cost.py).

An update predicted not to fit the card (docs prediction + margin above its memory, or above what is
free now) is skipped; an out-of-memory error is caught and recorded as a failed prediction.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, replace
from typing import Callable

import torch

from rlr_backend.estimators import BaselineState, RecomputationMismatch, get_estimator
from rlr_backend.sampling import sample_chain
from rlr_backend.train import TrainConfig
from rlr_backend.train.memory import PRECISIONS

from .. import memory_model as mm
from ..cost import predicted_time_ratio
from ..stacks import Stack, build_arch_stack
from . import device as dev
from .runner import release_memory

logger = logging.getLogger(__name__)

T, H = 50, 2  # the chain and RLR's half-order length of every prediction in docs/memory.md
TINY_T = 6  # --tiny: a short chain (h + fo_steps = 6 still fits)
GB = mm.GB


@dataclass(frozen=True)
class ModelPlan:
    arch: str  # memory model architecture
    batch: int
    precision: str  # rlr-train --precision
    label: str
    build_s: float  # rough time to build, measure parts and time a sample on an H200-class GPU (budget guard)


MODELS: dict[str, ModelPlan] = {
    "sd15": ModelPlan("sd15", 4, "fp16", "SD1.5 512 px fp16", 30.0),
    "sdxl": ModelPlan("sdxl", 1, "bf16", "SDXL 1024 px bf16", 60.0),
}


@dataclass(frozen=True)
class Variant:
    """An estimator as ``rlr-train --estimator NAME [--fo-steps K] [--gradient-checkpointing]`` runs it."""

    key: str  # --variants
    name: str
    estimator: str
    fo_steps: int | None = None  # rlr: None = TrainConfig's default (the project's recipe)
    checkpointing: bool = False
    time_ratio_guess: float = 4.5  # update time / no-grad sample, for the budget guard only

    def config(self, num_steps: int = T) -> TrainConfig:
        extra = {} if self.fo_steps is None else {"fo_steps": self.fo_steps}
        return TrainConfig(estimator=self.estimator, num_inference_steps=num_steps, h=H,
                           gradient_checkpointing=self.checkpointing, **extra)

    def window(self) -> int:
        """Steps backpropagated through the reward: RLR's first-order window, truncated backprop's K."""
        cfg = self.config()
        return cfg.truncation if self.estimator == "truncated_bp" else cfg.fo_steps


DEFAULT_FO, PAPER_FO = TrainConfig.fo_steps, 1
VARIANTS: tuple[Variant, ...] = (
    Variant("rlr", f"rlr default (fo_steps={DEFAULT_FO})", "rlr"),
    Variant("rlr-ckpt", f"rlr default (fo_steps={DEFAULT_FO}) + checkpointing", "rlr", checkpointing=True,
            time_ratio_guess=5.5),
    Variant("rlr-paper", f"rlr paper (fo_steps={PAPER_FO})", "rlr", fo_steps=PAPER_FO),
    Variant("rlr-paper-ckpt", f"rlr paper (fo_steps={PAPER_FO}) + checkpointing", "rlr", fo_steps=PAPER_FO,
            checkpointing=True, time_ratio_guess=5.5),
    Variant("ddpo", "ddpo", "ddpo"),
    Variant("truncated", f"truncated_bp (K={TrainConfig.truncation})", "truncated_bp", time_ratio_guess=1.5),
    Variant("full-ckpt", "full_bp + checkpointing", "full_bp", checkpointing=True, time_ratio_guess=5.5),
    Variant("full", "full_bp", "full_bp", time_ratio_guess=4.0),
)
KEY_VARIANTS = 2  # the first two variants of every model run before the other variants of any model


def model_label(plan: ModelPlan, tiny: bool) -> str:
    return f"{plan.label.split()[0]}-family tiny config" if tiny else plan.label


def docs_fits() -> tuple[mm.Fits, dict[str, int]] | None:
    """The memory model behind docs/memory.md: fits of the saved CPU measurements and the parameter counts,
    with the reward counted as the image tower the check builds (not a full CLIP checkpoint)."""
    data = mm.load(mm.RESULTS)
    if not data.get("points"):
        return None
    counts = dict(data.get("counts") or mm.model_counts())
    counts["reward"] = counts["reward_vision_only"]
    return mm.fit_components(data["points"]), counts


def docs_prediction(docs: tuple[mm.Fits, dict[str, int]], arch: str, resolution: int, batch: int, num_steps: int,
                    v: Variant) -> dict:
    """docs/memory.md's prediction of one update of ``v`` (text encoders offloaded, as rlr-train does)."""
    fits, counts = docs
    s = mm.Scenario(arch, resolution, batch, T=num_steps, h=H, fo_steps=v.window())
    opts = mm.Options.from_config(mm.gpu_config(gradient_checkpointing=v.checkpointing, offload_text_encoders=True))
    return mm.predict(fits, s, opts, counts, v.estimator)


def fit_decision(predicted: float, own_bytes: float, card_bytes: float, free_bytes: float) -> str | None:
    """Why an update predicted at ``predicted`` bytes (``own_bytes`` of them already allocated: this
    stack's weights) must not run, or None. Not on the card: the prediction with the docs' margin exceeds
    the card's memory; not now: the part still to allocate, with 15%, exceeds what is free."""
    if mm.with_margin(predicted) > card_bytes:
        return (f"predicted {predicted / GB:.1f} GB ({mm.with_margin(predicted) / GB:.1f} GB with the margin) does "
                f"not fit the card's {card_bytes / GB:.1f} GB")
    need = (predicted - own_bytes) * (1 + mm.MARGIN_FRACTION)
    if need > free_bytes:
        return f"predicted to need {need / GB:.1f} GB more, {free_bytes / GB:.1f} GB free"
    return None


class Bench:
    """One architecture's stack on the device: Adam's state allocated, the step and decode + reward parts
    measured (with and without checkpointing; this also warms the kernels up) and a no-grad sample timed."""

    def __init__(self, plan: ModelPlan, *, device: torch.device, tiny: bool, docs: tuple | None):
        self.plan, self.device, self.tiny, self.docs = plan, device, tiny, docs
        dtype = PRECISIONS[plan.precision]
        if not dev.is_cuda(device):  # CPUs emulate half precision slowly: tiny configs in fp32; full-size in
            dtype = torch.float32 if tiny else torch.bfloat16  # bf16, fp16's bytes (as the memory model)
        self.dtype, self.T = dtype, TINY_T if tiny else T
        self.stack: Stack = build_arch_stack(plan.arch, tiny=tiny, batch=plan.batch, num_steps=self.T, dtype=dtype,
                                             device=device)
        p = self.stack.problem
        self.optimizer = torch.optim.Adam(p.params, lr=1e-6)
        for q in p.params:
            q.grad = torch.zeros_like(q)
        self.optimizer.step()  # allocates Adam's moments (zero gradients: the LoRA does not move)
        self.x_T = torch.randn(self.stack.latent_shape, generator=torch.Generator().manual_seed(0)).to(device)
        self.parts = {}
        if dev.is_cuda(device):  # first calls allocate for good (cuBLAS workspaces, ...): not a part's bytes
            with self.options(False):
                mm.stack_components(p, self.stack.latent_shape, device=device, measure=dev.segment(device))
        for ckpt in (False, True):  # LoRA gradients stay allocated, so they are not counted in the parts
            with self.options(ckpt):
                self.parts[ckpt] = mm.stack_components(p, self.stack.latent_shape, device=device,
                                                       measure=dev.segment(device))
        for q in p.params:
            q.grad = None
        self.sample_seconds, _ = dev.timed(self.sample, device)
        self.persistent = self.stack.weight_bytes + dev.tensor_bytes(optimizer=self.optimizer)
        logger.info("%s: %.2f GB of weights and optimizer state, no-grad sample %.2f s", self.label,
                    self.persistent / GB, self.sample_seconds)

    @property
    def label(self) -> str:
        return model_label(self.plan, self.tiny)

    @contextlib.contextmanager
    def options(self, checkpointing: bool):
        """Autocast in the stack's dtype, as the trainer runs model calls; with ``checkpointing`` the
        trainer's UNet block checkpointing and per-image decode (the step part is an estimator option)."""
        amp = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype != torch.float32 \
            else contextlib.nullcontext()
        with amp, (self.stack.gradient_checkpointing() if checkpointing else contextlib.nullcontext()):
            yield

    def sample(self) -> None:
        p = self.stack.problem
        with torch.no_grad(), self.options(False):
            traj = sample_chain(p.model, p.schedule, p.prompts, self.x_T, generator=torch.Generator().manual_seed(1))
            p.reward(traj.final)

    def predictions(self, v: Variant) -> dict:
        """Docs and composed predictions of ``v``'s peak bytes, and the binding phase."""
        model_est, k = v.estimator, v.window()
        step, rew = self.parts[v.checkpointing]
        if v.checkpointing:  # a step-level checkpoint keeps only the CFG call's input, as memory_model models it
            step = mm.checkpointed(step, input_bytes=4.0 * 2 * math.prod(self.stack.latent_shape))
        act, phase = mm.update_phases(model_est, step, rew, T=self.T, h=H, fo_steps=k).peak()
        lora = sum(q.numel() for q in self.stack.problem.params)
        b, _, lat, _ = self.stack.latent_shape
        out = {"composed_bytes": self.persistent + 4.0 * lora + mm.chain_store_bytes(self.T, b, lat * lat) + act,
               "composed_phase": phase, "predicted_bytes": None, "binding_phase": None}
        if self.docs is not None and not self.tiny:
            pred = docs_prediction(self.docs, self.plan.arch, self.stack.pixels, b, self.T, v)
            out.update(predicted_bytes=pred["bytes"], binding_phase=pred["binding_phase"])
        return out

    def update(self, v: Variant, check_recomputation: bool = True) -> Callable[[], dict]:
        """One ``rlr-train`` update of ``v`` (estimator + Adam step) on the bench's batch; returns its metrics.
        ``check_recomputation=False``: RLR skips its check that the half-order recomputation reproduces the
        sampled latents (to measure an update the check stopped)."""
        cfg = v.config(self.T)
        fn, est_cfg, p = get_estimator(v.estimator).fn, cfg.estimator_config(), self.stack.problem
        if not check_recomputation and hasattr(est_cfg, "recompute_atol"):
            est_cfg = replace(est_cfg, recompute_atol=math.inf)

        def run() -> dict:
            self.optimizer.zero_grad(set_to_none=True)
            with self.options(v.checkpointing):
                est = fn(p, self.x_T, config=est_cfg, generator=torch.Generator().manual_seed(1),
                         baseline_state=BaselineState())
            self.optimizer.step()
            return est.metrics

        return run


def measure_update(run: Callable[[], dict], device: torch.device) -> dict:
    """Peak bytes above what was live, seconds and metrics of ``run``; an out-of-memory error becomes
    ``{"oom": message, "peak_before_oom": bytes}`` (the allocator's peak up to the failed allocation)."""
    dev.synchronize(device)
    base = torch.cuda.memory_allocated(device) if dev.is_cuda(device) else 0
    try:
        peak, seconds, metrics = dev.peak_and_time(run, device)
    except torch.cuda.OutOfMemoryError as e:
        reached = torch.cuda.max_memory_allocated(device) - base if dev.is_cuda(device) else float("nan")
        return {"oom": str(e).splitlines()[0][:300], "peak_before_oom": float(reached)}
    return {"peak": peak, "seconds": seconds, "metrics": metrics}


def check_variant(bench: Bench, v: Variant, tolerance: float) -> dict:
    """The record of one update of ``v`` on ``bench`` (status pass / fail / skipped)."""
    pred = bench.predictions(v)
    ref_bytes = pred["predicted_bytes"] if pred["predicted_bytes"] is not None else pred["composed_bytes"]
    ref_name = "docs" if pred["predicted_bytes"] is not None else "composed"
    rec = {"model": bench.label, "arch": bench.plan.arch, "batch": bench.plan.batch, "T": bench.T, "h": H,
           "dtype": str(bench.dtype).split(".")[-1], "variant": v.name, "estimator": v.estimator,
           "window": v.window(), "checkpointing": v.checkpointing, "sample_seconds": bench.sample_seconds,
           "persistent_bytes": bench.persistent, "reference": ref_name, **pred}
    card = torch.cuda.get_device_properties(bench.device).total_memory if dev.is_cuda(bench.device) else math.inf
    why = fit_decision(ref_bytes, bench.persistent, card, dev.capacity_bytes(bench.device))
    if why is not None:
        return {**rec, "status": "skipped", "reason": f"predicted not to fit: {why}"}
    bench.optimizer.zero_grad(set_to_none=True)  # gradients are allocated inside the measured update
    mismatch = None
    try:
        m = measure_update(bench.update(v), bench.device)
    except RecomputationMismatch as e:  # a finding (the trainer would stop too); measure the update without it
        mismatch = f"{type(e).__name__}: {e}"
        release_memory()
        bench.optimizer.zero_grad(set_to_none=True)
        m = measure_update(bench.update(v, check_recomputation=False), bench.device)
    if "oom" in m:
        reached = bench.persistent + m["peak_before_oom"]
        return {**rec, "status": "fail", "oom": m["oom"], "measured_bytes": None, "reached_bytes": reached,
                "reason": f"out of memory although predicted to fit: predicted {ref_bytes / GB:.2f} GB ({ref_name}), "
                          f"reached {reached / GB:.2f} GB before the failed allocation ({m['oom']})"}
    measured = bench.persistent + m["peak"]
    metrics = m["metrics"]
    rec.update(measured_bytes=measured, memory_ratio=measured / ref_bytes,
               composed_ratio=measured / pred["composed_bytes"], seconds=m["seconds"],
               time_ratio=m["seconds"] / bench.sample_seconds,
               predicted_time_ratio=predicted_time_ratio(metrics, bench.T),
               reward_mean=metrics.get("reward_mean"))
    bad = {k: metrics[k] for k in ("nonfinite_rewards", "nonfinite_terms") if metrics.get(k)}
    gap = measured / ref_bytes - 1
    summary = (f"{measured / GB:.2f} GB measured, {ref_bytes / GB:.2f} GB predicted ({ref_name}, {gap:+.1%}); "
               f"{rec['time_ratio']:.2f}x a no-grad sample (cost model {rec['predicted_time_ratio']:.2f}x)")
    if mismatch:
        return {**rec, "status": "fail", "summary": summary, "recomputation_mismatch": mismatch,
                "reason": f"{mismatch} (the figures are from a rerun without the check)"}
    if bad:
        return {**rec, "status": "fail", "summary": summary,
                "reason": f"non-finite values {bad}: a skipped backward makes the figures meaningless"}
    if abs(gap) > tolerance:
        return {**rec, "status": "fail", "summary": summary,
                "reason": f"memory {gap:+.1%} off the {ref_name} prediction (tolerance {tolerance:.0%})"}
    return {**rec, "status": "pass", "summary": summary}
