"""Where the model lives and what it keeps in memory: device, precision, recomputation, optimizer.

The options a consumer GPU needs (docs/memory.md has the measured memory model):

* ``precision``: frozen weights (UNet, VAE, text encoders) in fp16/bf16, the LoRA parameters and their
  optimizer state in fp32, model calls under ``torch.autocast``. fp16 also gets a dynamic loss scale
  (``DynamicLossScale``), because small LoRA gradients underflow in fp16; bf16 does not need one.
* ``gradient_checkpointing``: diffusers' block checkpointing inside every UNet call with a graph, the
  estimators' step-level checkpointing of a backpropagated window, and the VAE decoder run one image at
  a time (under grad: each image under a checkpoint, with diffusers' up-block checkpointing inside and,
  for ``AutoencoderKL`` decoders, every resnet, attention and upsampler of it under its own checkpoint:
  :func:`set_decoder_checkpointing`; without grad, e.g. for evaluation images: one at a time). Reward
  models are not checkpointed: their activations are a small part at their input size (CLIP ViT-L/14 at
  224 px: 0.18 GB per image in half precision, docs/memory.md). Gradients are unchanged; each
  backpropagated step costs one more forward, a backpropagated decode three more.
* ``base_precision``: the denoiser's frozen Linear weights stored in int8 or NF4 (``train.quantize``).
* ``offload_text_encoders``: text encoders stay on the CPU (prompts are encoded once and cached); only
  the UNet and the VAE go to the GPU.
* ``optimizer = "adam8bit"``: bitsandbytes' 8-bit Adam when it is installed.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
from typing import Callable, Sequence

import torch
from torch.utils.checkpoint import checkpoint

from ..choices import OPTIMIZERS, PRECISION_NAMES
from .quantize import quantize_base

logger = logging.getLogger(__name__)

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
assert tuple(PRECISIONS) == PRECISION_NAMES, "choices.PRECISION_NAMES and PRECISIONS disagree"


def resolve_device(name: str) -> torch.device:
    """``auto`` -> the first CUDA GPU if there is one, else the CPU; ``cuda``/``cuda:N``/``mps`` must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: this torch has no CUDA GPU (torch {torch.__version__}); use "
                             "--device cpu, or install a CUDA build of torch")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA GPU(s) found")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps': not available in this torch build or on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


#: VAE classes whose decoder sub-blocks are pure functions of their inputs (no frame caches, unlike the video
#: VAEs of Wan and Qwen-Image), so each can be recomputed on its own: SD1.x, SDXL, SD3.5, FLUX.1, Z-Image
FINE_CHECKPOINT_VAES = ("AutoencoderKL",)


def _checkpointed_forward(module: torch.nn.Module, *args, **kwargs):
    forward = type(module).forward
    if torch.is_grad_enabled():
        return checkpoint(forward, module, *args, use_reentrant=False, **kwargs)
    return forward(module, *args, **kwargs)


def set_decoder_checkpointing(vae: torch.nn.Module, enabled: bool) -> int:
    """Turn the VAE decoder's gradient checkpointing on or off: diffusers' own (one checkpoint per up-block)
    and, for :data:`FINE_CHECKPOINT_VAES`, a checkpoint around each resnet, attention and upsampler inside
    it, so the backward of an up-block holds its sub-blocks' inputs and one sub-block's activations at a
    time instead of the whole block's (the full-resolution up-block binds: at 256 px on the CPU the
    checkpointed decode's peak falls from 393 to 225 MB; on an H200 the decode + reward backward of one SDXL
    1024 px image from 11.4 to 6.5 GB, docs/gpu_check.md). Gradients are unchanged; each
    sub-block runs one more forward. Returns the number of sub-blocks under their own checkpoint."""
    (vae.enable_gradient_checkpointing if enabled else vae.disable_gradient_checkpointing)()
    dec = getattr(vae, "decoder", None)
    if type(vae).__name__ not in FINE_CHECKPOINT_VAES or dec is None:
        return 0
    mid = getattr(dec, "mid_block", None)
    subs = [*getattr(mid, "resnets", []), *getattr(mid, "attentions", [])]
    for block in getattr(dec, "up_blocks", []):
        subs += [*getattr(block, "resnets", []), *(getattr(block, "upsamplers", None) or [])]
    for m in subs:
        if enabled:  # an instance attribute over the class's forward; a partial, so deepcopy rebinds it
            m.forward = functools.partial(_checkpointed_forward, m)
        else:
            m.__dict__.pop("forward", None)
    return len(subs) if enabled else 0


def load_dtypes(precision: str, offload_text_encoders: bool) -> dict[str, torch.dtype]:
    """The dtypes to load a model in for these options, as :func:`prepare_model` keeps them (UNet and VAE in
    ``precision``; text encoders fp32 when offloaded to the CPU, else ``precision``): keyword arguments of
    ``models.loader.load_pipeline``, so the weights are read straight into them (no fp32 copy first)."""
    dtype = PRECISIONS[precision]
    return {"dtype": dtype, "text_encoder_dtype": torch.float32 if offload_text_encoders else dtype}


def prepare_model(model, trainable: Sequence[torch.nn.Parameter], *, device: str, precision: str,
                  gradient_checkpointing: bool, offload_text_encoders: bool, base_precision: str = "auto") -> torch.device:
    """Move and cast a diffusers-backed ``TrainableModel`` after its LoRA was added: frozen weights to
    ``precision`` on ``device``, ``trainable`` in fp32, the denoiser's frozen Linear weights quantized to
    ``base_precision`` (``train.quantize``; on the CPU, before the move), checkpointing on if asked. Returns the
    device the trainer must put its tensors on.

    Offloaded text encoders stay on the CPU in fp32 (prompts are encoded once and cached, so they cost
    CPU memory only). Models that are not diffusers pipelines (the ComfyUI adapter) run where their
    adapter puts them (the CPU); for them only the defaults are accepted, not silently ignored."""
    unet, vae = getattr(model, "unet", None), getattr(model, "vae", None)
    if unet is None or vae is None or getattr(model, "pipe", None) is None:
        if device not in ("auto", "cpu") or precision != "fp32" or gradient_checkpointing or base_precision != "auto":
            raise ValueError(f"{type(model).__name__} manages its own device and precision; the device, precision, "
                             "base_precision and gradient_checkpointing options apply to diffusers models")
        return torch.device("cpu")
    target = resolve_device(device)
    dtype = PRECISIONS[precision]
    pipe = model.pipe
    encoders = list(model.text_encoders().values()) if hasattr(model, "text_encoders") else \
        [m for m in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if m is not None]
    keep = {id(p) for p in trainable}
    for module in (unet, vae, *([] if offload_text_encoders else encoders)):
        for p in module.parameters():
            if id(p) not in keep and p.dtype.is_floating_point:
                p.data = p.data.to(dtype)
        for b in module.buffers():
            if b.dtype.is_floating_point:
                b.data = b.data.to(dtype)
    for p in trainable:
        p.data = p.data.float()
    quantize_base(unet, base_precision, dtype)
    unet.to(target)
    vae.to(target)
    for enc in encoders:
        enc.to("cpu" if offload_text_encoders else target)
    model.decode_one_at_a_time = gradient_checkpointing
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        set_decoder_checkpointing(vae, True)
    logger.info("model on %s, frozen weights %s%s, LoRA fp32%s%s", target, precision,
                "" if base_precision == "auto" else f" (the denoiser's Linear weights {base_precision})",
                ", gradient checkpointing" if gradient_checkpointing else "",
                ", text encoders on the CPU" if offload_text_encoders and target.type != "cpu" else "")
    return target


def reward_models_in_precision(reward, device: torch.device, precision: str) -> int:
    """Load the preference-model parts of ``reward`` (aesthetic, PickScore, ...; weighted sums included)
    in ``precision`` on a GPU, as the frozen diffusion weights; returns how many were set. On the CPU they
    stay fp32 (CPUs emulate half precision slowly). Only rewards not yet loaded are changed."""
    from ..rewards.models.local import LocalModelReward

    if precision == "fp32" or device.type == "cpu":
        return 0
    parts = [r for r, _ in getattr(reward, "parts", [(reward, 1.0)])]
    changed = 0
    for part in parts:
        if isinstance(part, LocalModelReward) and not part._loaded:
            part.dtype = PRECISIONS[precision]
            changed += 1
    return changed


def autocast(device: torch.device, precision: str):
    """The autocast context for model calls (a no-op in fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[precision])


class DynamicLossScale:
    """fp16 loss scaling as torch's GradScaler does it, for estimators that call ``backward`` themselves:
    losses are multiplied by ``scale`` (``ChainProblem.loss_scale``, written by ``estimators.Gradients``), gradients divided by it;
    a non-finite gradient halves the scale (the update is skipped), ``growth_interval`` finite updates in
    a row double it. It starts at 2^10, not GradScaler's 2^16: likelihood-ratio gradients carry 1/sigma
    factors and overflowed fp16 at 2^16 on the default model's first update."""

    def __init__(self, scale: float = 2.0**10, growth_interval: int = 500):
        self.scale, self.growth_interval, self.good_steps = float(scale), growth_interval, 0

    def unscale_and_update(self, params: Sequence[torch.Tensor]) -> bool:
        """Divide the gradients by the scale; return False (and lower the scale) if any is not finite."""
        grads = [p.grad for p in params if p.grad is not None]
        for g in grads:
            g.div_(self.scale)
        if not all(torch.isfinite(g).all() for g in grads):
            self.scale, self.good_steps = max(self.scale / 2, 1.0), 0
            logger.info("fp16 gradient overflow: loss scale lowered to %g", self.scale)
            return False
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale, self.good_steps = self.scale * 2, 0
        return True

    def state_dict(self) -> dict[str, float]:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])


def make_optimizer(name: str, params: Sequence[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """Adam, or bitsandbytes' 8-bit Adam (moments in 8 bits) when ``name == "adam8bit"``."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "adam8bit":
        try:
            bnb = importlib.import_module("bitsandbytes")
        except ImportError:
            raise ValueError("optimizer 'adam8bit' needs bitsandbytes (pip install bitsandbytes; it needs a "
                             "CUDA GPU); or use optimizer 'adam'") from None
        return bnb.optim.Adam8bit(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {list(OPTIMIZERS)}")


def peak_allocated(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak bytes of tensor memory allocated while ``fn`` runs, beyond what was live before.

    On a CUDA device: torch's peak-memory counter. On the CPU (no such counter): from the profiler's
    allocation and free events in time order ("[memory]" events outside ops, self usage inside them)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _native_stderr_silenced():  # the profiler's C++ side prints a line when it starts and stops
        prof.__enter__()
    try:
        fn()
    finally:
        with _native_stderr_silenced():
            prof.__exit__(None, None, None)
    cur = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        # allocations/frees outside any op are "[memory]" events; inside an op they are netted into
        # its self usage (children excluded), so summing both in start order tracks live bytes
        cur += e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        peak = max(peak, cur)
    return peak


@contextlib.contextmanager
def _native_stderr_silenced():
    """Send file descriptor 2 to /dev/null for the block (native libraries write there directly)."""
    import os
    import sys

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (e.g. captured by a test runner): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
