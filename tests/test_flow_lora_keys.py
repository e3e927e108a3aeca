"""LoRA keys of the full-size SD3.5 medium / large, FLUX.1-dev, Z-Image and Qwen-Image transformers, built on the
meta device (no weights in memory): every targeted module gets a key, and every key names a module diffusers'
loader finds (``transformer.<module path>``, a Linear layer) and ComfyUI's map accepts.

ComfyUI's accepted names are restated from ``comfy/utils.py`` (Comfy-Org/ComfyUI @a125cd8):
``mmdit_to_diffusers`` maps, per joint block, ``attn.to_q/k/v``, ``attn.add_q/k/v_proj`` (slices of the fused
qkv), ``attn.to_out.0``, ``attn.to_add_out``, ``attn2.to_q/k/v`` and ``attn2.to_out.0``; ``flux_to_diffusers``
maps the double blocks' same attention names and the single blocks' ``attn.to_q/k/v``, ``proj_mlp`` and
``proj_out``; ``comfy/lora.py`` accepts each as ``transformer.<name>`` for SD3 and FLUX. Z-Image
(``z_image_to_diffusers``, ComfyUI 0.3.75): each block's ``attention.to_q/k/v`` and ``attention.to_out.0``, for
``layers``, ``noise_refiner`` and ``context_refiner``, accepted as ``diffusion_model.<name>``. Qwen-Image
(``comfy/lora.py`` QwenImage branch, ComfyUI @783545f, 2026-08): every weight ``diffusion_model.<name>.weight`` of
the model is accepted as ``transformer.<name>``, ``<name>`` and ``lycoris_<name with _>``; its native module
names (``comfy/ldm/qwen_image/model.py``) are diffusers' own (``transformer_blocks.N.attn.to_q/k/v``,
``add_q/k/v_proj``, ``to_out.0``, ``to_add_out``).
"""

from __future__ import annotations

import re

import pytest
import torch

from rlr_backend.lora import add_lora
from rlr_backend.lora.diffusers_export import lora_keys, lora_modules
from rlr_backend.models.flow_model import MMDIT_LORA_TARGETS
from rlr_backend.models.qwenimage_model import QwenImageModel
from rlr_backend.models.zimage_model import ZIMAGE_LORA_TARGETS

# official configs (the HF repositories' transformer/config.json values)
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
                   qk_norm="rms_norm")
SD35_LARGE = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64,
                  num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                  pooled_projection_dim=2048, pos_embed_max_size=192, qk_norm="rms_norm")
ZIMAGE = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
              n_heads=30, n_kv_heads=30, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0, t_scale=1000.0,
              axes_dims=[32, 48, 48], axes_lens=[1024, 512, 512])
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
QWEN_IMAGE = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56))

SD3_COMFY = re.compile(r"transformer_blocks\.(\d+)\.(attn2?\.(to_q|to_k|to_v|to_out\.0)"
                       r"|attn\.(add_q_proj|add_k_proj|add_v_proj|to_add_out))")
ZIMAGE_COMFY = re.compile(r"(layers|noise_refiner|context_refiner)\.(\d+)\.attention\.(to_q|to_k|to_v|to_out\.0)")
FLUX_COMFY = re.compile(r"(transformer_blocks\.(\d+)\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj"
                        r"|to_add_out)|single_transformer_blocks\.(\d+)\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out))")
QWEN_COMFY = re.compile(r"transformer_blocks\.(\d+)\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj"
                        r"|to_add_out)")


TARGETS = {"SD3Transformer2DModel": MMDIT_LORA_TARGETS, "FluxTransformer2DModel": MMDIT_LORA_TARGETS,
           "ZImageTransformer2DModel": ZIMAGE_LORA_TARGETS, "QwenImageTransformer2DModel": QwenImageModel.lora_targets}
PREFIX = {"ZImageTransformer2DModel": "diffusion_model."}  # what ComfyUI maps for Z-Image (flow_models.md)


def _meta(cls_name: str, config: dict):
    import diffusers

    with torch.device("meta"):
        model = getattr(diffusers, cls_name)(**config)
    add_lora(model, rank=4, target_modules=TARGETS[cls_name], seed=0)
    return model


def _targeted(model, targets) -> set[str]:
    """Linear layers a target names by peft's rule (the whole name, or its last dotted parts)."""
    return {n for n, m in model.named_modules() if type(m).__name__ == "Linear" or hasattr(m, "base_layer")
            if any(n == t or n.endswith("." + t) for t in targets) and ".base_layer" not in n
            and ".lora_" not in n}


@pytest.mark.parametrize("name,cls_name,config,pattern,expected", [
    # 24 blocks x 8 projections, less to_add_out of the last (context_pre_only) block, + 13 dual-attention x 4
    ("sd3.5-medium", "SD3Transformer2DModel", SD35_MEDIUM, SD3_COMFY, 24 * 8 - 1 + 13 * 4),
    ("sd3.5-large", "SD3Transformer2DModel", SD35_LARGE, SD3_COMFY, 38 * 8 - 1),
    # 19 double blocks x 8 + 38 single blocks x q/k/v
    ("flux.1-dev", "FluxTransformer2DModel", FLUX_DEV, FLUX_COMFY, 19 * 8 + 38 * 3),
    # 30 layers + 2 noise + 2 context refiners, 4 attention projections each
    ("z-image", "ZImageTransformer2DModel", ZIMAGE, ZIMAGE_COMFY, (30 + 2 + 2) * 4),
    # 60 joint blocks x 8 (image and text q/k/v/out), none context-pre-only
    ("qwen-image", "QwenImageTransformer2DModel", QWEN_IMAGE, QWEN_COMFY, 60 * 8),
], ids=["sd3.5-medium", "sd3.5-large", "flux.1-dev", "z-image", "qwen-image"])
def test_full_size_lora_keys(name, cls_name, config, pattern, expected):
    model = _meta(cls_name, config)
    assert next(model.parameters()).device.type == "meta"
    modules = lora_modules(model)
    assert set(modules) == _targeted(model, TARGETS[cls_name]) and len(modules) == expected, name
    depth = config.get("num_layers", config.get("n_layers"))
    prefix = PREFIX.get(cls_name, "transformer.")
    for path in modules:
        key_a, key_b = lora_keys(path, prefix)
        assert key_a.startswith(prefix) and key_b == key_a.replace("lora_A", "lora_B")
        layer = model.get_submodule(key_a[len(prefix):-len(".lora_A.weight")])
        assert isinstance(layer.base_layer, torch.nn.Linear)  # what diffusers' peft injection adapts
        match = pattern.fullmatch(path)
        assert match, f"{name}: ComfyUI has no mapping for {path}"
        block = next(int(g) for g in match.groups() if g is not None and g.isdigit())
        assert block < (depth if not path.startswith("single_") else config["num_single_layers"])
