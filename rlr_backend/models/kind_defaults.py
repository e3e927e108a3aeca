"""Training defaults per model kind (plain Python, no torch): what a run uses for the sampling steps, the
guidance and the RLR split when the user does not say, for the CLI and the app alike.

The kind comes from a diffusers folder's model_index.json (FLUX.1-dev and -schnell apart by the transformer's
guidance embedding). The values follow the reward fine-tuning practice of the flow-matching peers
(Flow-GRPO, Flow-Factory: ~10 training steps and the model's usual guidance, at 512 px; see
docs/flow_models.md); the resolution itself is the adapters' (``models.flow_model.FlowModel.train_size``).
A folder's own ``rlr_defaults.json`` (the embedded flow default has one) overrides the table. SD1.x/SD2.x/SDXL
and the embedded UNet default keep ``TrainConfig``'s defaults.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..model_paths import read_flow_defaults, read_model_index, resolve_model_name

#: model kind -> TrainConfig fields it changes from TrainConfig's defaults
KIND_DEFAULTS: dict[str, dict[str, object]] = {
    "sd": {},
    "sdxl": {},
    # SD3 / SD3.5: real CFG; Flow-GRPO trains SD3.5-M with 10 steps at CFG 4.5
    "sd3": {"num_inference_steps": 10, "guidance_scale": 4.5},
    # FLUX.1-dev: the guidance value goes into its guidance embedding (no CFG pass); Flow-GRPO/Flow-Factory 3.5
    "flux-dev": {"num_inference_steps": 10, "guidance_scale": 3.5},
    # FLUX.1-schnell: distilled to 1-4 steps, no guidance; RLR's first-order part shortened to fit 4 steps
    "flux-schnell": {"num_inference_steps": 4, "guidance_scale": 0.0, "fo_steps": 2},
    # Z-Image-Turbo (the released checkpoint): no CFG, few steps (Flow-Factory's example: 6 steps, guidance 0)
    "zimage": {"num_inference_steps": 6, "guidance_scale": 0.0},
    # Qwen-Image: the value is the pipeline's true_cfg_scale (real CFG with the per-token norm rescale, see
    # models.qwenimage_model); Flow-GRPO and Flow-Factory train it with 10 steps at CFG 4
    "qwen-image": {"num_inference_steps": 10, "guidance_scale": 4.0},
}
#: the fields a kind may set (the app updates these form fields when the model changes)
DEFAULT_FIELDS: tuple[str, ...] = ("num_inference_steps", "guidance_scale", "fo_steps")
_PIPELINE_KINDS = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl",
                   "StableDiffusion3Pipeline": "sd3", "ZImagePipeline": "zimage", "QwenImagePipeline": "qwen-image"}


#: a flow transformer file's family (``models.flow_detect``) -> kind; FLUX.1 dev and schnell apart by these keys
_FILE_KINDS = {"SD3/SD3.5": "sd3", "Z-Image": "zimage"}
_FLUX_GUIDANCE_KEYS = ("guidance_in.in_layer.weight", "time_text_embed.guidance_embedder.linear_1.weight")


def model_kind(model: str | Path | None) -> str:
    """The kind of a model given as the CLI/app give it (None: the embedded UNet default; a name such as
    ``default-flow``; a diffusers folder; a flow transformer file (ComfyUI's ``diffusion_models``, by its
    header's keys); any other single file -> ``sd``, whose kind the loader resolves)."""
    path = resolve_model_name(model)
    if path is None:
        return "sd"
    if Path(path).is_file() and Path(path).suffix.lower() == ".safetensors":
        return _file_kind(Path(path))
    index = read_model_index(path) or {}
    cls = index.get("_class_name")
    if cls == "FluxPipeline":
        return "flux-dev" if _guidance_embeds(Path(path)) else "flux-schnell"
    return _PIPELINE_KINDS.get(cls, "sd")


def _file_kind(path: Path) -> str:
    from ..safe_io import safetensors_header
    from .flow_detect import flow_transformer_layout

    try:
        keys = set(safetensors_header(path))
    except (OSError, ValueError):
        return "sd"  # the loader names what is wrong with the file
    layout = flow_transformer_layout(keys)
    if layout is None:
        return "sd"
    if layout.kind == "FLUX.1":
        return "flux-dev" if any(layout.prefix + k in keys for k in _FLUX_GUIDANCE_KEYS) else "flux-schnell"
    return _FILE_KINDS.get(layout.kind, "sd")


def _guidance_embeds(folder: Path) -> bool:
    try:
        config = json.loads((folder / "transformer" / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return True  # the loader reports a damaged folder; dev is the common FLUX.1
    return bool(isinstance(config, dict) and config.get("guidance_embeds", False))


def training_defaults(model: str | Path | None) -> dict[str, object]:
    """The TrainConfig fields whose default depends on the model: the kind's table, then the folder's
    ``rlr_defaults.json`` (for flow folders). Raises ValueError naming a damaged rlr_defaults.json."""
    kind = model_kind(model)
    out = dict(KIND_DEFAULTS[kind])
    if kind not in ("sd", "sdxl"):  # a flow folder (a transformer file has no rlr_defaults.json beside it)
        out.update({k: v for k, v in read_flow_defaults(model).items() if k in DEFAULT_FIELDS})
    return out
