"""``TrainableModel`` for diffusers flow-matching (rectified flow) pipelines: SD3 / SD3.5 here, FLUX.1 in
:mod:`rlr_backend.models.flux_model`, Z-Image in :mod:`rlr_backend.models.zimage_model`, Qwen-Image in
:mod:`rlr_backend.models.qwenimage_model`.

What every kind shares (``FlowModel``): the chain is a ``FlowSchedule`` built from the pipeline's own
``FlowMatchEulerDiscreteScheduler`` (its static shift, or the dynamic shift mu the pipeline computes from the
number of image tokens), with this project's step kind (flow_sde / dance_sde / cps) and eta; latents are kept
as the VAE makes them, (B, C, H, W) (a video VAE's (B, C, 1, H, W): Qwen-Image), and decoded with the VAE's
scaling *and* shift factors (a video VAE's per-channel mean and std); prompts are
encoded by the pipeline's own ``encode_prompt`` (so the conditioning equals diffusers'), one text at a time
and cached. The denoiser returns the velocity v = eps - x_0 for the chain's time input sigma * 1000
(``FLOW_TIME_SCALE``), converting to the model's own time convention. LoRA: peft on ``pipe.transformer``,
exported as diffusers/PEFT keys ``transformer.<module>.lora_A/B.weight`` with the scale folded in
(:mod:`rlr_backend.lora.diffusers_export`), which diffusers' ``load_lora_weights`` and ComfyUI both load.

The subclasses only say how their transformer is called (``FlowDenoiser._forward``), how a prompt is encoded,
and the kohya-style id of the architecture (``base_model_version``: ``sd3``, ``flux1``, ``zimage``,
``qwen_image``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from ..lora import add_lora, load_lora_state_dict, set_lora_scale
from ..lora.diffusers_export import diffusers_state_dict
from ..sampling import FLOW_TIME_SCALE, FlowSchedule, classifier_free_guidance
from .diffusers_model import decode_latents

logger = logging.getLogger(__name__)

#: attention projections of the joint (MMDiT) blocks: image and text streams (Flow-GRPO's SD3 targets)
MMDIT_LORA_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                                       "to_add_out")


@dataclass(frozen=True)
class FlowConditioning:
    """One batch of conditioning for a flow transformer: ``embeds`` (B, L, D) or, for models with
    per-prompt lengths (Z-Image), a list of (L_i, D); ``pooled`` (B, P) where the model takes it; the
    negative (empty-prompt) versions ``uncond`` / ``uncond_pooled`` for classifier-free guidance, or None."""

    embeds: Any
    pooled: Tensor | None = None
    uncond: Any = None
    uncond_pooled: Tensor | None = None

    def __len__(self) -> int:
        return len(self.embeds)


class FlowDenoiser:
    """The transformer as a ``Denoiser`` on a flow chain: ``x`` (B, ...) at time input sigma * 1000 -> the
    velocity (float32), with classifier-free guidance through ``classifier_free_guidance`` when the model
    uses it (one batched call of size 2B). Subclasses implement ``_forward(x, sigma, embeds, pooled)``."""

    def __init__(self, model: "FlowModel", guidance_scale: float):
        if not (guidance_scale >= 0 and math.isfinite(guidance_scale)):
            raise ValueError(f"guidance_scale must be a number >= 0, got {guidance_scale}")
        self.model = model
        self.transformer = model.transformer
        self.guidance_scale = float(guidance_scale)

    @property
    def cfg_weight(self) -> float | None:
        """The standard CFG weight w (eps_u + w (eps_c - eps_u)), or None when no unconditional pass is made."""
        return self.guidance_scale if self.guidance_scale > 1 else None

    def __call__(self, x: Tensor, timestep: float, cond: FlowConditioning) -> Tensor:
        sigma = float(timestep) / FLOW_TIME_SCALE
        w = self.cfg_weight
        if w is None or cond.uncond is None:
            return self._forward(x, sigma, cond.embeds, cond.pooled).float()
        embeds = _cat(cond.uncond, cond.embeds)
        pooled = None if cond.pooled is None else torch.cat([cond.uncond_pooled, cond.pooled])
        uncond, text = self._forward(torch.cat([x, x]), sigma, embeds, pooled).float().chunk(2)
        return self.guide(uncond, text, w)

    def guide(self, uncond: Tensor, text: Tensor, w: float) -> Tensor:
        """The guided velocity from the unconditional and conditional ones: standard CFG here; a model whose pipeline
        guides otherwise (Qwen-Image's norm-rescaled true CFG) overrides this."""
        return classifier_free_guidance(uncond, text, w)

    def _forward(self, x: Tensor, sigma: float, embeds, pooled: Tensor | None) -> Tensor:
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: the first floating-point weight's (a 4-bit quantized base weight is stored as uint8)."""
        return next(p.dtype for p in self.transformer.parameters() if p.dtype.is_floating_point)


def _cat(a, b):
    return a + b if isinstance(a, list) else torch.cat([a, b])


class SD3Denoiser(FlowDenoiser):
    """SD3 / SD3.5: ``transformer(hidden_states, timestep=sigma * 1000, encoder_hidden_states, pooled_projections)``
    (the time input as the chain has it); real CFG for guidance_scale > 1, as the pipeline."""

    def _forward(self, x: Tensor, sigma: float, embeds: Tensor, pooled: Tensor | None) -> Tensor:
        dt = self.dtype
        t = torch.full((x.shape[0],), sigma * FLOW_TIME_SCALE, device=x.device, dtype=dt)
        return self.transformer(hidden_states=x.to(dt), timestep=t, encoder_hidden_states=embeds.to(x.device, dt),
                                pooled_projections=pooled.to(x.device, dt), return_dict=False)[0]


class FlowModel:
    """Shared parts of the flow-matching ``TrainableModel`` adapters (see the module docstring).

    ``image_size`` (pixels, a multiple of 16) overrides the default resolution (the pipeline's, at most
    ``train_size``: reward fine-tuning of the 1024-px models runs at 512 px, as Flow-GRPO does); ``defaults`` is a
    folder's ``rlr_defaults.json`` (``max_sequence_length``, ``shift``, ``base_model_version``), read by the
    loader into ``pipe.rlr_defaults``. A ``shift`` there replaces the pipeline's scheduler by one with that
    shift (so diffusers' own sampling of the pipeline uses it too)."""

    base_model_version = "sd3"
    #: this model samples on a flow chain: the trainer passes the flow options (step kind, SDE window)
    flow = True
    denoiser_cls: type[FlowDenoiser] = SD3Denoiser
    lora_targets: tuple[str, ...] = MMDIT_LORA_TARGETS
    #: the pipeline passes sigmas = linspace(1, 1/N, N) to the scheduler (FLUX, Z-Image); SD3 lets it space them
    pipeline_sigmas = False
    text_encoder_names: tuple[str, ...] = ("text_encoder", "text_encoder_2", "text_encoder_3")
    default_max_sequence_length = 256
    #: the largest default resolution (pixels); ``image_size`` goes above it
    train_size = 512
    #: key prefix of the exported LoRA (``lora.diffusers_export``): the one both diffusers and ComfyUI map
    lora_prefix = "transformer."

    def __init__(self, pipe, image_size: int | None = None, defaults: dict | None = None):
        self.pipe, self.transformer, self.vae = pipe, pipe.transformer, pipe.vae
        self.defaults = dict(defaults if defaults is not None else getattr(pipe, "rlr_defaults", None) or {})
        self.base_model_version = self.defaults.get("base_model_version", type(self).base_model_version)
        self.max_sequence_length = int(self.defaults.get("max_sequence_length", self.default_max_sequence_length))
        if "shift" in self.defaults and hasattr(pipe.scheduler.config, "shift") \
                and float(self.defaults["shift"]) != float(pipe.scheduler.config.shift):
            pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, shift=float(self.defaults["shift"]))
        self.transformer.requires_grad_(False)
        self.vae.requires_grad_(False)
        for enc in self.text_encoders().values():
            enc.requires_grad_(False)
        self.vae_scale_factor = self._vae_scale_factor()
        size = image_size if image_size is not None else getattr(pipe, "rlr_image_size", None)
        self.image_size = int(size) if size is not None else min(self.native_image_size(), self.train_size)
        multiple = self.vae_scale_factor * self.patch_size
        if self.image_size < multiple or self.image_size % multiple:
            raise ValueError(f"image_size must be a positive multiple of {multiple} pixels for this "
                             f"{type(self).__name__} (VAE factor {self.vae_scale_factor} x patch {self.patch_size}), "
                             f"got {self.image_size}")
        side = self.image_size // self.vae_scale_factor
        self.latent_shape = (self.latent_channels, *self.latent_frames, side, side)
        self._cache: dict[str, tuple] = {}

    # -- what subclasses may override ------------------------------------------------------------
    #: extra latent dimensions between channels and height: () for image VAEs, (1,) for a video VAE's one frame
    latent_frames: tuple[int, ...] = ()

    def _vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def patch_size(self) -> int:
        return int(getattr(self.transformer.config, "patch_size", 2))

    @property
    def latent_channels(self) -> int:
        return int(self.transformer.config.in_channels)

    def native_image_size(self) -> int:
        return int(self.transformer.config.sample_size) * self.vae_scale_factor

    def encode_one(self, text: str) -> tuple:
        """(embeds (L, D), pooled (P,)) of one text, as the pipeline's ``encode_prompt`` gives them."""
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompt=text, prompt_2=None, prompt_3=None, device=self.text_device,
                                                       do_classifier_free_guidance=False,
                                                       max_sequence_length=self.max_sequence_length)
        return embeds[0], pooled[0]

    @property
    def text_device(self) -> torch.device:
        """Where the (first) text encoder is: prompts are encoded there."""
        return next(iter(self.text_encoders().values())).device

    # -- TrainableModel --------------------------------------------------------------------------
    def text_encoders(self) -> dict[str, torch.nn.Module]:
        return {n: getattr(self.pipe, n) for n in self.text_encoder_names if getattr(self.pipe, n, None) is not None}

    @property
    def unet(self) -> torch.nn.Module:
        """The denoising network under the name the memory options use (``train.memory.prepare_model``)."""
        return self.transformer

    def image_seq_len(self) -> int:
        """Image tokens the transformer sees ((H/16)(W/16) for a 2x2 patch), for the dynamic shift mu."""
        h, w = self.latent_shape[-2:]
        return (h // self.patch_size) * (w // self.patch_size)

    def schedule(self, num_steps: int, eta: float, *, kind: str = "flow_sde",
                 sde_window: tuple[int, int] | None = None) -> FlowSchedule:
        """The chain the pipeline samples with (its scheduler's shift; mu from the image tokens when the scheduler
        shifts dynamically; FLUX/Z-Image's sigmas), with the step ``kind``, ``eta`` and an optional SDE window
        ``(start, size)`` (ODE steps elsewhere)."""
        cfg = self.pipe.scheduler.config
        mu = None
        if cfg.get("use_dynamic_shifting", False):
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            mu = calculate_shift(self.image_seq_len(), cfg.get("base_image_seq_len", 256),
                                 cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                                 cfg.get("max_shift", 1.15))
        sigmas = torch.linspace(1.0, 1.0 / num_steps, num_steps).tolist() if self.pipeline_sigmas else None
        return FlowSchedule.from_diffusers(self.pipe.scheduler, num_steps, kind=kind, eta=eta, sde_window=sde_window,
                                           sigmas=sigmas, mu=mu)

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> list[tuple]:
        """Per-text conditioning, cached; each text is encoded alone (batch shape can change float results)."""
        for text in dict.fromkeys(texts):
            if text not in self._cache:
                self._cache[text] = tuple(t.detach() if torch.is_tensor(t) else t for t in self.encode_one(text))
        return [self._cache[t] for t in texts]

    def conditioning(self, texts: Sequence[str]) -> FlowConditioning:
        cond, neg = self.encode(list(texts)), self.encode([""]) * len(texts)
        return self._batch(cond, neg)

    def _batch(self, cond: list[tuple], neg: list[tuple]) -> FlowConditioning:
        embeds, pooled = torch.stack([c[0] for c in cond]), torch.stack([c[1] for c in cond])
        return FlowConditioning(embeds, pooled, torch.stack([c[0] for c in neg]), torch.stack([c[1] for c in neg]))

    def denoiser(self, guidance_scale: float) -> FlowDenoiser:
        return self.denoiser_cls(self, guidance_scale)

    decode_one_at_a_time: bool = False

    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> float32 images in [0, 1]: D(z / scaling + shift), differentiable."""
        return decode_latents(self.vae, latents, self.decode_one_at_a_time)

    def add_lora(self, rank: int, alpha: float | None, seed: int) -> list[tuple[str, torch.nn.Parameter]]:
        add_lora(self.transformer, rank=rank, alpha=alpha, seed=seed, target_modules=self.lora_targets)
        return [(n, p) for n, p in self.transformer.named_parameters() if p.requires_grad]

    def lora_state_dict(self, dtype: torch.dtype = torch.float16) -> tuple[dict[str, Tensor], int, float]:
        """(diffusers/PEFT keys ``<lora_prefix><module>.lora_A/B.weight`` with alpha/rank folded into B, rank,
        alpha = rank): what the file's loaders apply at scale 1."""
        return diffusers_state_dict(self.transformer, dtype=dtype, prefix=self.lora_prefix)

    def load_lora(self, state_dict: dict[str, Tensor], strength: float = 1.0) -> None:
        """Apply a LoRA (diffusers/PEFT ``transformer.`` keys, PEFT or bare module names) at ``strength``."""
        adapters = getattr(self.transformer, "peft_config", {}) or {}
        name = f"applied_{len(adapters)}"
        load_lora_state_dict(self.transformer, state_dict, adapter_name=name, source="LoRA",
                             model_version=self.base_model_version)
        self.transformer.set_adapters([name], weights=[strength])
        set_lora_scale([self.transformer], name, strength)


class SD3Model(FlowModel):
    """``StableDiffusion3Pipeline`` (SD3 medium, SD3.5 medium / large, the default flow model): CLIP-L + CLIP-G
    (+ T5 when the folder has it; without it diffusers pads with zeros), real CFG with the empty prompt."""


class PackedFlowModel(FlowModel):
    """The pipelines that pack 2x2 latent patches into tokens themselves (FLUX.1, Qwen-Image): the transformer's
    ``in_channels`` count a packed token's channels, and the default size is 128 latent pixels a side."""

    @property
    def patch_size(self) -> int:
        return 2  # the pipeline packs 2x2 latent patches into tokens

    @property
    def latent_channels(self) -> int:
        return int(self.transformer.config.in_channels) // 4

    def native_image_size(self) -> int:
        return 128 * self.vae_scale_factor  # the pipeline's default_sample_size
