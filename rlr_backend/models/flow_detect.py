"""Which flow-matching transformer a weights file holds, from its key names alone (offline, no weights read).

Transformer-only files are what ComfyUI users keep in ``models/diffusion_models``: the original (SAI / BFL /
Tongyi) layout or diffusers' layout, with or without ``model.diffusion_model.`` / ``diffusion_model.`` /
``transformer.`` in front. The markers are the ones diffusers' ``single_file_utils`` and ComfyUI's
``convert_diffusers_mmdit`` test (shared/reference/flow-matching.md §4). Plain Python (no torch): the command
line tells a flow model from a DDIM one before anything heavy is imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "")
#: architecture -> (key set of the original layout, key set of diffusers' layout): all keys of a set present
#: identify it
MARKERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "SD3/SD3.5": (("joint_blocks.0.context_block.adaLN_modulation.1.bias",),
                  ("transformer_blocks.0.attn.add_q_proj.weight", "pos_embed.proj.weight")),
    "FLUX.1": (("double_blocks.0.img_attn.norm.key_norm.scale",),
               ("x_embedder.weight", "single_transformer_blocks.0.attn.to_q.weight")),
    "Z-Image": (("layers.0.attention.qkv.weight", "cap_embedder.0.weight"),
                ("layers.0.attention.to_q.weight", "cap_embedder.0.weight")),
}


@dataclass(frozen=True)
class FlowLayout:
    """A flow transformer found in a file: its ``kind`` (a ``MARKERS`` key), the ``prefix`` its keys carry and
    whether they are in diffusers' layout (else the original one)."""

    kind: str
    prefix: str
    diffusers: bool


def flow_transformer_layout(keys: Iterable[str]) -> FlowLayout | None:
    """The flow transformer ``keys`` hold (see :class:`FlowLayout`), or None."""
    names = set(keys)
    for prefix in PREFIXES:
        for kind, marker_sets in MARKERS.items():
            for diffusers, markers in enumerate(marker_sets):
                if all(prefix + k in names for k in markers):
                    return FlowLayout(kind, prefix, bool(diffusers))
    return None


def flow_transformer_kind(keys: Iterable[str]) -> str | None:
    """"SD3/SD3.5", "FLUX.1" or "Z-Image" when ``keys`` are a flow transformer's, else None."""
    layout = flow_transformer_layout(keys)
    return layout.kind if layout else None


def is_flow_model(path: str | Path | None) -> bool:
    """Whether ``path`` (or a model name) is a flow-matching model: a flow pipeline folder
    (``model_paths.is_flow_folder``) or a flow transformer ``.safetensors`` file (only its header is read)."""
    from ..model_paths import is_flow_folder, resolve_model_name
    from ..safe_io import safetensors_header

    if is_flow_folder(path):
        return True
    p = Path(resolve_model_name(path)) if path is not None else None
    if p is None or not p.is_file() or p.suffix.lower() != ".safetensors":
        return False
    return flow_transformer_layout(safetensors_header(p)) is not None
