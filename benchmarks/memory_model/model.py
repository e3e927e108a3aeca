"""The model: an update's peak composed from component segments (phases of each estimator, the chain rule of
retained bytes), and the prediction for a real model, resolution, batch and the trainer's options."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

from rlr_backend.choices import parse_reward_spec
from rlr_backend.rewards.models import MODEL_REWARDS
from rlr_backend.train.config import TrainConfig
from rlr_backend.train.memory import PRECISIONS
from rlr_backend.train.quantize import BASE_QUANTIZATIONS

from ..sd_archs import ARCHS, build_unet, build_vae, lora_param_count, param_count, reward_params, text_encoder_params
from .fit import Fits
from .measure import SegmentMemory
from .store import GB


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
    """A run's memory-relevant settings in bytes, read off a ``TrainConfig`` by :meth:`from_config` (the
    trainer's options are defined once, there); ``reward_fp32`` is the one what-if a config cannot say (a
    model reward left in fp32: ``rlr-train`` loads model rewards in ``precision``)."""

    checkpointing: bool  # gradient_checkpointing: UNet blocks + step-level checkpoint + VAE sliced per sample
    offload_text: bool  # offload_text_encoders: text encoders moved to the CPU after encoding
    adam_8bit: bool  # optimizer adam8bit: Adam moments 2 bytes/param instead of 8
    reward_fp32: bool  # reward model in fp32 (weights 4 bytes/param, activations ~2x the measured bf16)
    weight_bytes: float  # precision: bytes per frozen weight, 2 (fp16/bf16 on a GPU) or 4 (fp32, e.g. on a CPU)
    reward_model: bool  # the reward names a model reward (modelled as the aesthetic CLIP); False: rule rewards only
    label: str = ""
    base_bytes: float | None = None  # base_precision int8 / nf4: bytes per Linear weight of the denoiser; None: auto

    @classmethod
    def from_config(cls, cfg: TrainConfig, label: str = "", *, reward_fp32: bool = False) -> Options:
        names = {name for name, _, _ in parse_reward_spec(cfg.reward)}
        base = BASE_QUANTIZATIONS.get(cfg.base_precision)
        return cls(checkpointing=cfg.gradient_checkpointing, offload_text=cfg.offload_text_encoders,
                   adam_8bit=cfg.optimizer == "adam8bit", reward_fp32=reward_fp32,
                   weight_bytes=float(PRECISIONS[cfg.precision].itemsize),
                   reward_model=bool(names & set(MODEL_REWARDS)), label=label,
                   base_bytes=None if base is None else base.bytes_per_weight)


def gpu_config(**changes) -> TrainConfig:
    """The run the predictions are for: fp16 weights on a GPU, the aesthetic reward, text encoders kept on the
    GPU unless ``changes`` offload them (rlr-train's default does), the trainer's other defaults."""
    return TrainConfig(**{"precision": "fp16", "reward": "aesthetic", "offload_text_encoders": False, **changes})


OPTION_SETS: tuple[Options, ...] = (
    Options.from_config(gpu_config(), "no options"),
    Options.from_config(gpu_config(gradient_checkpointing=True), "gradient checkpointing"),
    Options.from_config(gpu_config(gradient_checkpointing=True, offload_text_encoders=True),
                        "checkpointing + text-encoder offload"),
    Options.from_config(gpu_config(gradient_checkpointing=True, offload_text_encoders=True, optimizer="adam8bit"),
                        "... + 8-bit Adam"),
    Options.from_config(gpu_config(gradient_checkpointing=True, offload_text_encoders=True),
                        "ckpt + offload, reward in fp32", reward_fp32=True),
)


@dataclass(frozen=True)
class PartScale:
    """Multipliers (peak, retained, no-grad peak) of the two CPU-fitted parts an update is composed of, one
    denoiser call and the decode + reward, as a GPU measured them (``gpu_correction``); 1 = the CPU fit."""

    step: tuple[float, float, float] = (1.0, 1.0, 1.0)
    decode: tuple[float, float, float] = (1.0, 1.0, 1.0)


def _scaled(seg: SegmentMemory, f: tuple[float, float, float]) -> SegmentMemory:
    return SegmentMemory(seg.peak * f[0], seg.retained * f[1], seg.nograd * f[2])


def unet_call(fits: Fits, arch: str, n: int, px: int, ckpt: bool) -> SegmentMemory:
    """One denoiser call of batch n as fitted (block-level checkpointing inside it when ``ckpt``)."""
    var = "ckpt" if ckpt else "plain"
    nograd = fits.get("unet", arch, "plain", "nograd_peak")(n, px) if fits.has("unet", arch, "plain", "nograd_peak") \
        else 0.0
    return SegmentMemory(fits.get("unet", arch, var, "peak")(n, px), fits.get("unet", arch, var, "retained")(n, px),
                         nograd)


def _unet_step(fits: Fits, arch: str, n: int, px: int, ckpt: bool, channels: int = 4,
               scale: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> SegmentMemory:
    """One UNet (or flow transformer) step as a segment (a call of batch n: 2B with CFG); checkpointed: block-level
    checkpointing inside the call plus a step-level checkpoint (keeps only its inputs: n latents of ``channels``)."""
    seg = _scaled(unet_call(fits, arch, n, px, ckpt), scale)
    if ckpt:
        seg = checkpointed(seg, input_bytes=n * channels * px * 4.0)
    return seg


def decode_and_reward(fits: Fits, batch: int, px: int, ckpt: bool, with_reward: bool = True,
                      reward_scale: float = 1.0, channels: int = 4,
                      scale: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> SegmentMemory:
    """VAE decode (+ the aesthetic reward) as one segment, as ``DiffusersModel.decode`` runs it, its bytes
    multiplied by ``scale`` (peak, retained, no-grad peak; a GPU's measured ratios, ``gpu_correction``).
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
        vae = SegmentMemory((batch - 1) * img + one, batch * (img + channels * px * 4.0), nograd + batch * img)
    else:
        vae = SegmentMemory(fits.get("vae", "sd-vae", "plain", "peak")(batch, px),
                            fits.get("vae", "sd-vae", "plain", "retained")(batch, px), nograd)
    if not with_reward:
        return _scaled(vae, scale)
    # measured on 512 px inputs; at 1024 px the reward's input and its gradient grow by ~10 MB per image
    rew = SegmentMemory(*(reward_scale * fits.get("reward", "clip-vit-l14", "plain", q)(batch, 0)
                          for q in ("peak", "retained", "nograd_peak")))
    return _scaled(sequential(vae, rew), scale)


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
    cfg: bool = True  # sampling makes an unconditional pass: the denoiser is called on 2B latents
    channels: int = 4  # latent channels (4: SD; 16: SD3.5, FLUX.1, Z-Image)

    @property
    def call_batch(self) -> int:
        return 2 * self.batch if self.cfg else self.batch


def persistent_bytes(arch: str, opts: Options, lora_rank: int, counts: dict[str, int]) -> dict[str, float]:
    """Bytes held through the whole update: fp16 weights (UNet, VAE, reward, text encoders unless
    offloaded; the denoiser's Linear weights at ``opts.base_bytes`` when quantized) and the LoRA in fp32 with
    its gradient and Adam's two moments."""
    lora = counts[f"lora_{arch}_r{lora_rank}"]
    w = opts.weight_bytes
    unet = w * counts[f"unet_{arch}"]
    if opts.base_bytes is not None:
        unet -= (w - opts.base_bytes) * counts[f"unet_linear_{arch}"]
    return {"unet weights": unet, "vae weights": w * counts.get(f"vae_{arch}", counts.get("vae", 0)),
            "reward weights": ((4.0 if opts.reward_fp32 else w) * counts["reward"]) if opts.reward_model else 0.0,
            "text encoders": 0.0 if opts.offload_text else w * counts[f"text_{arch}"],
            "lora + grad": 8.0 * lora, "adam moments": (2.0 if opts.adam_8bit else 8.0) * lora}


def predict(fits: Fits, s: Scenario, opts: Options, counts: dict[str, int], estimator: str = "rlr",
            parts: PartScale | None = None) -> dict:
    """Predicted peak bytes of one update of ``estimator`` (one of PHASE_ESTIMATORS; truncated_bp
    backpropagates the last ``s.fo_steps`` steps) with a breakdown; ``parts`` scales the CPU-fitted parts
    to what a GPU measured (``gpu_correction``)."""
    if estimator not in PHASE_ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {list(PHASE_ESTIMATORS)}")
    parts = parts or PartScale()
    px = (s.resolution // 8) ** 2
    step = _unet_step(fits, s.arch, s.call_batch, px, opts.checkpointing, s.channels, parts.step)
    scale = 2.0 if opts.reward_fp32 else 1.0
    dec = decode_and_reward(fits, s.batch, px, opts.checkpointing, with_reward=opts.reward_model, reward_scale=scale,
                            channels=s.channels, scale=parts.decode)
    phases = update_phases(estimator, step, dec, T=s.T, h=s.h, fo_steps=s.fo_steps)
    act, phase = phases.peak()
    pers = persistent_bytes(s.arch, opts, s.lora_rank, counts)
    store = chain_store_bytes(s.T, s.batch, px, s.channels)
    evaluation = evaluation_bytes(fits, s, opts, px, parts)
    if s.eval_images and evaluation > store + act:  # the evaluation between updates binds
        act, phase, store = evaluation, "evaluation", 0.0
    total = sum(pers.values()) + store + act
    return {"scenario": asdict(s), "options": asdict(opts), "estimator": estimator, "bytes": total,
            "activations": act, "binding_phase": phase, "chain_store": store, "persistent": pers,
            "phases": {**asdict(phases), "evaluation": evaluation}, "step": asdict(step),
            "decode_reward": asdict(dec)}


def evaluation_bytes(fits: Fits, s: Scenario, opts: Options, px: int, parts: PartScale | None = None) -> float:
    """The trainer's evaluation (``Trainer.evaluate``, at the start and every eval_every updates): the
    ``eval_images`` sampled together without grad (their chain stored), decoded (one at a time with
    checkpointing on) and scored."""
    if not s.eval_images:
        return 0.0
    parts = parts or PartScale()
    e = s.eval_images
    step = _unet_step(fits, s.arch, 2 * e if s.cfg else e, px, False, s.channels, parts.step)
    dec = decode_and_reward(fits, e, px, opts.checkpointing, with_reward=opts.reward_model, channels=s.channels,
                            scale=parts.decode)
    return chain_store_bytes(s.T, e, px, s.channels) + max(step.nograd, dec.nograd)


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



MARGIN_FRACTION = 0.15  # CUDA caching allocator fragmentation, kernel workspaces
MARGIN_FIXED = 0.5 * GB  # CUDA context (not in torch's counters)


def with_margin(b: float) -> float:
    return b * (1 + MARGIN_FRACTION) + MARGIN_FIXED


#: GPU memory sizes (GB) of common cards: 8 (RTX 3070/4060), 12 (3060/4070), 16 (4060 Ti 16G/4080), 24 (3090/4090),
#: 48 (A6000/L40S), 80 (A100/H100)
CARDS: tuple[int, ...] = (8, 12, 16, 24, 48, 80)


def smallest_card(b: float) -> str:
    """The smallest card of :data:`CARDS` the predicted peak fits with the margin ("8 GB" fits 8 GB and up)."""
    return next((f"{c} GB" for c in CARDS if with_margin(b) <= c * GB), f"> {CARDS[-1]} GB")
