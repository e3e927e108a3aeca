"""Measuring: the tensor bytes a differentiable segment keeps and peaks at (CPU profiler), the plan of
component points, and the loop that measures them (resumable, within a RAM and time budget)."""

from __future__ import annotations

import gc
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from rlr_backend.train.memory import set_decoder_checkpointing

from ..sd_archs import ARCHS, MEASURE_DTYPE, build_reward, build_unet, build_vae, param_count
from .store import GB

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegmentMemory:
    """Bytes of one differentiable segment, relative to what was live before it ran.

    ``retained``: live after its forward (tensors saved for backward + its output), held until its
    backward; ``peak``: the peak during forward + backward; ``nograd``: peak of a no-grad forward.
    """

    peak: float
    retained: float
    nograd: float = 0.0


MARK = "memory_model::forward_done"


def live_bytes_trace(fn: Callable[[], object]) -> tuple[float, float]:
    """Run ``fn`` under the profiler: (peak live tensor bytes, live bytes when ``fn`` entered the
    ``MARK`` record_function) relative to the start. Same event accounting as
    benchmarks.common.peak_allocated: "[memory]" events outside ops, self usage inside them."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    cur = peak = 0
    at_mark = float("nan")
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        if e.name == MARK and math.isnan(at_mark):
            at_mark = cur
        cur += e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        peak = max(peak, cur)
    return float(peak), at_mark


def measure_segment(forward: Callable[[], torch.Tensor]) -> SegmentMemory:
    """Peak and retained bytes of ``forward()`` (returning a tensor with a graph) then backward of a
    scalar of it; the output's gradient path is what an estimator's loss would use."""

    def run() -> None:
        out = forward()
        with record_function(MARK):
            pass
        out.float().square().mean().backward()
        del out

    peak, retained = live_bytes_trace(run)
    return SegmentMemory(peak, retained)


def measure_nograd(forward: Callable[[], object]) -> float:
    def run() -> None:
        with torch.no_grad():
            forward()

    return live_bytes_trace(run)[0]


def available_bytes() -> float:
    """MemAvailable from /proc/meminfo (inf where it cannot be read)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")


# ------------------------------------------------------------------------------------ measure plan
@dataclass(frozen=True)
class Point:
    """One component measurement: ``component`` on ``arch`` in ``variant`` at call batch ``n`` and
    latent side ``lat`` (the reward's ``lat`` is its input image side / 8)."""

    component: str  # "unet" | "vae" | "reward"
    arch: str  # "sd15" | "sdxl" | "sd-vae" | "clip-vit-l14"
    variant: str  # "plain" | "ckpt" | "math" (UNet with the math SDPA kernel, scores materialised)
    n: int
    lat: int
    nograd: bool = False  # also measure a no-grad forward

    @property
    def key(self) -> str:
        return f"{self.component}/{self.arch}/{self.variant}/n{self.n}/lat{self.lat}"


def plan(quick: bool) -> list[Point]:
    """Points in order of use: every family's small points first (enough to fit), then the larger
    ones, the most informative first (SD1.5 and the VAE at 512 px, then SDXL at 48x48 and 64x64), the
    VAE at 1024 px (the largest, ~12 GB) last, so a shortfall of time loses the least useful points;
    a point that would not fit in RAM is skipped. UNet n = 2 x batch (classifier-free guidance); VAE
    and reward n = batch."""
    U, V, R = "unet", "vae", "reward"
    if quick:
        return [Point(R, "clip-vit-l14", "plain", 1, 64, nograd=True),
                *[Point(V, "sd-vae", v, n, lat, nograd=v == "plain") for v in ("plain", "ckpt")
                  for n, lat in ((1, 16), (2, 16), (1, 24))],
                *[Point(U, "sd15", v, n, lat, nograd=v == "plain" and lat == 16) for v in ("plain", "ckpt")
                  for n, lat in ((2, 16), (4, 16), (2, 24))]]
    small = [Point(R, "clip-vit-l14", "plain", n, 64, nograd=True) for n in (1, 2)]
    for v in ("plain", "ckpt"):
        small += [Point(V, "sd-vae", v, n, lat, nograd=v == "plain") for n, lat in ((1, 16), (2, 16), (1, 32))]
    for arch in ("sd15", "sdxl"):
        for v in ("plain", "ckpt"):
            small += [Point(U, arch, v, n, lat, nograd=v == "plain" and lat in (16, 32))
                      for n, lat in ((2, 16), (4, 16), (2, 24), (2, 32))]
    large = [Point(V, "sd-vae", v, 1, 64) for v in ("plain", "ckpt")]  # the targets first: SD1.5 512 px
    large += [Point(U, "sd15", v, 2, lat) for lat in (64, 48) for v in ("plain", "ckpt")]
    large += [Point(U, "sd15", "math", 2, lat) for lat in (16, 24, 32)]
    large += [Point(U, "sdxl", v, 2, 48) for v in ("plain", "ckpt")]
    large += [Point(V, "sd-vae", v, 1, 48) for v in ("plain", "ckpt")]
    large += [Point(U, "sdxl", v, 2, 64) for v in ("plain", "ckpt")]  # 5.2 GB weights + ~3.5 GB
    large += [Point(V, "sd-vae", v, 1, 128) for v in ("ckpt", "plain")]  # SDXL's 1024 px decode: ~12 GB, last
    return small + large


class Measurer:
    """Builds each model once (keeping one large model in memory at a time) and measures points, with
    weights in ``dtype`` (bf16 under CPU autocast, standing for fp16; fp32: no autocast, as the trainer
    runs on a CPU)."""

    def __init__(self, dtype: torch.dtype = MEASURE_DTYPE) -> None:
        self._models: dict[str, torch.nn.Module] = {}
        self.dtype = dtype

    def _autocast(self):
        import contextlib

        return contextlib.nullcontext() if self.dtype == torch.float32 else torch.autocast("cpu", dtype=self.dtype)

    def model(self, arch: str) -> torch.nn.Module:
        if arch not in self._models:
            if arch in ARCHS:  # one UNet at a time; the VAE and the reward (1 GB) stay
                for k in [k for k in self._models if k in ARCHS]:
                    del self._models[k]
                gc.collect()
            t0 = time.perf_counter()
            if arch in ARCHS:
                from rlr_backend.lora import add_lora

                m = build_unet(arch, dtype=self.dtype)
                add_lora(m, rank=4, seed=0)
                with torch.no_grad():  # a trained adapter: non-zero B, so every LoRA tensor gets a gradient
                    for n, p in m.named_parameters():
                        if "lora_B" in n:
                            p.normal_(0, 0.02)
            elif arch == "sd-vae":
                m = build_vae(dtype=self.dtype).requires_grad_(False)
            else:
                m = build_reward(dtype=self.dtype)
            self._models[arch] = m
            logger.info("built %s (%.2f GB of weights) in %.0f s", arch, weight_bytes(m) / GB,
                        time.perf_counter() - t0)
        return self._models[arch]

    def forward_fn(self, p: Point) -> Callable[[], torch.Tensor]:
        """The differentiable call of ``p`` (inputs require grad, as inside a backpropagated chain)."""
        m = self.model(p.arch)
        g = torch.Generator().manual_seed(0)
        if p.component == "unet":
            a = ARCHS[p.arch]
            x = torch.randn(p.n, 4, p.lat, p.lat, generator=g).requires_grad_(True)
            t = torch.full((p.n,), 500, dtype=torch.long)
            text = torch.randn(p.n, a["tokens"], a["text_dim"], generator=g, dtype=self.dtype)
            extra = {}
            if p.arch == "sdxl":
                extra = {"added_cond_kwargs": {"text_embeds": torch.randn(p.n, 1280, generator=g, dtype=self.dtype),
                                               "time_ids": torch.tensor([[1024., 1024., 0., 0., 1024., 1024.]] * p.n,
                                                                        dtype=self.dtype)}}
            (m.enable_gradient_checkpointing if p.variant == "ckpt" else m.disable_gradient_checkpointing)()

            def fwd() -> torch.Tensor:
                with _attention_kernel(p.variant), self._autocast():
                    return m(x, t, encoder_hidden_states=text, **extra).sample
            return fwd
        if p.component == "vae":
            set_decoder_checkpointing(m, p.variant == "ckpt")  # as the trainer's --gradient-checkpointing
            z = torch.randn(p.n, 4, p.lat, p.lat, generator=g, dtype=self.dtype).requires_grad_(True)

            def fwd() -> torch.Tensor:
                with self._autocast():
                    return m.decode(z / 0.18215).sample
            return fwd
        img = torch.rand(p.n, 3, 8 * p.lat, 8 * p.lat, generator=g).requires_grad_(True)
        if p.variant == "ckpt":
            m.clip.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            m.train()  # transformers checkpoints only in training mode (CLIP has no dropout)
        else:
            m.clip.gradient_checkpointing_disable()
            m.eval()

        def fwd() -> torch.Tensor:
            with self._autocast():
                return m(img)
        return fwd

    def measure(self, p: Point) -> dict:
        fwd = self.forward_fn(p)
        t0 = time.perf_counter()
        seg = measure_segment(fwd)
        seconds = time.perf_counter() - t0
        nograd = measure_nograd(fwd) if p.nograd else None
        return {**asdict(p), "key": p.key, "pixels": p.lat * p.lat, "peak": seg.peak, "retained": seg.retained,
                "nograd_peak": nograd, "seconds": round(seconds, 1), "dtype": str(self.dtype).split(".")[-1],
                "weights": weight_bytes(self.model(p.arch))}


class _attention_kernel:
    """``variant == 'math'``: force the math SDPA kernel (materialises the attention scores)."""

    def __init__(self, variant: str) -> None:
        self.ctx = None
        if variant == "math":
            from torch.nn.attention import SDPBackend, sdpa_kernel
            self.ctx = sdpa_kernel(SDPBackend.MATH)

    def __enter__(self) -> None:
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def weight_bytes(*modules: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for m in modules for t in list(m.parameters()) + list(m.buffers()))


def guess_need(p: Point, rows: list[dict]) -> float:
    """Bytes ``p`` is likely to need: the nearest measured point of its family scaled by n x pixels
    (activations are close to linear in both), or 0 when nothing of the family is measured yet."""
    fam = [r for r in rows if (r["component"], r["arch"], r["variant"]) == (p.component, p.arch, p.variant)]
    if not fam:
        return 0.0
    r = max(fam, key=lambda r: r["n"] * r["pixels"])
    return r["peak"] * (p.n * p.lat ** 2) / (r["n"] * r["pixels"])


def run_measurements(points: Iterable[Point], rows: list[dict], save: Callable[[], None],
                     deadline: float = float("inf"), dtype: torch.dtype = MEASURE_DTYPE) -> list[dict]:
    """Measure the points not yet in ``rows`` (appending and saving after each); skip a point whose
    guessed need (plus the weights, plus 25%) exceeds the RAM available, or once past ``deadline``."""
    done = {r["key"] for r in rows}
    meas = Measurer(dtype)
    for p in points:
        if p.key in done:
            continue
        if time.time() > deadline:
            logger.warning("time budget spent: skipping %s", p.key)
            continue
        need = 1.25 * guess_need(p, rows) + (0 if p.arch in meas._models else _weights_guess(p.arch))
        if need > available_bytes():
            logger.warning("skipping %s: needs ~%.1f GB, %.1f GB available", p.key, need / GB, available_bytes() / GB)
            continue
        row = meas.measure(p)
        rows.append(row)
        save()
        logger.info("%-34s peak %7.3f GB  retained %7.3f GB%s  (%.0f s)", p.key, row["peak"] / GB,
                    row["retained"] / GB,
                    f"  no-grad {row['nograd_peak'] / GB:.3f} GB" if row["nograd_peak"] is not None else "",
                    row["seconds"])
    return rows


def _weights_guess(arch: str) -> float:
    """Bytes a model needs while being built (its bf16 weights, x1.2 for the build's transients)."""
    if arch in ARCHS:
        return 1.2 * 2 * param_count(build_unet(arch, meta=True))
    return 1.2 * 2 * 430e6

