"""Memory model of an RLR update: peak memory from model, resolution, batch, T and h, fitted on CPU.

    python -m benchmarks.memory_model                # measure what is missing (~1 h on 2 cores), fit, write the page
    python -m benchmarks.memory_model --quick        # CI-time budget: small points only (a few minutes)
    python -m benchmarks.memory_model --report-only  # re-fit and re-render from the saved measurements

Why a model and not a measurement: the targets (SD1.5 at 512 px, SDXL at 1024 px, fp16 on a GPU) do
not run on this 2-core CPU machine, but their *bytes* do not depend on the device. So we

1. build the real architectures (SD1.5 and SDXL UNets, the SD VAE, a CLIP ViT-L/14 reward tower) at
   random init from their public configs (nothing downloads) in bfloat16 (the same bytes as fp16;
   fp16 kernels are missing or slow on CPU), with a rank-4 LoRA on the attention projections in fp32
   and CPU autocast, as the trainer runs them;
2. measure, per component and size, the tensor bytes a forward keeps for backward (``retained``) and
   the peak of forward + backward (``peak``), from the profiler's allocation events (the CPU analogue
   of ``torch.cuda.max_memory_allocated`` minus what was live before; see ``benchmarks.common``);
3. fit each as ``c + n * (b + a * P + q * P^2)`` (n = batch of the call, P = latent pixels; the
   quadratic term is self-attention scores, if a kernel materialises them) with non-negative
   coefficients and relative-error weighting;
4. compose an update's peak as weights + optimizer state + stored chain + the largest phase
   (sampling, first-order window, half-order window, zeroth-order step), where a backpropagated
   window of segments s_1..s_m peaks at ``max_i (sum_{j<i} retained_j + peak_i)``;
5. validate the composition against whole ``rlr_estimate`` / ``full_bp`` / ``ddpo`` updates on
   small SD-shaped stacks (components measured on the same stack), and report every error.

Measurements are saved point by point to benchmarks/results/memory-model.json, so a run resumes and
``--report-only`` regenerates docs/memory.md without measuring.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch.profiler import ProfilerActivity, profile, record_function

logger = logging.getLogger(__name__)

RESULTS = Path(__file__).parent / "results" / "memory-model.json"
QUICK_RESULTS = Path(__file__).parent / "results" / "memory-model-quick.json"
DOC = Path(__file__).parent.parent / "docs" / "memory.md"
GB = 1e9
MEASURE_DTYPE = torch.bfloat16  # stands for fp16: 2 bytes per element either way

# --------------------------------------------------------------------------------------------- configs
# Sources: the public diffusers / transformers config.json files of
#   runwayml/stable-diffusion-v1-5 (unet/, vae/, text_encoder/),
#   stabilityai/stable-diffusion-xl-base-1.0 (unet/, vae/, text_encoder/, text_encoder_2/),
#   openai/clip-vit-large-patch14 (the image tower of the LAION aesthetic predictor).
# Only architecture fields are kept; values are the published ones.

SD15_UNET: dict = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32, "norm_eps": 1e-5,
    "act_fn": "silu", "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0,
}

SDXL_UNET: dict = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20), "cross_attention_dim": 2048,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816, "use_linear_projection": True, "norm_num_groups": 32,
    "norm_eps": 1e-5, "act_fn": "silu", "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0,
}

SD_VAE: dict = {  # SD1.x and SDXL share this architecture (SDXL's differs in weights and scaling factor only)
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "block_out_channels": (128, 256, 512, 512), "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4, "norm_num_groups": 32, "act_fn": "silu", "sample_size": 512,
}

CLIP_L_TEXT: dict = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                     "num_attention_heads": 12, "max_position_embeddings": 77, "vocab_size": 49408,
                     "projection_dim": 768, "hidden_act": "quick_gelu"}
OPENCLIP_BIGG_TEXT: dict = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                            "num_attention_heads": 20, "max_position_embeddings": 77, "vocab_size": 49408,
                            "projection_dim": 1280, "hidden_act": "gelu"}
CLIP_VIT_L14_VISION: dict = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                             "num_attention_heads": 16, "image_size": 224, "patch_size": 14, "projection_dim": 768,
                             "hidden_act": "quick_gelu"}

#: architecture -> (UNet config, text encoders, text width, pooled width for SDXL's added conditioning)
ARCHS: dict[str, dict] = {
    "sd15": {"unet": SD15_UNET, "text": (CLIP_L_TEXT,), "tokens": 77, "text_dim": 768, "label": "SD1.5"},
    "sdxl": {"unet": SDXL_UNET, "text": (CLIP_L_TEXT, OPENCLIP_BIGG_TEXT), "tokens": 77, "text_dim": 2048,
             "label": "SDXL"},
}
LORA_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")  # rlr_backend.lora.DEFAULT_TARGET_MODULES
AESTHETIC_HEAD_PARAMS = 768 * 1024 + 1024 + 1024 * 128 + 128 + 128 * 64 + 64 + 64 * 16 + 16 + 16 + 1


# ------------------------------------------------------------------------------------------ building
def _materialize(module: torch.nn.Module, dtype: torch.dtype, seed: int,
                 device: str | torch.device = "cpu") -> torch.nn.Module:
    """Allocate a meta-device module directly in ``dtype`` on ``device`` and initialise it with each
    layer's default init (values are irrelevant to memory; building on meta avoids a transient fp32
    copy of SDXL, and on a GPU the init runs there)."""
    module = module.to(dtype).to_empty(device=device)
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    return module


def build_unet(arch: str, dtype: torch.dtype = MEASURE_DTYPE, seed: int = 0, meta: bool = False,
               device: str | torch.device = "cpu", config: dict | None = None) -> torch.nn.Module:
    """The arch's UNet2DConditionModel at random init (``meta=True``: shapes only, no memory);
    ``config`` replaces the arch's published config (e.g. a shrunk one of the same family)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**(config or ARCHS[arch]["unet"]))
    return unet if meta else _materialize(unet, dtype, seed, device)


def build_vae(dtype: torch.dtype = MEASURE_DTYPE, seed: int = 0, meta: bool = False,
              device: str | torch.device = "cpu", config: dict | None = None) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(**(config or SD_VAE))
    return vae if meta else _materialize(vae, dtype, seed, device)


class AestheticReward(torch.nn.Module):
    """CLIP ViT-L/14 image tower + projection + the LAION aesthetic MLP head, on images in [0, 1]:
    the reward's differentiable path (resize to 224, normalise, embed, L2-normalise, score)."""

    def __init__(self, vision: dict | None = None) -> None:
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        vision = vision or CLIP_VIT_L14_VISION
        self.size = vision["image_size"]
        self.clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**vision))
        self.head = torch.nn.Sequential(torch.nn.Linear(vision["projection_dim"], 1024), torch.nn.Linear(1024, 128),
                                        torch.nn.Linear(128, 64), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.interpolate(images, size=(self.size, self.size), mode="bilinear", antialias=False)
        x = (x - 0.45) / 0.27
        emb = self.clip(pixel_values=x).image_embeds
        return self.head(torch.nn.functional.normalize(emb, dim=-1)).squeeze(-1).float()


def build_reward(dtype: torch.dtype = MEASURE_DTYPE, seed: int = 0, device: str | torch.device = "cpu",
                 vision: dict | None = None) -> AestheticReward:
    """The aesthetic reward at random init in ``dtype`` on ``device`` (initialised on the CPU, as transformers
    does it, then moved); ``vision`` replaces the ViT-L/14 config (e.g. a shrunk one)."""
    torch.manual_seed(seed)
    return AestheticReward(vision).to(dtype).to(device).requires_grad_(False).eval()


def param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def lora_param_count(unet: torch.nn.Module, rank: int, targets: Sequence[str] = LORA_TARGETS) -> int:
    """Parameters of a rank-``rank`` LoRA on ``targets`` (r x (in + out) per adapted Linear), as
    rlr_backend.lora.add_lora injects it; counted from the (meta) module's shapes."""
    n = 0
    for name, m in unet.named_modules():
        if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            n += rank * (m.in_features + m.out_features)
    return n


def text_encoder_params(arch: str) -> int:
    """Parameters of the arch's text encoder(s), counted on the meta device."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    total = 0
    for i, cfg in enumerate(ARCHS[arch]["text"]):
        cls = CLIPTextModelWithProjection if i == 1 else CLIPTextModel
        with torch.device("meta"):
            total += param_count(cls(CLIPTextConfig(**cfg)))
    return total


def reward_params(full_clip: bool = True) -> int:
    """Aesthetic reward parameters: the ViT-L/14 image tower + projection + head; ``full_clip`` adds
    the CLIP text tower, which a full CLIP checkpoint loads although the reward does not use it."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.device("meta"):
        n = param_count(CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_VIT_L14_VISION)))
        if full_clip:
            n += param_count(CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))) + 768 * 768
    return n + AESTHETIC_HEAD_PARAMS


# --------------------------------------------------------------------------------------- measuring
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
            (m.enable_gradient_checkpointing if p.variant == "ckpt" else m.disable_gradient_checkpointing)()
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


# ----------------------------------------------------------------------------------------- fitting
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


# ------------------------------------------------------------------------------------- composition
def chain_peak(segments: Sequence[SegmentMemory]) -> float:
    """Peak of a forward through ``segments`` in order, then one backward through all of them:
    while segment i runs its forward or backward, every earlier segment's retained bytes are live
    and later ones' are freed (backward runs last to first), so the peak is
    ``max_i (sum_{j<i} retained_j + peak_i)``."""
    held, best = 0.0, 0.0
    for s in segments:
        best = max(best, held + s.peak)
        held += s.retained
    return best


def sequential(first: SegmentMemory, second: SegmentMemory) -> SegmentMemory:
    """Two segments chained into one (e.g. VAE decode then reward)."""
    return SegmentMemory(chain_peak([first, second]), first.retained + second.retained,
                         max(first.nograd, second.nograd))


def checkpointed(seg: SegmentMemory, input_bytes: float) -> SegmentMemory:
    """A segment under torch.utils.checkpoint: keeps only its input (and output) until backward,
    which recomputes its forward and peaks as the plain segment did."""
    return SegmentMemory(seg.peak, input_bytes, seg.nograd)


@dataclass(frozen=True)
class UpdatePhases:
    """Activation bytes of each phase of one update (on top of the persistent bytes)."""

    sampling: float
    first_order: float = 0.0
    half_order: float = 0.0
    zeroth_order: float = 0.0

    def peak(self) -> tuple[float, str]:
        d = {k: v for k, v in asdict(self).items()}
        name = max(d, key=d.get)
        return d[name], name


def rlr_phases(step: SegmentMemory, reward: SegmentMemory, h: int, fo_steps: int) -> UpdatePhases:
    """RLR (rlr_backend.estimators.rlr): sampling without grad (one step at a time, then the reward);
    FO: ``fo_steps`` steps + decode + reward backpropagated together; HO: ``h`` steps (the last one's
    likelihood-ratio loss is a few latent-sized tensors); ZO latent_lr: one step forward+backward."""
    return UpdatePhases(sampling=max(step.nograd, reward.nograd),
                        first_order=chain_peak([step] * fo_steps + [reward]),
                        half_order=chain_peak([step] * h), zeroth_order=step.peak)


def full_bp_phases(step: SegmentMemory, reward: SegmentMemory, T: int) -> UpdatePhases:
    """Full backprop: all T steps with grad, then the reward, one backward through everything."""
    return UpdatePhases(sampling=0.0, first_order=chain_peak([step] * T + [reward]))


def ddpo_phases(step: SegmentMemory, reward: SegmentMemory) -> UpdatePhases:
    """DDPO: sampling + reward without grad, then each step's log-prob forward+backward alone."""
    return UpdatePhases(sampling=max(step.nograd, reward.nograd), zeroth_order=step.peak)


def truncated_bp_phases(step: SegmentMemory, reward: SegmentMemory, k: int) -> UpdatePhases:
    """Truncated backprop (DRaFT-K): T-K steps without grad, then K steps + the reward backpropagated."""
    return UpdatePhases(sampling=step.nograd, first_order=chain_peak([step] * k + [reward]))


#: estimators the composition covers (truncated_bp's K is passed as ``fo_steps``: both are the last K
#: steps backpropagated through the reward)
PHASE_ESTIMATORS: tuple[str, ...] = ("rlr", "full_bp", "truncated_bp", "ddpo", "zo")


def update_phases(estimator: str, step: SegmentMemory, reward: SegmentMemory, *, T: int, h: int = 2,
                  fo_steps: int = 1) -> UpdatePhases:
    """The phases of one update of ``estimator`` (one of PHASE_ESTIMATORS) from its step and reward segments."""
    if estimator == "rlr":
        return rlr_phases(step, reward, h, fo_steps)
    if estimator == "full_bp":
        return full_bp_phases(step, reward, T)
    if estimator == "truncated_bp":
        return truncated_bp_phases(step, reward, fo_steps)
    if estimator in ("ddpo", "zo"):  # zo: a likelihood-ratio term per step, each backpropagated alone, as DDPO
        return ddpo_phases(step, reward)
    raise ValueError(f"unknown estimator {estimator!r}; choose one of {list(PHASE_ESTIMATORS)}")


def chain_store_bytes(T: int, batch: int, latent_pixels: int, channels: int = 4) -> float:
    """The stored trajectory in fp32: T+1 latents, T noises, (B, T) log-probs."""
    return 4.0 * ((2 * T + 1) * batch * channels * latent_pixels + batch * T)


# ------------------------------------------------------------------------------- real-model predictions
@dataclass(frozen=True)
class Options:
    """Trainer memory options (rlr_backend's trainer; modelled here, not implemented)."""

    checkpointing: bool = False  # UNet block checkpointing + step-level checkpoint + VAE sliced per sample
    offload_text: bool = False  # text encoders moved to the CPU after encoding
    adam_8bit: bool = False  # Adam moments 2 bytes/param instead of 8
    reward_fp32: bool = False  # reward model in fp32 (weights 4 bytes/param, activations ~2x the measured bf16)
    weight_bytes: float = 2.0  # bytes per frozen weight: 2 (fp16/bf16 on a GPU), 4 (fp32, e.g. the CPU validation)
    reward_model: bool = True  # the aesthetic reward model (False: a rule reward such as brightness, no weights)
    label: str = ""


OPTION_SETS: tuple[Options, ...] = (
    Options(label="no options"),
    Options(checkpointing=True, label="gradient checkpointing"),
    Options(checkpointing=True, offload_text=True, label="checkpointing + text-encoder offload"),
    Options(checkpointing=True, offload_text=True, adam_8bit=True, label="... + 8-bit Adam"),
    Options(checkpointing=True, offload_text=True, reward_fp32=True, label="ckpt + offload, reward in fp32"),
)


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


def _unet_step(fits: Fits, arch: str, n: int, px: int, ckpt: bool) -> SegmentMemory:
    """One UNet step with CFG (a call of batch n = 2B) as a segment; checkpointed: block-level
    checkpointing inside the call plus a step-level checkpoint (keeps only its inputs)."""
    var = "ckpt" if ckpt else "plain"
    nograd = fits.get("unet", arch, "plain", "nograd_peak")(n, px) if fits.has("unet", arch, "plain", "nograd_peak") \
        else 0.0
    seg = SegmentMemory(fits.get("unet", arch, var, "peak")(n, px), fits.get("unet", arch, var, "retained")(n, px),
                        nograd)
    if ckpt:
        seg = checkpointed(seg, input_bytes=n * 4 * px * 4.0)
    return seg


def _decode_and_reward(fits: Fits, batch: int, px: int, ckpt: bool, with_reward: bool = True,
                       reward_scale: float = 1.0) -> SegmentMemory:
    """VAE decode (+ the aesthetic reward) as one segment, as ``DiffusersModel.decode`` runs it.
    Checkpointed (diffusers' up-block checkpointing in the decoder): one image at a time, each under a
    checkpoint when B > 1 (peak of one checkpointed image + the B decoded images; kept until backward:
    the latents and images); at B = 1 the decoder's own checkpointing alone. Without grad, one image
    at a time too. Images are returned in fp32."""
    img = 3 * 64 * px * 4.0  # one decoded image, fp32, (8x8) pixels per latent pixel
    nograd = fits.get("vae", "sd-vae", "plain", "nograd_peak")(1 if ckpt else batch, px)
    if ckpt and batch == 1:
        vae = SegmentMemory(fits.get("vae", "sd-vae", "ckpt", "peak")(1, px),
                            fits.get("vae", "sd-vae", "ckpt", "retained")(1, px), nograd)
    elif ckpt:
        one = fits.get("vae", "sd-vae", "ckpt", "peak")(1, px)
        vae = SegmentMemory((batch - 1) * img + one, batch * (img + 4 * px * 4.0), nograd + batch * img)
    else:
        vae = SegmentMemory(fits.get("vae", "sd-vae", "plain", "peak")(batch, px),
                            fits.get("vae", "sd-vae", "plain", "retained")(batch, px), nograd)
    if not with_reward:
        return vae
    # measured on 512 px inputs; at 1024 px the reward's input and its gradient grow by ~10 MB per image
    rew = SegmentMemory(*(reward_scale * fits.get("reward", "clip-vit-l14", "plain", q)(batch, 0)
                          for q in ("peak", "retained", "nograd_peak")))
    return sequential(vae, rew)


@dataclass(frozen=True)
class Scenario:
    arch: str
    resolution: int
    batch: int
    T: int = 50
    h: int = 2
    fo_steps: int = 1
    lora_rank: int = 4
    eval_images: int = 8  # the trainer's evaluation: eval_seeds (2) images of each of the first 4 prompts


def persistent_bytes(arch: str, opts: Options, lora_rank: int, counts: dict[str, int]) -> dict[str, float]:
    """Bytes held through the whole update: fp16 weights (UNet, VAE, reward, text encoders unless
    offloaded) and the LoRA in fp32 with its gradient and Adam's two moments."""
    lora = counts[f"lora_{arch}_r{lora_rank}"]
    w = opts.weight_bytes
    return {"unet weights": w * counts[f"unet_{arch}"], "vae weights": w * counts["vae"],
            "reward weights": ((4.0 if opts.reward_fp32 else w) * counts["reward"]) if opts.reward_model else 0.0,
            "text encoders": 0.0 if opts.offload_text else w * counts[f"text_{arch}"],
            "lora + grad": 8.0 * lora, "adam moments": (2.0 if opts.adam_8bit else 8.0) * lora}


def predict(fits: Fits, s: Scenario, opts: Options, counts: dict[str, int], estimator: str = "rlr") -> dict:
    """Predicted peak bytes of one update of ``estimator`` (one of PHASE_ESTIMATORS; truncated_bp
    backpropagates the last ``s.fo_steps`` steps) with a breakdown."""
    if estimator not in PHASE_ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {list(PHASE_ESTIMATORS)}")
    px = (s.resolution // 8) ** 2
    step = _unet_step(fits, s.arch, 2 * s.batch, px, opts.checkpointing)
    scale = 2.0 if opts.reward_fp32 else 1.0
    dec = _decode_and_reward(fits, s.batch, px, opts.checkpointing, with_reward=opts.reward_model, reward_scale=scale)
    phases = update_phases(estimator, step, dec, T=s.T, h=s.h, fo_steps=s.fo_steps)
    act, phase = phases.peak()
    pers = persistent_bytes(s.arch, opts, s.lora_rank, counts)
    store = chain_store_bytes(s.T, s.batch, px)
    evaluation = evaluation_bytes(fits, s, opts, px)
    if s.eval_images and evaluation > store + act:  # the evaluation between updates binds
        act, phase, store = evaluation, "evaluation", 0.0
    total = sum(pers.values()) + store + act
    return {"scenario": asdict(s), "options": asdict(opts), "estimator": estimator, "bytes": total,
            "activations": act, "binding_phase": phase, "chain_store": store, "persistent": pers,
            "phases": {**asdict(phases), "evaluation": evaluation}, "step": asdict(step),
            "decode_reward": asdict(dec)}


def evaluation_bytes(fits: Fits, s: Scenario, opts: Options, px: int) -> float:
    """The trainer's evaluation (``Trainer.evaluate``, at the start and every eval_every updates): the
    ``eval_images`` sampled together without grad (their chain stored), decoded (one at a time with
    checkpointing on) and scored."""
    if not s.eval_images:
        return 0.0
    e = s.eval_images
    step = _unet_step(fits, s.arch, 2 * e, px, False)
    dec = _decode_and_reward(fits, e, px, opts.checkpointing, with_reward=opts.reward_model)
    return chain_store_bytes(s.T, e, px) + max(step.nograd, dec.nograd)


def model_counts(lora_ranks: Iterable[int] = (4,)) -> dict[str, int]:
    """Parameter counts of every model in the predictions, from meta-device builds of the configs."""
    vae = build_vae(meta=True)
    counts: dict[str, int] = {"vae": param_count(vae), "reward": reward_params(full_clip=True),
                              "reward_vision_only": reward_params(full_clip=False)}
    counts["vae_decoder"] = param_count(vae.decoder) + param_count(vae.post_quant_conv)
    for arch in ARCHS:
        unet = build_unet(arch, meta=True)
        counts[f"unet_{arch}"] = param_count(unet)
        counts[f"text_{arch}"] = text_encoder_params(arch)
        for r in lora_ranks:
            counts[f"lora_{arch}_r{r}"] = lora_param_count(unet, r)
    return counts


# ------------------------------------------------------------------------------ validation on stacks
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


# ------------------------------------------------------------------------------------------- report
def machine() -> dict:
    from benchmarks.common import machine as common_machine

    return common_machine()


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def analyse(data: dict) -> dict:
    """Fits, holdout checks and predictions from the saved measurements (no measuring)."""
    rows = data.get("points", [])
    fits = fit_components(rows)
    counts = data.get("counts") or model_counts()
    out: dict = {"fits": {"/".join(k): asdict(f) for k, f in fits.table.items()}, "counts": counts}
    # holdout: fit each UNet/VAE family without its largest point and predict that point
    holdout = []
    for (comp, arch, var) in sorted({(r["component"], r["arch"], r["variant"]) for r in rows}):
        mine = [r for r in rows if (r["component"], r["arch"], r["variant"]) == (comp, arch, var)]
        if comp == "reward" or len({r["pixels"] for r in mine}) < 4:
            continue
        big = max(mine, key=lambda r: r["n"] * r["pixels"])
        rest = [r for r in mine if r is not big]
        for q in ("peak", "retained"):
            f = fit_bytes([(r["n"], r["pixels"], r[q]) for r in rest])
            lin = fit_bytes([(r["n"], r["pixels"], r[q]) for r in rest], ("c", "b", "a"))
            holdout.append({"family": f"{comp}/{arch}/{var}", "quantity": q, "n": big["n"], "lat": big["lat"],
                            "measured": big[q], "predicted": f(big["n"], big["pixels"]),
                            "predicted_linear": lin(big["n"], big["pixels"])})
    out["holdout"] = holdout
    # the same families fitted without the quadratic term: does P^2 earn its place?
    out["linear_only"] = {}
    for (comp, arch, var, q), f in fits.table.items():
        mine = [r for r in rows if (r["component"], r["arch"], r["variant"]) == (comp, arch, var)]
        if comp != "reward" and q == "peak":
            lin = fit_bytes([(r["n"], r["pixels"], r[q]) for r in mine], ("c", "b", "a"))
            out["linear_only"]["/".join((comp, arch, var, q))] = asdict(lin)
    preds = []
    needed = [("unet", a, v, "peak") for a in ARCHS for v in ("plain", "ckpt")] + \
             [("vae", "sd-vae", v, "peak") for v in ("plain", "ckpt")] + [("vae", "sd-vae", "plain", "nograd_peak")] + \
             [("reward", "clip-vit-l14", "plain", q) for q in ("peak", "nograd_peak")]
    missing = [k for k in needed if k not in fits.table]
    for arch, res, batches in (("sd15", 512, (1, 4)), ("sdxl", 1024, (1, 2))):
        if any(k[1] == arch for k in missing) or any(k[0] != "unet" for k in missing):
            continue
        for b in batches:
            for fo in (1, 4):
                s = Scenario(arch, res, b, fo_steps=fo)
                for opts in OPTION_SETS:
                    preds.append(predict(fits, s, opts, counts, "rlr"))
                    if fo == 1 and not opts.adam_8bit and not opts.reward_fp32:
                        preds.append(predict(fits, s, opts, counts, "full_bp"))
                        preds.append(predict(fits, replace(s, fo_steps=2), opts, counts, "truncated_bp"))
                        preds.append(predict(fits, s, opts, counts, "ddpo"))
                        preds.append(predict(fits, s, opts, counts, "zo"))
    out["predictions"] = preds
    out["missing_fits"] = ["/".join(k) for k in missing]
    return out


MARGIN_FRACTION = 0.15  # CUDA caching allocator fragmentation, kernel workspaces
MARGIN_FIXED = 0.5 * GB  # CUDA context (not in torch's counters)


def with_margin(b: float) -> float:
    return b * (1 + MARGIN_FRACTION) + MARGIN_FIXED


def _gb(b: float | None) -> str:
    return "-" if b is None else f"{b / GB:.2f}"


def plot(data: dict, analysis: dict, out_dir: Path) -> list[Path]:
    """Log-log plots of measured bytes against n x latent pixels with each family's fitted curve."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    rows = data.get("points", [])
    fits = {tuple(k.split("/")): Fit(**v) for k, v in analysis["fits"].items()}
    paths = []
    fig = Figure(figsize=(11, 4.5))
    axes = fig.subplots(1, 2)
    colours = iter(["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C7", "C8"])
    for comp, arch, var in sorted({(r["component"], r["arch"], r["variant"]) for r in rows}):
        if comp == "reward":
            continue
        c = next(colours)
        mine = [r for r in rows if (r["component"], r["arch"], r["variant"]) == (comp, arch, var)]
        for ax, q in zip(axes, ("peak", "retained")):
            xs = [r["n"] * r["pixels"] for r in mine]
            ax.scatter(xs, [r[q] / GB for r in mine], color=c, s=18, label=f"{comp} {arch} {var}")
            f = fits.get((comp, arch, var, q))
            if f is None:
                continue
            target = 2 * 128 * 128 if arch == "sdxl" else 2 * 64 * 64 if comp == "unet" else 128 * 128
            grid = [2 ** (i / 4) for i in range(int(4 * math.log2(min(xs))), int(4 * math.log2(target)) + 1)]
            n0 = 1 if comp == "vae" else 2
            ax.plot(grid, [f(n0, g / n0) / GB for g in grid], color=c, lw=1, ls="--")
    for ax, q in zip(axes, ("peak of forward + backward", "retained after forward")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("n x latent pixels (n = batch of the call)")
        ax.set_ylabel("GB (bf16, CPU)")
        ax.set_title(q)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Measured activation bytes (dots) and the fitted model (dashed, extrapolated to SD1.5 512 px / "
                 "SDXL 1024 px)", fontsize=9)
    fig.tight_layout()
    path = out_dir / "memory_fit.png"
    fig.savefig(path, dpi=110)
    paths.append(path)

    preds = [p for p in analysis["predictions"] if p["estimator"] == "rlr" and p["scenario"]["fo_steps"] == 1
             and not p["options"]["adam_8bit"] and not p["options"].get("reward_fp32")]
    if preds:
        fig = Figure(figsize=(9, 4))
        ax = fig.subplots()
        short = {OPTION_SETS[0].label: "none", OPTION_SETS[1].label: "ckpt", OPTION_SETS[2].label: "ckpt +\noffload"}
        labels = [f"{ARCHS[p['scenario']['arch']]['label']} B={p['scenario']['batch']}\n"
                  f"{short.get(p['options']['label'], p['options']['label'])}" for p in preds]
        parts = [("weights + optimizer", [sum(p["persistent"].values()) / GB for p in preds]),
                 ("activations", [(p["activations"] + p["chain_store"]) / GB for p in preds]),
                 ("margin", [(with_margin(p["bytes"]) - p["bytes"]) / GB for p in preds])]
        bottom = [0.0] * len(preds)
        for name, vals in parts:
            ax.bar(range(len(preds)), vals, bottom=bottom, label=name)
            bottom = [b + v for b, v in zip(bottom, vals)]
        top = 40.0
        ax.set_ylim(0, top)
        for i, total in enumerate(bottom):
            ax.text(i, min(total, top) - (2.5 if total > top else -0.3), f"{total:.1f}", ha="center", fontsize=6,
                    color="white" if total > top else "black")
        for y, txt in ((8, "8 GB"), (16, "16 GB"), (24, "24 GB")):
            ax.axhline(y, color="k", lw=0.7, ls=":")
            ax.text(len(preds) - 0.5, y, txt, fontsize=7, va="bottom", ha="right")
        ax.set_xticks(range(len(preds)), labels, fontsize=7)
        ax.set_ylabel("predicted GPU memory (GB)")
        ax.set_title("RLR update (T=50, h=2, FO 1 step, LoRA r=4, fp16): predicted peak (bars above 40 GB cut)\n"
                     "ckpt = gradient checkpointing, offload = text encoders on the CPU", fontsize=8)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / "memory_predictions.png"
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths


def render(data: dict, analysis: dict, out: Path, image_paths: Sequence[Path]) -> str:
    """docs/memory.md from the measurements and the analysis."""
    m = data.get("machine", {})
    rows = data.get("points", [])
    later = data.get("commands", [])[1:]
    resumed = " (resumed: " + ", ".join(f"`{c}`" for c in later) + ")" if later else ""
    counts = analysis["counts"]
    fits = analysis["fits"]
    lines = ["# Memory model", "",
             f"*{data.get('budget', 'full')} run, {data.get('started', '?')}; {m.get('cpu', '?')}, "
             f"{m.get('cores', '?')} "
             f"cores, torch {m.get('torch', '?')}, diffusers {m.get('diffusers', '?')}, transformers "
             f"{m.get('transformers', '?')}, peft {m.get('peft', '?')}, commit {m.get('commit', '?')}. "
             f"Command: `{data.get('command', 'python -m benchmarks.memory_model')}`"
             f"{resumed}; "
             f"re-render with `python -m benchmarks.memory_model --report-only`. Data: "
             f"`benchmarks/results/memory-model.json`.*", ""]
    lines += _doc_intro(counts)
    lines += _doc_predictions(analysis)
    lines += _doc_formula(fits)
    lines += _doc_measurements(rows, fits, analysis)
    lines += _doc_validation(data.get("validation", []))
    from benchmarks.memory_validation import doc_section

    lines += doc_section()
    lines += _doc_gpu()
    lines += _doc_caveats()
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


def _doc_intro(counts: dict) -> list[str]:
    return [
        "Peak memory of one RLR update as a function of model, resolution, batch B, chain length T, "
        "half-order length h and the trainer's memory options, fitted to measurements of the real "
        "SD1.5 / SDXL architectures on CPU and validated against whole updates (small stacks, and full-size "
        "SD1.5 updates on the CPU). The code is "
        "`benchmarks/memory_model.py`.", "",
        "**What it rests on.** The real architectures built at random init from their public configs "
        f"(SD1.5 UNet {counts['unet_sd15'] / 1e6:.0f} M parameters, SDXL UNet {counts['unet_sdxl'] / 1e6:.0f} M, "
        f"SD VAE {counts['vae'] / 1e6:.1f} M, CLIP ViT-L/14 image tower + aesthetic head "
        f"{counts['reward_vision_only'] / 1e6:.0f} M ({counts['reward'] / 1e6:.0f} M as a full CLIP checkpoint), "
        f"text encoders {counts['text_sd15'] / 1e6:.0f} M (SD1.5) and {counts['text_sdxl'] / 1e6:.0f} M (SDXL)), "
        f"LoRA rank 4 on to_q/to_k/to_v/to_out.0 ({counts['lora_sd15_r4'] / 1e6:.2f} M / "
        f"{counts['lora_sdxl_r4'] / 1e6:.2f} M parameters, fp32), frozen weights in bfloat16 with CPU autocast. "
        "bfloat16 has the bytes of fp16; CPU fp16 kernels are missing or slow, so fp16 is measured as bf16. "
        "Bytes are the profiler's tensor allocations (live bytes, the CPU analogue of "
        "`torch.cuda.max_memory_allocated`), not the process RSS.", ""]


def _options_table(preds: list[dict], estimator: str) -> list[str]:
    lines = []
    for p in preds:
        if p["estimator"] != estimator:
            continue
        s, o = p["scenario"], p["options"]
        pers = p["persistent"]
        w = pers["unet weights"] + pers["vae weights"] + pers["text encoders"]
        lines.append(f"| {ARCHS[s['arch']]['label']} {s['resolution']} px | {s['batch']} | {s['fo_steps']} | "
                     f"{o['label']} | {_gb(w)} | {_gb(pers['reward weights'])} | "
                     f"{_gb(pers['lora + grad'] + pers['adam moments'])} | {_gb(p['step']['peak'])} / "
                     f"{_gb(p['decode_reward']['peak'])} | {_gb(p['activations'] + p['chain_store'])} "
                     f"({p['binding_phase'].replace('_', '-')}) | **{_gb(p['bytes'])}** | "
                     f"{_gb(with_margin(p['bytes']))} | {smallest_card(p['bytes'])} |")
    return lines


#: GPU memory sizes (GB) of common cards: 8 (RTX 3070/4060), 12 (3060/4070), 16 (4060 Ti 16G/4080), 24 (3090/4090),
#: 48 (A6000/L40S), 80 (A100/H100)
CARDS: tuple[int, ...] = (8, 12, 16, 24, 48, 80)


def smallest_card(b: float) -> str:
    """The smallest card of :data:`CARDS` the predicted peak fits with the margin ("8 GB" fits 8 GB and up)."""
    return next((f"{c} GB" for c in CARDS if with_margin(b) <= c * GB), f"> {CARDS[-1]} GB")


def _doc_predictions(analysis: dict) -> list[str]:
    preds = analysis["predictions"]
    if not preds:
        return ["**Predictions**: not available (missing fits: " + ", ".join(analysis["missing_fits"]) + ").", ""]
    head = ["| model | B | FO steps | options | UNet + VAE + text weights | reward weights | LoRA + grad + Adam | "
            "one step / decode + reward peak | activations (binding phase) | predicted peak | + margin | fits a card of |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rlr1 = [p for p in preds if p["estimator"] == "rlr" and p["scenario"]["fo_steps"] == 1]
    rlr4 = [p for p in preds if p["estimator"] == "rlr" and p["scenario"]["fo_steps"] == 4]
    verdict = _verdicts(preds)
    lines = ["## Predictions", "",
             f"T = 50, h = 2, LoRA rank 4, fp16 weights and activations, the LAION aesthetic reward (CLIP ViT-L/14) "
             f"backpropagated in the first-order window, and the trainer's evaluation between updates (8 images: 2 "
             f"seeds of each of 4 prompts, sampled together without grad; it binds where the phase says "
             f"\"evaluation\"). GB = 1e9 bytes. \"+ margin\" adds "
             f"{MARGIN_FRACTION:.0%} (caching-allocator fragmentation, kernel workspaces) and "
             f"{MARGIN_FIXED / GB:.1f} GB (CUDA context); compare that column with a card's memory.", "",
             *verdict, *_dominant(preds), "", *_validation_summary(),
             "**RLR, first-order window of 1 step (the paper's FO):**", "", *head, *_options_table(rlr1, "rlr"), "",
             "**RLR with the project's default recipe `fo_steps=4`:**", "", *head, *_options_table(rlr4, "rlr"), "",
             "**The other estimators: full backprop through all 50 steps, truncated backprop (the last K = 2 steps, "
             "`--truncation` default), DDPO and ZO (one likelihood-ratio step backpropagated at a time; code_compat, "
             "kept for comparison with the official code, is not modelled):**", "", *head,
             *_options_table(preds, "full_bp"), *_options_table(preds, "truncated_bp"),
             *_options_table(preds, "ddpo"), *_options_table(preds, "zo"), "",
             "Options: *gradient checkpointing* = diffusers' `unet.enable_gradient_checkpointing()` inside each "
             "UNet call + a step-level `torch.utils.checkpoint` of every backpropagated step (a window keeps one "
             "step's inputs per step and recomputes one step at a time) + the VAE decode sliced per sample under a "
             "checkpoint with the decoder's own up-block checkpointing (`vae.enable_gradient_checkpointing()`), and "
             "evaluation images decoded one at a time; reward models are not checkpointed (their activations are "
             "the measured reward terms): this is what `rlr-train --gradient-checkpointing` does "
             "(`rlr_backend/train/memory.py` `prepare_model`); *text-encoder offload* = text encoders moved to the CPU after encoding; *8-bit Adam* = "
             "moments in 2 bytes per parameter (the LoRA is under 1% of the memory, so it barely matters); "
             "*reward in fp32* = the reward model's weights in fp32 and its activations counted twice (a reward "
             "model left in fp32; `rlr-train` loads model rewards in `--precision` on a GPU, so the other rows "
             "apply). `rlr-train` offloads the text encoders by default, so `--precision fp16 "
             "--gradient-checkpointing` is the \"checkpointing + text-encoder offload\" row. "
             "\"Activations\" includes the stored chain (T+1 latents, T noises in fp32: a few MB). Full backprop "
             "with step checkpointing holds only T latents, so its peak is RLR's: checkpointing trades its memory "
             "for an extra forward per step (see the cost table in docs/benchmarks.md), not the other way round.", ""]
    lines += ["![predicted peaks](images/memory_predictions.png)", ""]
    return lines


def _validation_summary() -> list[str]:
    from benchmarks.memory_validation import summary_line

    line = summary_line()
    return [line, ""] if line else []


def _dominant(preds: list[dict]) -> list[str]:
    """One line per architecture: what the activations of the checkpointed RLR update consist of."""
    out = []
    for p in preds:
        s, o = p["scenario"], p["options"]
        if p["estimator"] != "rlr" or s["fo_steps"] != 1 or s["batch"] != 1 or o["label"] != OPTION_SETS[2].label:
            continue
        w = sum(p["persistent"].values())
        out.append(f"- {ARCHS[s['arch']]['label']} {s['resolution']} px, batch 1, {o['label']}: {_gb(w)} GB of "
                   f"weights and optimizer state, then the {p['binding_phase'].replace('_', '-')} phase: "
                   f"{_gb(p['activations'])} GB, where one checkpointed UNet step peaks at {_gb(p['step']['peak'])} GB "
                   f"and the decode + reward backward at {_gb(p['decode_reward']['peak'])} GB.")
    return out


def _verdicts(preds: list[dict]) -> list[str]:
    """Per target budget and batch: the first option set (in OPTION_SETS order) whose predicted peak
    with the margin fits, for RLR with the paper's 1-step FO window."""
    out = []
    for arch, res, budget in (("sd15", 512, 8), ("sdxl", 1024, 16), ("sdxl", 1024, 24)):
        mine = [p for p in preds if p["estimator"] == "rlr" and p["scenario"]["arch"] == arch
                and p["scenario"]["fo_steps"] == 1]
        if not mine:
            continue
        parts = []
        for b in sorted({p["scenario"]["batch"] for p in mine}):
            by = {p["options"]["label"]: p for p in mine if p["scenario"]["batch"] == b}
            fit = next((o for o in OPTION_SETS if o.label in by and with_margin(by[o.label]["bytes"]) <= budget * GB),
                       None)
            none = with_margin(by[OPTION_SETS[0].label]["bytes"]) / GB
            if fit is None:
                best = min(with_margin(p["bytes"]) for p in by.values()) / GB
                parts.append(f"batch {b}: **no** (best {best:.1f} GB with the margin; no options {none:.1f} GB)")
            elif fit is OPTION_SETS[0]:
                parts.append(f"batch {b}: **yes**, with no options ({none:.1f} GB with the margin)")
            else:
                parts.append(f"batch {b}: **yes** with {fit.label} ({with_margin(by[fit.label]['bytes']) / GB:.1f} GB "
                             f"with the margin; no options {none:.1f} GB)")
        out.append(f"- {ARCHS[arch]['label']} {res}x{res} in {budget} GB (RLR, FO 1 step): " + "; ".join(parts) + ".")
    return out


def _fit_str(f: dict) -> str:
    return (f"{f['c'] / 1e6:.0f} MB + n x ({f['b'] / 1e6:.1f} MB + {f['a'] / 1e3:.2f} kB x P + "
            f"{f['q']:.3g} B x P^2)")


def _doc_formula(fits: dict) -> list[str]:
    lines = ["## The model", "",
             "For a scenario (architecture, resolution R, batch B, T, h, FO steps K, options):", "",
             "    peak = weights(UNet, VAE, reward, text encoders unless offloaded; 2 bytes/param)",
             "         + LoRA (fp32) + its gradient (fp32) + Adam moments (8 or 2 bytes/param)",
             "         + stored chain 4 bytes x ((2T+1) x B x 4 x P + B x T),   P = (R/8)^2 latent pixels",
             "         + max(sampling, FO, HO, ZO)",
             "    sampling = max(U_nograd(2B), D_nograd(B))",
             "    FO       = chain(U x K, D),   HO = chain(U x h),   ZO (latent_lr) = U.peak",
             "    chain(s_1..s_m) = max_i (sum_{j<i} s_j.retained + s_i.peak)",
             "    full backprop: chain(U x T, D);  DDPO: max(sampling, U.peak)", "",
             "U is one UNet step with classifier-free guidance (a call of batch n = 2B); D is the VAE decode "
             "followed by the reward. Each measured quantity is fitted as `c + n x (b + a x P + q x P^2)` "
             "(non-negative, relative-error least squares); the reward runs at 224 px, so it is `c + n x b`. "
             "With checkpointing U keeps only its inputs (retained = 2B x 4 x P x 4 bytes) and peaks as a "
             "block-checkpointed call; D decodes one sample at a time under a checkpoint "
             "(peak = one checkpointed sample + the B decoded images).", "",
             "| component / variant / quantity | fit (P = latent pixels, n = batch of the call) | points | "
             "max fit error |", "|---|---|---|---|"]
    for k, f in sorted(fits.items()):
        lines.append(f"| {k} | {_fit_str(f)} | {f['points']} | {f['max_rel_error']:.1%} |")
    lines.append("")
    return lines


def _doc_measurements(rows: list[dict], fits: dict, analysis: dict) -> list[str]:
    lines = ["## Measurements (bf16 on CPU) against the fit", "",
             "Peak = forward + backward peak, retained = kept after the forward until backward, no-grad = peak "
             "of a no-grad forward; all relative to what was live before (weights and inputs excluded). "
             "Error = fit / measured - 1.", "",
             "| component | arch | variant | n | latent | peak GB | fit err | retained GB | fit err | no-grad GB | "
             "fit err | time (s) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["component"], r["arch"], r["variant"], r["n"] * r["pixels"])):
        errs = []
        for q in ("peak", "retained", "nograd_peak"):
            f = fits.get(f"{r['component']}/{r['arch']}/{r['variant']}/{q}")
            errs.append("-" if f is None or r.get(q) is None else f"{Fit(**f)(r['n'], r['pixels']) / r[q] - 1:+.1%}")
        lat = f"{r['lat']}x{r['lat']}" if r["component"] != "reward" else f"{8 * r['lat']} px image"
        lines.append(f"| {r['component']} | {r['arch']} | {r['variant']} | {r['n']} | {lat} | {_gb(r['peak'])} | "
                     f"{errs[0]} | {_gb(r['retained'])} | {errs[1]} | {_gb(r.get('nograd_peak'))} | {errs[2]} | "
                     f"{r['seconds']:.0f} |")
    lines += ["", "![measured and fitted activation bytes](images/memory_fit.png)", ""]
    lines += _doc_quadratic(fits, analysis.get("linear_only", {}), rows)
    if analysis["holdout"]:
        lines += ["**Extrapolation check**: each family fitted without its largest point, then asked for it "
                  "(with the full form and with the linear-only form `c + n (b + a P)`):", "",
                  "| family | quantity | point | measured GB | predicted GB (error) | linear-only GB (error) |",
                  "|---|---|---|---|---|---|"]
        for h in analysis["holdout"]:
            lines.append(f"| {h['family']} | {h['quantity']} | n={h['n']}, {h['lat']}x{h['lat']} | "
                         f"{_gb(h['measured'])} | {_gb(h['predicted'])} ({h['predicted'] / h['measured'] - 1:+.1%}) | "
                         f"{_gb(h['predicted_linear'])} ({h['predicted_linear'] / h['measured'] - 1:+.1%}) |")
        lines.append("")
    return lines


def _doc_quadratic(fits: dict, linear_only: dict, rows: list[dict]) -> list[str]:
    out = ["**Linear or quadratic in pixels?** Share of the fitted peak coming from the `q P^2` term, and the "
           "largest error on the measured points of the full fit and of a fit without `q`:", "",
           "| family | q share at the largest measured size | "
           "at the target (SD1.5 64x64 / SDXL 128x128, n=2; VAE n=1) | "
           "max error, full fit | max error, linear only |", "|---|---|---|---|---|"]
    for k, f in sorted(fits.items()):
        comp, arch, var, q = k.split("/")
        if q != "peak" or comp == "reward":
            continue
        F = Fit(**f)
        target = 128 * 128 if arch == "sdxl" else 64 * 64
        n = 1 if comp == "vae" else 2
        big = max((r["pixels"] for r in rows if (r["component"], r["arch"], r["variant"]) == (comp, arch, var)),
                  default=target)
        lin = linear_only.get(k)
        out.append(f"| {comp}/{arch}/{var} | {F.quadratic_share(n, big):.1%} | {F.quadratic_share(n, target):.1%} | "
                   f"{F.max_rel_error:.1%} | {'-' if lin is None else format(lin['max_rel_error'], '.1%')} |")
    out += ["", "With torch's default scaled-dot-product attention (a flash / memory-efficient kernel on CPU, as "
            "on GPUs with SDPA or xFormers) the attention scores are never stored, and the data choose a "
            "(near-)linear model. Forcing the math kernel (`sdpa_kernel(SDPBackend.MATH)`, the `math` rows, "
            "SD1.5 only) materialises them and a quadratic term appears: that is the regime of attention "
            "without SDPA, which these predictions do not assume.", ""]
    return out


def _doc_validation(vals: list[dict]) -> list[str]:
    if not vals:
        return []
    lines = ["## Validation against whole updates", "",
             "Whole estimator calls (`rlr_estimate`, `full_bp_estimate`, `ddpo_estimate`) on the random-init "
             "SD-shaped stacks of `benchmarks/stacks.py` (fp32, LoRA rank 4), measured end to end (weights + "
             "peak tensor allocations, as the cost suite does), against the composition above fed with the "
             "same stack's step and decode+reward segments, measured separately. This checks the composition "
             "(phases, chain rule of retained bytes, stored chain), which is what carries over to the large "
             "models.", "",
             "| stack | estimator | T | h | FO steps | B | px | measured MB | predicted MB | error | binding phase |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for v in vals:
        lines.append(f"| {v['model']} | {v['estimator']} | {v['T']} | {v['h']} | {v['fo_steps']} | {v['batch']} | "
                     f"{v['pixels']} | {v['measured'] / 1e6:.1f} | {v['predicted'] / 1e6:.1f} | "
                     f"{v['rel_error']:+.1%} | {v['binding_phase'].replace('_', '-')} |")
    worst = max(abs(v["rel_error"]) for v in vals)
    lines += ["", f"Largest error: {worst:.1%}.", ""]
    return lines


def _doc_gpu() -> list[str]:
    """Measured against predicted on a GPU (benchmarks/gpu_check), or a line saying it has not been."""
    from benchmarks.gpu_check.report import memory_doc_section

    return memory_doc_section(RESULTS.parent)


def _doc_caveats() -> list[str]:
    return ["## Caveats", "",
            "- **Allocator.** These are live tensor bytes. PyTorch's CUDA caching allocator reserves more than "
            "it allocates (block rounding, fragmentation; often 5-20%); `nvidia-smi` also shows the CUDA context "
            "(~0.3-0.5 GB) and cuDNN/cuBLAS workspaces (up to a few hundred MB). The margin column adds "
            f"{MARGIN_FRACTION:.0%} + {MARGIN_FIXED / GB:.1f} GB for these; set "
            "`PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` to keep fragmentation low.",
            "- **Kernels.** CPU kernels are not CUDA kernels: GPU convolutions may allocate workspaces the CPU "
            "ones do not, and the attention kernel decides whether the scores are stored (SDPA / xFormers: "
            "not stored, as measured here; plain attention without SDPA: add the quadratic term of the "
            "`math` rows).",
            "- **bf16 for fp16.** Same bytes per element; fp16 on a GPU may need fp32 upcasts in a few places "
            "(e.g. SDXL's VAE overflows in fp16 and is often run in fp32 or replaced by the fp16-fix VAE: "
            "a fp32 SDXL VAE doubles its weights and decode activations).",
            "- **Extrapolation.** SDXL's UNet is measured up to 64x64 latents and extrapolated to 128x128 "
            "(4x the pixels); the extrapolation check above shows how well the fitted form carries one step "
            "further. SD1.5's UNet (64x64) and the VAE (64x64 and 128x128 latents) are measured at the target "
            "sizes. The checkpointed SDXL UNet's peak is the least regular family (the peak is a maximum over "
            "blocks); its fit keeps a small quadratic term that adds 0.5 GB (batch 1) to 1 GB (batch 2) at "
            "1024 px over the linear-only fit, which is kept (the conservative choice; it is not the binding "
            "term).",
            "- **Where the memory goes.** With checkpointing, the VAE decode's backward is the largest "
            "activation term (one sample, diffusers' per-up-block checkpointing: the last up block runs at full "
            "resolution with 128 channels). Finer checkpointing inside the decoder (per ResNet block) or tiled "
            "decoding would lower SDXL's peak further; the trainer does not do this, so the model does not "
            "assume it.",
            "- **Reward.** The aesthetic reward is modelled as a CLIP ViT-L/14 image tower (its activations "
            "for B images at 224 px, measured) and the full CLIP checkpoint's weights in fp16 (the text tower "
            "is loaded but unused). Another reward changes the reward-weights column and the FO window.",
            "- **Not modelled.** The optimizer step's temporaries (a few LoRA-sized tensors), dataloader and "
            "prompt batches, EMA copies of the LoRA, other processes on the GPU.", ""]


# ----------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small points only; writes memory-model-quick.json")
    ap.add_argument("--report-only", action="store_true", help="re-fit and re-render from the saved measurements")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget-minutes", type=float, default=120.0, help="stop measuring new points after this")
    ap.add_argument("--results", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="the page (default docs/memory.md; quick: none)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("matplotlib", "PIL", "rlr_backend.lora.inject", "rlr_backend.estimators.rlr"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    path = args.results or (QUICK_RESULTS if args.quick else RESULTS)
    data = load(path)
    if not args.report_only:
        command = "python -m benchmarks.memory_model " + " ".join(sys.argv[1:] if argv is None else argv)
        data["commands"] = data.get("commands", []) + [command]
        data.update({"budget": "quick" if args.quick else "full", "command": data["commands"][0],
                     "started": data.get("started") or datetime.datetime.now(datetime.timezone.utc).isoformat(
                         timespec="seconds"), "machine": machine()})
        data.setdefault("points", [])
        data.setdefault("validation", [])
        data["counts"] = model_counts()

        def save() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=1))
            tmp.replace(path)

        deadline = time.time() + 60 * args.budget_minutes
        points = plan(args.quick)
        n_small = len(points) if args.quick else \
            next(i for i, p in enumerate(points) if p.component != "reward" and p.lat >= 48)
        run_measurements(points[:n_small], data["points"], save, deadline)
        done = {v["key"] for v in data["validation"]}
        for case in validation_cases(args.quick):
            if case.key not in done:
                v = validate(case)
                data["validation"].append(v)
                save()
                logger.info("%-58s measured %7.1f MB predicted %7.1f MB (%+.1f%%)", case.key, v["measured"] / 1e6,
                            v["predicted"] / 1e6, 100 * v["rel_error"])
        run_measurements(points[n_small:], data["points"], save, deadline)
    analysis = analyse(data)
    data["analysis"] = analysis
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    out = args.out or (None if args.quick else DOC)
    if out is not None:
        images_dir = out.parent / "images"
        images_dir.mkdir(parents=True, exist_ok=True)
        images = plot(data, analysis, images_dir)
        render(data, analysis, out, images)
        logger.info("wrote %s and %s", out, ", ".join(map(str, images)))
    summary(analysis)


def summary(analysis: dict) -> None:
    """Log the predictions table (the CLI's final output)."""
    logger.info("%-6s %-5s %-3s %-3s %-40s %-8s %9s %9s", "model", "px", "B", "FO", "options", "estim.", "peak GB",
                "+margin")
    for p in analysis["predictions"]:
        s, o = p["scenario"], p["options"]
        logger.info("%-6s %-5d %-3d %-3d %-40s %-8s %9.2f %9.2f", s["arch"], s["resolution"], s["batch"],
                    s["fo_steps"], o["label"], p["estimator"], p["bytes"] / GB, with_margin(p["bytes"]) / GB)


if __name__ == "__main__":
    main()
