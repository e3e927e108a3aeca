"""``TrainableModel`` over ComfyUI's MODEL / CLIP / VAE: the shared part and the SD1.x/SD2.x/SDXL UNets.

The flow-matching transformers (SD3/SD3.5, FLUX.1, Z-Image) are in :mod:`comfy_nodes.comfy_flow`;
``comfy_source.ComfySource`` picks the adapter from the MODEL's kind.

* Gradients flow through a clone of the user's ModelPatcher: every weight and bias of the diffusion
  model and the VAE gets a weight wrapper (a LoRA on the attention projections, identity elsewhere), so
  ComfyUI's ``cast_bias_weight`` hands the layers fresh copies instead of the inference tensors the
  checkpoint loader made (those cannot be saved for backward). A LoRA may cover a row block of a fused
  weight (the q, k and v of a transformer's ``qkv`` layer), as ComfyUI's diffusers key maps describe it.
* UNets: the chain runs in DDPM variables x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps on the model's own
  discrete schedule (abar = 1 / (1 + sigma^2) from ``model_sampling.sigmas``); ``apply_model`` gets
  x_t / sqrt(abar) and sigma (ComfyUI's variables) and returns x_0, from which eps is recovered.
* UNet LoRA keys: kohya ``lora_unet_<diffusers module path>``, mapped with ``comfy.utils.unet_to_diffusers``,
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

#: (row offset, row count) of a LoRA's block in a fused weight (None: the whole weight)
Rows = tuple[int, int] | None


class LoraWrapper(torch.nn.Module):
    """W -> W + strength * (alpha / rank) * up @ down (a ComfyUI weight function), on the rows ``rows`` of
    W only when given (one of q / k / v in a fused qkv weight). The delta follows W's device and dtype."""

    def __init__(self, down: Tensor, up: Tensor, alpha: float, rows: Rows = None):
        super().__init__()
        self.down, self.up = torch.nn.Parameter(down), torch.nn.Parameter(up)
        self.alpha, self.strength, self.rows = float(alpha), 1.0, rows

    @property
    def scale(self) -> float:
        return self.alpha / self.down.shape[0] * self.strength

    def forward(self, weight: Tensor) -> Tensor:
        delta = ((self.up @ self.down) * self.scale).to(weight.device, weight.dtype)
        if self.rows is None:
            return weight + delta.reshape(weight.shape)
        start, size = self.rows
        return torch.cat([weight[:start], weight[start:start + size] + delta.reshape(size, *weight.shape[1:]),
                          weight[start + size:]])


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


class ComfyBase:
    """What every comfy adapter shares: the patcher clone with weight wrappers, the VAE, LoRA in and out of
    ComfyUI's own loader, memory. Subclasses say where LoRAs go (``_lora_slots``) and how they are written
    (``_export``). Build it inside ``torch.inference_mode(False)``."""

    base_model_version: str
    #: endings of the trainer's names for a LoRA's down / up parameters (the export's key endings)
    param_suffixes: tuple[str, str] = (".lora_down.weight", ".lora_up.weight")

    def __init__(self, patcher, clip, vae, width: int, height: int):
        self.mp, self.clip, self.vae = patcher, clip, vae
        self.base = patcher.model
        self.width, self.height = width, height
        self.latent_shape = (self.base.latent_format.latent_channels, height // 8, width // 8)
        self.lora: dict[str, LoraWrapper] = {}
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

    @property
    def device(self) -> torch.device:
        return self.mp.load_device if self._loaded else torch.device("cpu")

    def _lora_slots(self) -> dict[str, list[tuple[str, Rows]]]:
        """Module path inside ``diffusion_model`` -> [(export name, rows)] of the LoRAs it carries."""
        raise NotImplementedError

    def _export(self, name: str, w: LoraWrapper, dtype: torch.dtype) -> dict[str, Tensor]:
        raise NotImplementedError

    def add_lora(self, rank: int, alpha: float | None, seed: int) -> list[tuple[str, torch.nn.Parameter]]:
        alpha = resolve_alpha(rank, alpha)
        self._unload()  # wrappers are installed when the patcher loads: a model already used is loaded again
        slots = self._lora_slots()
        gen = torch.Generator().manual_seed(seed)
        self.base.requires_grad_(False)
        params = []
        for name, m in self.base.diffusion_model.named_modules():
            if name in slots and hasattr(m, "weight_function"):
                in_f = m.weight[0].numel()
                for key, rows in slots[name]:
                    out_f = m.weight.shape[0] if rows is None else rows[1]
                    wrapper = LoraWrapper(init_down((rank, in_f), rank, gen), torch.zeros((out_f, rank)), alpha, rows)
                    self.mp.add_weight_wrapper(f"diffusion_model.{name}.weight", wrapper)
                    self.lora[key] = wrapper
                    params += [(key + self.param_suffixes[0], wrapper.down), (key + self.param_suffixes[1], wrapper.up)]
                self._wrap_identity(self.mp, name, m, prefix="diffusion_model.", skip_weight=True)
            else:
                self._wrap_identity(self.mp, name, m, prefix="diffusion_model.")
        if not params:
            raise ValueError("found no attention projection in this MODEL to put a LoRA on")
        self._copy_unwrapped()
        logger.info("LoRA rank %d alpha %g on %d comfy modules", rank, alpha, len(self.lora))
        return params

    def _copy_unwrapped(self) -> None:
        """Parameters outside ComfyUI's cast layers (the scales of FLUX's and SD3.5's q/k RMS norms) get no
        weight wrapper: a patch of strength 0 makes the patcher load an ordinary copy of each instead (and
        restore the original when the clone is unloaded)."""
        dm = self.base.diffusion_model
        keys = [f"diffusion_model.{name}" for name, _ in dm.named_parameters()
                if not (hasattr(dm.get_submodule(name.rpartition(".")[0]), "weight_function")
                        and name.rpartition(".")[2] in ("weight", "bias"))]
        if keys:
            self.mp.add_patches({k: (torch.zeros(()),) for k in keys}, strength_patch=0.0)
            logger.debug("%d parameters outside cast layers are copied at load", len(keys))

    def lora_state_dict(self, dtype: torch.dtype = torch.float16) -> tuple[dict[str, Tensor], int, float]:
        if not self.lora:
            raise ValueError("the model has no LoRA to export")
        sd = {}
        for key, w in self.lora.items():
            sd.update(self._export(key, w, dtype))
        return sd, *self._rank_and_alpha()

    def _rank_and_alpha(self) -> tuple[int, float]:
        return one_rank_and_alpha((w.down.shape[0] for w in self.lora.values()), (w.alpha for w in self.lora.values()))

    def load_lora(self, state_dict: dict[str, Tensor], strength: float = 1.0) -> None:
        """Apply a LoRA (any format ComfyUI maps for this model) through ComfyUI's own loader, after checking
        that every module exists here with the LoRA's shape."""
        import comfy.lora
        import comfy.sd

        key_map = comfy.lora.model_lora_keys_unet(self.base, {})
        modules = sorted({lora_module(k) for k in state_dict})
        missing = [m for m in modules if m not in key_map]
        if missing:
            raise ValueError(f"this LoRA does not fit the model: {len(missing)} of its {len(modules)} modules do "
                             f"not exist here (first: {', '.join(missing[:5])}); was it made for another base "
                             f"model (SD1.5 vs SDXL, SD3 vs FLUX)?")
        weights = dict(self.base.state_dict())
        for m in modules:
            down, up = (next((state_dict[f"{m}{s}"] for s in suffixes if f"{m}{s}" in state_dict), None)
                        for suffixes in (DOWN_SUFFIXES, UP_SUFFIXES))
            target = key_map[m] if isinstance(key_map[m], str) else key_map[m][0]
            rows = key_map[m][1] if not isinstance(key_map[m], str) and len(key_map[m]) > 1 else None
            w = weights.get(target)
            out_f = None if w is None else (rows[2] if rows else w.shape[0])
            if down is not None and up is not None and w is not None and (
                    up.shape[0] != out_f or down[0].numel() != w[0].numel()):
                raise ValueError(f"this LoRA does not fit the model: {m} has shape {tuple(up.shape)}x"
                                 f"{tuple(down.shape)}, the layer {out_f}x{tuple(w.shape[1:])} (another base model?)")
        self.mp, _ = comfy.sd.load_lora_for_models(self.mp, None, dict(state_dict), strength, 0)
        self.base = self.mp.model
        self._loaded = False

    def _unload(self) -> None:
        """Unload this clone's patchers: the wrappers and patches leave the shared modules."""
        for lm in list(mm.current_loaded_models):
            if lm.model is self.mp or lm.model is self._vae_patcher:
                lm.model_unload()
                mm.current_loaded_models.remove(lm)
        self._loaded = False

    def release(self) -> None:
        """Unload this clone's patchers and free memory."""
        self._unload()
        self.lora.clear()
        getattr(self, "_cache", {}).clear()
        mm.soft_empty_cache()

    def decode(self, latents: Tensor) -> Tensor:
        self._load()
        z = self.base.process_latent_out(latents)
        dtype = getattr(self.vae, "vae_dtype", torch.float32)
        images = self.vae.first_stage_model.decode(z.to(self.vae.device, dtype))
        return self.vae.process_output(images.float()).to(latents.device)


#: key endings of a LoRA's down / up matrices (kohya, diffusers/PEFT)
DOWN_SUFFIXES = (".lora_down.weight", ".lora_A.weight")
UP_SUFFIXES = (".lora_up.weight", ".lora_B.weight")


def lora_module(key: str) -> str:
    """The module a LoRA key belongs to (the name ComfyUI's key map uses): the key less its ending."""
    for suffix in (*DOWN_SUFFIXES, *UP_SUFFIXES, ".alpha", ".lora_mid.weight", ".dora_scale"):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return key.split(".", 1)[0]


class ComfyModel(ComfyBase):
    """The UNet adapter (SD1.x, SD2.x, SDXL)."""

    def __init__(self, patcher, clip, vae, width: int, height: int):
        super().__init__(patcher, clip, vae, width, height)
        ms = patcher.get_model_object("model_sampling")
        sigmas = ms.sigmas.detach().clone().double()
        self.alphas_cumprod = 1.0 / (1.0 + sigmas**2)
        self.v_pred = isinstance(ms, comfy.model_sampling.V_PREDICTION)
        import comfy.model_base as mb

        self.is_sdxl = isinstance(self.base, mb.SDXL)
        self.base_model_version = "sdxl_base_v1-0" if self.is_sdxl else ("sd_v2" if self.v_pred else "sd_v1")
        self._cache: dict[str, tuple[Tensor, Tensor | None]] = {}

    def _lora_slots(self) -> dict[str, list[tuple[str, Rows]]]:
        """LDM module path -> its kohya key (from the diffusers module path ``unet_to_diffusers`` gives)."""
        mapping = comfy.utils.unet_to_diffusers(self.base.model_config.unet_config)
        out = {}
        for diff_key, ldm_key in mapping.items():
            if diff_key.endswith(".weight") and is_target(diff_key[: -len(".weight")]):
                out[ldm_key[: -len(".weight")]] = [(kohya_key(diff_key[: -len(".weight")]), None)]
        return out

    def _export(self, name: str, w: LoraWrapper, dtype: torch.dtype) -> dict[str, Tensor]:
        return kohya_tensors(name, w.down, w.up, w.alpha, dtype)

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


class ComfyDenoiser:
    """eps_hat = eps_u + w (eps_c - eps_u) from one batched ``apply_model`` call of size 2B."""

    def __init__(self, model: ComfyModel, guidance_scale: float):
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        self.m, self.guidance_scale = model, float(guidance_scale)

    def __call__(self, x: Tensor, timestep: int, cond: ComfyCond) -> Tensor:
        ac = float(self.m.alphas_cumprod[int(timestep)])
        sigma = math.sqrt((1 - ac) / ac)
        dev = self.m.device
        x_in = x.to(dev) / math.sqrt(ac)  # ComfyUI's variable: x_0 + sigma * eps
        guided = self.guidance_scale != 1.0
        xs = torch.cat([x_in, x_in]) if guided else x_in
        ctx = torch.cat([cond.uncond_context, cond.context]) if guided else cond.context
        extra: dict[str, Any] = {}
        if cond.y is not None:
            extra["y"] = torch.cat([cond.uncond_y, cond.y]) if guided else cond.y
        sig = torch.full((xs.shape[0],), sigma, dtype=torch.float32, device=dev)
        x0 = self.m.base.apply_model(xs, sig, c_crossattn=ctx, **extra).float()
        eps = ((xs - x0) / sigma).to(x.device)
        if not guided:
            return eps
        eps_u, eps_c = eps.chunk(2)
        return classifier_free_guidance(eps_u, eps_c, self.guidance_scale)
