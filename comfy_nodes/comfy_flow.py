"""``TrainableModel`` over a flow-matching MODEL that ComfyUI loaded: SD3/SD3.5, FLUX.1 and Z-Image.

What it takes from ComfyUI, what from the backend:

* **The kind** (``FLOW_KINDS``): the model class (``model_base.SD3``, ``Flux``, ``Lumina2`` with Z-Image's
  modulation) and a flow sampling (``CONST`` prediction with ``ModelSamplingDiscreteFlow`` or
  ``ModelSamplingFlux``). Each kind names the backend adapter of the same architecture
  (``SD3Model``, ``FluxModel``, ``ZImageModel``), whose LoRA targets, export prefix and base-model id
  it uses, so a LoRA trained here has the format the backend writes for that model.
* **The chain**: the backend's ``FlowSchedule`` (``flow_sigmas``, the step kind flow_sde / dance_sde /
  cps, eta, an SDE window) with the shift of the MODEL's sampling as ComfyUI holds it (after any
  ModelSamplingSD3 / ModelSamplingFlux / ModelSamplingAuraFlow node upstream): ComfyUI's "simple"
  scheduler gives the same sigmas (tested). ``ModelSamplingFlux``'s shift mu is the map
  sigma = e^mu t / (1 + (e^mu - 1) t), i.e. the SD3 shift e^mu.
* **The model call**: ``apply_model(x, sigma, **conds)``, which converts sigma to the model's own time
  (SD3 sigma * 1000, FLUX sigma, Z-Image 1 - sigma) and, for CONST models, returns the denoised
  x0 = x - sigma v; the velocity is (x - x0) / sigma. Guidance is the backend denoiser's
  (``FlowDenoiser.__call__``): real CFG with the empty prompt for SD3 (w = guidance_scale when > 1),
  none for FLUX.1 (the scale goes into the guidance embedding of FLUX.1-dev), w = 1 + s for Z-Image.
* **Conditioning**: ComfyUI's CLIP encode (context, pooled output, attention mask) turned into the
  model's inputs by the model's own ``extra_conds`` (SD3/FLUX ``y`` = pooled, Z-Image ``num_tokens``),
  one text at a time and cached; rows whose inputs have the same shapes run in one call.
* **LoRA**: on the attention projections the backend adapter targets, located with ComfyUI's own
  diffusers key map (``comfy.utils.mmdit_to_diffusers`` / ``flux_to_diffusers`` / ``z_image_to_diffusers``,
  which ``comfy.lora.model_lora_keys_unet`` uses): a diffusers module such as
  ``transformer_blocks.0.attn.to_q`` is a row block of ComfyUI's fused ``joint_blocks.0.x_block.attn.qkv``.
  The file holds the diffusers names, never ComfyUI's internal ones: ``transformer.<module>.lora_A/B.weight``
  for SD3 and FLUX.1, ``diffusion_model.<module>...`` for Z-Image, the scale alpha / rank folded into B
  (``rlr_backend.lora.diffusers_export``), as the backend writes them.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

import comfy.model_sampling
import torch
from torch import Tensor

from rlr_backend.lora import is_target
from rlr_backend.lora.diffusers_export import diffusers_tensors
from rlr_backend.models.flow_model import FlowConditioning, FlowDenoiser, FlowModel, SD3Denoiser, SD3Model
from rlr_backend.models.flux_model import FluxDenoiser, FluxModel
from rlr_backend.models.zimage_model import ZImageDenoiser, ZImageModel
from rlr_backend.sampling import FlowSchedule

from .comfy_model import ComfyBase, LoraWrapper, Rows

logger = logging.getLogger(__name__)


class ComfyFlowCall:
    """``FlowDenoiser._forward`` on ComfyUI's ``apply_model``; mixed in before a backend denoiser, whose
    ``__call__`` (time input -> sigma, classifier-free guidance) and ``cfg_weight`` it keeps."""

    model: "ComfyFlowModel"
    guidance_scale: float

    def _forward(self, x: Tensor, sigma: float, rows: list[dict[str, Any]], pooled: None = None) -> Tensor:
        m = self.model
        dev = m.device
        groups: dict[tuple, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(_signature(row), []).append(i)
        order, parts = [], []
        for idx in groups.values():
            xs = (x if len(idx) == x.shape[0] else x[idx]).to(dev)
            kw = {k: torch.cat([rows[i][k] for i in idx]).to(dev) if torch.is_tensor(v) else v
                  for k, v in rows[idx[0]].items()}
            if m.guidance_embed:
                kw["guidance"] = torch.full((len(idx),), self.guidance_scale, device=dev)
            with _copy_saved_activations() if m.kind.inplace_forward and torch.is_grad_enabled() \
                    else contextlib.nullcontext():
                x0 = m.base.apply_model(xs, torch.full((len(idx),), sigma, device=dev), **kw).float()
            parts.append((xs.float() - x0) / sigma)
            order += idx
        v = parts[0] if len(parts) == 1 else torch.cat(parts)[torch.argsort(torch.tensor(order))]
        return v.to(x.device)


def _copy_saved_activations():
    """Autograd keeps a copy of every saved activation (3-D and up: tokens, attention heads), not the tensor:
    ComfyUI's FLUX blocks add their residuals in place (``img += ...``) into tensors the layer norms saved,
    which autograd would otherwise refuse in backward. Weights (2-D) and biases are kept as they are."""
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone() if t.dim() >= 3 else t, lambda t: t)


def _signature(row: dict[str, Any]) -> tuple:
    return tuple((k, tuple(v.shape) if torch.is_tensor(v) else v) for k, v in sorted(row.items()))


class ComfySD3Denoiser(ComfyFlowCall, SD3Denoiser):
    """SD3/SD3.5 through ComfyUI: real CFG for guidance_scale > 1."""


class ComfyFluxDenoiser(ComfyFlowCall, FluxDenoiser):
    """FLUX.1 through ComfyUI: no unconditional pass; the scale goes into the guidance embedding (dev)."""


class ComfyZImageDenoiser(ComfyFlowCall, ZImageDenoiser):
    """Z-Image through ComfyUI: CFG weight 1 + s for s > 0 (the diffusers pipeline's convention)."""


@dataclass(frozen=True)
class FlowKind:
    """A flow-matching architecture ComfyUI loads: how to recognise it, the backend adapter of the same
    architecture (LoRA targets, export prefix, base-model id), its denoiser and ComfyUI's diffusers key map."""

    name: str
    model_class: str  # the comfy.model_base class
    adapter: type[FlowModel]
    denoiser: type[FlowDenoiser]
    key_map: str  # the comfy.utils function: unet_config -> {diffusers key: comfy key or (key, (dim, start, size))}
    unet_config: tuple[tuple[str, Any], ...] = ()  # entries the model's unet_config must have
    inplace_forward: bool = False  # ComfyUI's forward modifies saved activations in place (``_copy_saved_activations``)

    def matches(self, base) -> bool:
        config = getattr(getattr(base, "model_config", None), "unet_config", {}) or {}
        return type(base).__name__ == self.model_class and all(config.get(k) == v for k, v in self.unet_config)

    def diffusers_map(self, unet_config: dict) -> dict:
        import comfy.utils

        return getattr(comfy.utils, self.key_map)(unet_config)


FLOW_KINDS: tuple[FlowKind, ...] = (
    FlowKind("SD3/SD3.5", "SD3", SD3Model, ComfySD3Denoiser, "mmdit_to_diffusers"),
    FlowKind("FLUX.1", "Flux", FluxModel, ComfyFluxDenoiser, "flux_to_diffusers", (("image_model", "flux"),),
             inplace_forward=True),
    FlowKind("Z-Image", "Lumina2", ZImageModel, ComfyZImageDenoiser, "z_image_to_diffusers",
             (("z_image_modulation", True),)),
)


def flow_kind(patcher) -> FlowKind | None:
    """The kind of a MODEL whose sampling is flow matching and whose architecture is supported; None otherwise."""
    ms = patcher.get_model_object("model_sampling")
    if not isinstance(ms, comfy.model_sampling.CONST) or not isinstance(
            ms, (comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.ModelSamplingFlux)):
        return None
    return next((k for k in FLOW_KINDS if k.matches(patcher.model)), None)


def flow_shift(ms) -> float:
    """The SD3-style shift s (sigma = s t / (1 + (s - 1) t)) of ComfyUI's flow sampling ``ms``."""
    if isinstance(ms, comfy.model_sampling.ModelSamplingFlux):
        return math.exp(float(ms.shift))
    return float(ms.shift)


class ComfyFlowModel(ComfyBase):
    """The flow-matching adapter (see the module docstring). ``flow = True``: the trainer passes the flow
    options (step kind, flow eta, SDE window) to ``schedule``."""

    flow = True
    param_suffixes = (".lora_A.weight", ".lora_B.weight")

    def __init__(self, patcher, clip, vae, width: int, height: int, kind: FlowKind):
        super().__init__(patcher, clip, vae, width, height)
        self.kind = kind
        self.base_model_version = kind.adapter.base_model_version
        self.shift = flow_shift(patcher.get_model_object("model_sampling"))
        config = self.base.model_config.unet_config
        self.guidance_embed = kind.denoiser is ComfyFluxDenoiser and bool(config.get("guidance_embed", False))
        self._cache: dict[str, dict[str, Any]] = {}

    @property
    def transformer(self) -> torch.nn.Module:
        """The diffusion model (what ``FlowDenoiser`` keeps)."""
        return self.base.diffusion_model

    # -- LoRA --------------------------------------------------------------------------------------
    def _lora_slots(self) -> dict[str, list[tuple[str, Rows]]]:
        """Comfy module -> [(diffusers module, rows)] for the adapter's targets that exist in this model."""
        present = {n for n, _ in self.base.diffusion_model.named_parameters()}
        slots: dict[str, list[tuple[str, Rows]]] = {}
        for key, target in self.kind.diffusers_map(self.base.model_config.unet_config).items():
            module = key[: -len(".weight")]
            if not key.endswith(".weight") or not is_target(module, self.kind.adapter.lora_targets):
                continue
            if isinstance(target, str):
                comfy_key, rows = target, None
            else:
                comfy_key, block = target[0], (target[1] if len(target) > 1 else None)
                if block is None or block[0] != 0:  # a converted weight, or a block along the input dimension
                    continue
                rows = (int(block[1]), int(block[2]))
            if comfy_key in present:
                slots.setdefault(comfy_key[: -len(".weight")], []).append((module, rows))
        return slots

    def _export(self, name: str, w: LoraWrapper, dtype: torch.dtype) -> dict[str, Tensor]:
        return diffusers_tensors(name, w.down, w.up, w.alpha / w.down.shape[0], dtype, self.kind.adapter.lora_prefix)

    def _rank_and_alpha(self) -> tuple[int, float]:
        rank, _ = super()._rank_and_alpha()
        return rank, float(rank)  # the scale is folded into B: the file is applied at alpha = rank

    # -- the model pieces the trainer uses --------------------------------------------------------
    def schedule(self, num_steps: int, eta: float, *, kind: str = "flow_sde",
                 sde_window: tuple[int, int] | None = None) -> FlowSchedule:
        """``num_steps`` flow steps on ``flow_sigmas(num_steps, shift)`` with the MODEL's shift."""
        return FlowSchedule.create(num_steps, shift=self.shift, kind=kind, eta=eta, sde_window=sde_window)

    @torch.no_grad()
    def _encode(self, text: str) -> dict[str, Any]:
        if text not in self._cache:
            out = dict(self.clip.encode_from_tokens(self.clip.tokenize(text), return_pooled=True, return_dict=True))
            cond = out.pop("cond")
            conds = self.base.extra_conds(cross_attn=cond, noise=torch.zeros(1, *self.latent_shape),
                                          device=torch.device("cpu"), width=self.width, height=self.height,
                                          guidance=None, **out)
            # clone: tensors made by the text encoder may be inference tensors
            self._cache[text] = {k: _plain(c.cond) for k, c in conds.items()}
        return self._cache[text]

    def conditioning(self, texts: Sequence[str]) -> FlowConditioning:
        rows, empty = [self._encode(t) for t in texts], self._encode("")
        return FlowConditioning(rows, None, [empty] * len(rows), None)

    def denoiser(self, guidance_scale: float) -> FlowDenoiser:
        self._load()
        return self.kind.denoiser(self, guidance_scale)


def _plain(value: Any) -> Any:
    if not torch.is_tensor(value):
        return value
    value = value.detach().clone().cpu()
    return value.float() if value.is_floating_point() else value
