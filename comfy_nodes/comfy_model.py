"""``TrainableModel`` over ComfyUI's MODEL / CLIP / VAE (SD1.x, SD2.x, SDXL UNets).

* Gradients flow through a clone of the user's ModelPatcher: every weight and bias of the UNet and
  the VAE gets a weight wrapper (a LoRA on the attention projections, identity elsewhere), so
  ComfyUI's ``cast_bias_weight`` hands the layers fresh copies instead of the inference tensors the
  checkpoint loader made (those cannot be saved for backward).
* The chain runs in DDPM variables x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps on the model's own
  discrete schedule (abar = 1 / (1 + sigma^2) from ``model_sampling.sigmas``); ``apply_model`` gets
  x_t / sqrt(abar) and sigma (ComfyUI's variables) and returns x_0, from which eps is recovered.
* LoRA keys: kohya ``lora_unet_<diffusers module path>``, mapped with ``comfy.utils.unet_to_diffusers``,
  so the file loads in ComfyUI, A1111/Forge and diffusers like the backend's own exports.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

import comfy.model_management as mm
import comfy.model_sampling
import comfy.utils
import torch
from torch import Tensor

from rlr_backend.lora import init_down, is_target, kohya_key, kohya_tensors, one_rank_and_alpha, resolve_alpha
from rlr_backend.sampling import DDIMSchedule, classifier_free_guidance

logger = logging.getLogger(__name__)


class LoraWrapper(torch.nn.Module):
    """W -> W + strength * (alpha / rank) * up @ down (a ComfyUI weight function)."""

    def __init__(self, down: Tensor, up: Tensor, alpha: float):
        super().__init__()
        self.down, self.up = torch.nn.Parameter(down), torch.nn.Parameter(up)
        self.alpha, self.strength = float(alpha), 1.0

    def forward(self, weight: Tensor) -> Tensor:
        delta = (self.up @ self.down) * (self.alpha / self.down.shape[0] * self.strength)
        return weight + delta.to(weight.dtype).reshape(weight.shape)


def _identity(t: Tensor) -> Tensor:
    return t


@dataclass(frozen=True)
class ComfyCond:
    """A batch of prompts for the comfy model: cross-attention context and (SDXL) the vector ``y``,
    for the prompts and for the empty prompt used by classifier-free guidance."""

    context: Tensor
    uncond_context: Tensor
    y: Tensor | None = None
    uncond_y: Tensor | None = None


class ComfySource:
    """RLR_MODEL from ComfyUI objects; ``load()`` clones the patchers, the inputs stay untouched."""

    def __init__(self, model, clip, vae, width: int = 512, height: int = 512):
        for obj, what, attr in ((model, "model", "model"), (clip, "clip", "tokenize"), (vae, "vae", "decode")):
            if obj is None or not hasattr(obj, attr):
                raise ValueError(f"RLR From Comfy Model: the {what} input is not a ComfyUI {what.upper()} "
                                 f"(got {type(obj).__name__}); connect the {what.upper()} output of Load Checkpoint")
        if width % 8 or height % 8:
            raise ValueError(f"width and height must be multiples of 8, got {width}x{height}")
        _check_unet(model.model)
        self.model, self.clip, self.vae, self.width, self.height = model, clip, vae, int(width), int(height)
        self.name = type(model.model).__name__

    def load(self) -> "ComfyModel":
        return ComfyModel(self.model.clone(), self.clip, self.vae, self.width, self.height)


def _check_unet(base) -> None:
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    ms = getattr(base, "model_sampling", None)
    if not isinstance(getattr(base, "diffusion_model", None), UNetModel) or not isinstance(
            ms, comfy.model_sampling.ModelSamplingDiscrete) or not isinstance(ms, comfy.model_sampling.EPS):
        raise ValueError(f"RLR From Comfy Model supports SD1.x, SD2.x and SDXL UNet checkpoints; this MODEL is a "
                         f"{type(base).__name__} with {type(ms).__name__} sampling")


class ComfyModel:
    """The trainable model. Build it inside ``torch.inference_mode(False)``."""

    def __init__(self, patcher, clip, vae, width: int, height: int):
        self.mp, self.clip, self.vae = patcher, clip, vae
        self.base = patcher.model
        self.width, self.height = width, height
        sigmas = self.base.model_sampling.sigmas.detach().clone().double()
        self.alphas_cumprod = 1.0 / (1.0 + sigmas**2)
        self.v_pred = isinstance(self.base.model_sampling, comfy.model_sampling.V_PREDICTION)
        channels = self.base.latent_format.latent_channels
        self.latent_shape = (channels, height // 8, width // 8)
        import comfy.model_base as mb

        self.is_sdxl = isinstance(self.base, mb.SDXL)
        self.base_model_version = "sdxl_base_v1-0" if self.is_sdxl else ("sd_v2" if self.v_pred else "sd_v1")
        self.lora: dict[str, LoraWrapper] = {}
        self._cache: dict[str, tuple[Tensor, Tensor | None]] = {}
        self._loaded = False
        self._vae_patcher = vae.patcher.clone()
        for name, m in vae.first_stage_model.named_modules():
            self._wrap_identity(self._vae_patcher, name, m, prefix="")

    # -- setup -----------------------------------------------------------------------------------
    @staticmethod
    def _wrap_identity(patcher, name: str, m, prefix: str, skip_weight: bool = False) -> None:
        if not hasattr(m, "weight_function"):
            return
        if getattr(m, "weight", None) is not None and not skip_weight:
            patcher.add_weight_wrapper(f"{prefix}{name}.weight", _identity)
        if getattr(m, "bias", None) is not None:
            patcher.add_weight_wrapper(f"{prefix}{name}.bias", _identity)

    def _load(self) -> None:
        if not self._loaded:
            mm.load_models_gpu([self.mp, self._vae_patcher], force_full_load=True)
            self._loaded = True

    def _diffusers_names(self) -> dict[str, str]:
        """LDM module path (inside diffusion_model) -> diffusers module path."""
        mapping = comfy.utils.unet_to_diffusers(self.base.model_config.unet_config)
        out = {}
        for diff_key, ldm_key in mapping.items():
            if diff_key.endswith(".weight"):
                out[ldm_key[: -len(".weight")]] = diff_key[: -len(".weight")]
        return out

    def add_lora(self, rank: int, alpha: float | None, seed: int) -> list[tuple[str, torch.nn.Parameter]]:
        alpha = resolve_alpha(rank, alpha)
        names = self._diffusers_names()
        gen = torch.Generator().manual_seed(seed)
        self.base.requires_grad_(False)
        params = []
        for name, m in self.base.diffusion_model.named_modules():
            if name in names and is_target(names[name]) and hasattr(m, "weight_function"):
                out_f, in_f = m.weight.shape[0], m.weight[0].numel()
                wrapper = LoraWrapper(init_down((rank, in_f), rank, gen), torch.zeros((out_f, rank)), alpha)
                self.mp.add_weight_wrapper(f"diffusion_model.{name}.weight", wrapper)
                self._wrap_identity(self.mp, name, m, prefix="diffusion_model.", skip_weight=True)
                key = kohya_key(names[name])
                self.lora[key] = wrapper
                params += [(f"{key}.lora_down.weight", wrapper.down), (f"{key}.lora_up.weight", wrapper.up)]
            else:
                self._wrap_identity(self.mp, name, m, prefix="diffusion_model.")
        if not params:
            raise ValueError("found no attention projection (to_q/to_k/to_v/to_out.0) in this MODEL to put a LoRA on")
        logger.info("LoRA rank %d alpha %g on %d comfy modules", rank, alpha, len(self.lora))
        return params

    def lora_state_dict(self, dtype: torch.dtype = torch.float16) -> tuple[dict[str, Tensor], int, float]:
        if not self.lora:
            raise ValueError("the model has no LoRA to export")
        sd = {}
        for key, w in self.lora.items():
            sd.update(kohya_tensors(key, w.down, w.up, w.alpha, dtype))
        return (sd, *one_rank_and_alpha((w.down.shape[0] for w in self.lora.values()),
                                        (w.alpha for w in self.lora.values())))

    def load_lora(self, state_dict: dict[str, Tensor], strength: float = 1.0) -> None:
        import comfy.lora
        import comfy.sd

        key_map = comfy.lora.model_lora_keys_unet(self.base, {})
        modules = sorted({k.split(".", 1)[0] for k in state_dict})
        missing = [m for m in modules if m not in key_map]
        if missing:
            raise ValueError(f"this LoRA does not fit the model: {len(missing)} of its {len(modules)} modules do "
                             f"not exist here (first: {', '.join(missing[:5])}); was it made for another base "
                             "model (SD1.5 vs SDXL)?")
        weights = dict(self.base.state_dict())
        for m in modules:
            down, up = state_dict.get(f"{m}.lora_down.weight"), state_dict.get(f"{m}.lora_up.weight")
            target = key_map[m] if isinstance(key_map[m], str) else key_map[m][0]
            w = weights.get(target)
            if down is not None and up is not None and w is not None and (
                    up.shape[0] != w.shape[0] or down[0].numel() != w[0].numel()):
                raise ValueError(f"this LoRA does not fit the model: {m} has shape {tuple(up.shape)}x"
                                 f"{tuple(down.shape)}, the layer {tuple(w.shape)} (another base model?)")
        self.mp, _ = comfy.sd.load_lora_for_models(self.mp, None, dict(state_dict), strength, 0)
        self.base = self.mp.model
        self._loaded = False

    def release(self) -> None:
        """Unload this clone's patchers (drops the wrappers from the shared modules) and free memory."""
        for lm in list(mm.current_loaded_models):
            if lm.model is self.mp or lm.model is self._vae_patcher:
                lm.model_unload()
                mm.current_loaded_models.remove(lm)
        self.lora.clear()
        self._cache.clear()
        self._loaded = False
        mm.soft_empty_cache()

    # -- the model pieces the trainer uses ------------------------------------------------------
    def schedule(self, num_steps: int, eta: float) -> DDIMSchedule:
        return DDIMSchedule.from_alphas_cumprod(self.alphas_cumprod.float(), num_steps, eta=eta,
                                                prediction_type="epsilon", steps_offset=1)

    @torch.no_grad()
    def _encode(self, text: str) -> tuple[Tensor, Tensor | None]:
        if text not in self._cache:
            cond, pooled = self.clip.encode_from_tokens(self.clip.tokenize(text), return_pooled=True)
            if cond.shape[1] > 77:
                logger.warning("prompt longer than 77 tokens: only the first 77 are used for training: %r", text)
                cond = cond[:, :77]
            y = None
            if self.is_sdxl:
                y = self.base.encode_adm(pooled_output=pooled.clone(), width=self.width, height=self.height,
                                         device=torch.device("cpu"))
            # clone: tensors made by the text encoder may be inference tensors
            self._cache[text] = (cond[0].clone().float().cpu(), None if y is None else y[0].clone().float().cpu())
        return self._cache[text]

    def conditioning(self, texts: Sequence[str]) -> ComfyCond:
        enc = [self._encode(t) for t in texts]
        empty = self._encode("")
        ctx = torch.stack([c for c, _ in enc])
        unc = empty[0].expand_as(ctx)
        if self.is_sdxl:
            y = torch.stack([v for _, v in enc])
            return ComfyCond(ctx, unc, y, empty[1].expand_as(y))
        return ComfyCond(ctx, unc)

    def denoiser(self, guidance_scale: float) -> "ComfyDenoiser":
        self._load()
        return ComfyDenoiser(self, guidance_scale)

    def decode(self, latents: Tensor) -> Tensor:
        self._load()
        z = self.base.process_latent_out(latents)
        dtype = getattr(self.vae, "vae_dtype", torch.float32)
        images = self.vae.first_stage_model.decode(z.to(dtype))
        return self.vae.process_output(images.float())


class ComfyDenoiser:
    """eps_hat = eps_u + w (eps_c - eps_u) from one batched ``apply_model`` call of size 2B."""

    def __init__(self, model: ComfyModel, guidance_scale: float):
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        self.m, self.guidance_scale = model, float(guidance_scale)

    def __call__(self, x: Tensor, timestep: int, cond: ComfyCond) -> Tensor:
        ac = float(self.m.alphas_cumprod[int(timestep)])
        sigma = math.sqrt((1 - ac) / ac)
        x_in = x / math.sqrt(ac)  # ComfyUI's variable: x_0 + sigma * eps
        guided = self.guidance_scale != 1.0
        xs = torch.cat([x_in, x_in]) if guided else x_in
        ctx = torch.cat([cond.uncond_context, cond.context]) if guided else cond.context
        extra: dict[str, Any] = {}
        if cond.y is not None:
            extra["y"] = torch.cat([cond.uncond_y, cond.y]) if guided else cond.y
        sig = torch.full((xs.shape[0],), sigma, dtype=torch.float32)
        x0 = self.m.base.apply_model(xs, sig, c_crossattn=ctx, **extra).float()
        eps = (xs - x0) / sigma
        if not guided:
            return eps
        eps_u, eps_c = eps.chunk(2)
        return classifier_free_guidance(eps_u, eps_c, self.guidance_scale)
