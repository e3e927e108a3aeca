"""RLR_MODEL from ComfyUI's MODEL / CLIP / VAE: the sockets checked, the MODEL's kind read, and on ``load()``
the adapter of that kind (:mod:`comfy_nodes.comfy_model` for UNets, :mod:`comfy_nodes.comfy_flow` for
flow-matching transformers) on a clone of the patcher."""

from __future__ import annotations

import contextlib
from typing import Iterator

import comfy.model_management
import comfy.model_sampling

from .comfy_flow import ComfyFlowModel, flow_kind
from .comfy_model import ComfyBase, ComfyModel


def sampling_name(ms) -> str:
    """``ModelSamplingDiscreteFlow+CONST``: ComfyUI builds the sampling class from these two."""
    return "+".join(c.__name__ for c in type(ms).__bases__) or type(ms).__name__


class ComfySource:
    """RLR_MODEL from ComfyUI objects; ``load()`` clones the patchers, the inputs stay untouched. The MODEL's
    kind decides the adapter: a UNet (``ComfyModel``) or a flow-matching transformer (``ComfyFlowModel``);
    any other kind is refused here, naming it."""

    def __init__(self, model, clip, vae, width: int = 512, height: int = 512):
        for obj, what, attr in ((model, "model", "model"), (clip, "clip", "tokenize"), (vae, "vae", "decode")):
            if obj is None or not hasattr(obj, attr):
                raise ValueError(f"RLR From Comfy Model: the {what} input is not a ComfyUI {what.upper()} "
                                 f"(got {type(obj).__name__}); connect the {what.upper()} output of Load Checkpoint")
        self.kind = flow_kind(model)  # None: not a supported flow model
        if self.kind is None:
            _check_unet(model)
        multiple = 16 if self.kind is not None else 8  # flow transformers: 2x2 patches of the 8x latent
        if width % multiple or height % multiple:
            raise ValueError(f"width and height must be multiples of {multiple} for this model, got {width}x{height}")
        self.model, self.clip, self.vae, self.width, self.height = model, clip, vae, int(width), int(height)
        self.name = type(model.model).__name__

    def load(self) -> ComfyBase:
        if self.kind is not None:
            return ComfyFlowModel(self.model.clone(), self.clip, self.vae, self.width, self.height, self.kind)
        return ComfyModel(self.model.clone(), self.clip, self.vae, self.width, self.height)

    def training(self) -> contextlib.AbstractContextManager[None]:
        return comfy_training()


@contextlib.contextmanager
def comfy_training() -> Iterator[None]:
    """ComfyUI's training switch on while a run trains, as its own Train LoRA node sets it: newer ComfyUIs
    (0.33) run fused comfy_kitchen kernels (FLUX's RoPE, Z-Image's RMSNorm + RoPE) that have no backward
    unless ``comfy.model_management.in_training`` is set. Older ComfyUIs have no such switch: nothing to do."""
    mm = comfy.model_management
    if not hasattr(mm, "in_training"):
        yield
        return
    before, mm.in_training = mm.in_training, True
    try:
        yield
    finally:
        mm.in_training = before


def _check_unet(patcher) -> None:
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    base = patcher.model
    ms = patcher.get_model_object("model_sampling")
    if not isinstance(getattr(base, "diffusion_model", None), UNetModel) or not isinstance(
            ms, comfy.model_sampling.ModelSamplingDiscrete) or not isinstance(ms, comfy.model_sampling.EPS):
        config = type(getattr(base, "model_config", None)).__name__
        raise ValueError(f"RLR From Comfy Model supports SD1.x, SD2.x and SDXL UNets and the flow models SD3/SD3.5, "
                         f"FLUX.1 and Z-Image; this MODEL is a {type(base).__name__} ({config}) with "
                         f"{sampling_name(ms)} sampling")
