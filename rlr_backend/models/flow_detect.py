"""Which flow-matching transformer a weights file holds, from its key names alone (offline, no weights read).

Transformer-only files are what ComfyUI users keep in ``models/diffusion_models``: the original (SAI / BFL /
Tongyi) layout or diffusers' layout, with or without ``model.diffusion_model.`` / ``diffusion_model.`` in front.
The markers are the ones diffusers' ``single_file_utils`` and ComfyUI's ``convert_diffusers_mmdit`` test
(shared/reference/flow-matching.md §4). Loading such a file with separate text encoder and VAE files is not
supported yet; the single-file loader uses this to name what the file is in its refusal.
"""

from __future__ import annotations

from typing import Iterable

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")
#: architecture -> key sets, any of which (all its keys present) identifies it
MARKERS: dict[str, tuple[tuple[str, ...], ...]] = {
    "SD3/SD3.5": (("joint_blocks.0.context_block.adaLN_modulation.1.bias",),
                  ("transformer_blocks.0.attn.add_q_proj.weight", "pos_embed.proj.weight")),
    "FLUX.1": (("double_blocks.0.img_attn.norm.key_norm.scale",),
               ("x_embedder.weight", "single_transformer_blocks.0.attn.to_q.weight")),
    "Z-Image": (("layers.0.attention.qkv.weight", "cap_embedder.0.weight"),
                ("layers.0.attention.to_q.weight", "cap_embedder.0.weight")),
}


def flow_transformer_kind(keys: Iterable[str]) -> str | None:
    """"SD3/SD3.5", "FLUX.1" or "Z-Image" when ``keys`` are a flow transformer's, else None."""
    names = set()
    for key in keys:
        for prefix in PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        names.add(key)
    for kind, marker_sets in MARKERS.items():
        if any(all(k in names for k in markers) for markers in marker_sets):
            return kind
    return None
