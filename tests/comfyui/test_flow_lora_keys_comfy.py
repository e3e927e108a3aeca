"""Real ComfyUI: the keys of a flow LoRA export (full-size SD3.5 medium / large, FLUX.1-dev and Z-Image on
the meta device, as tests/test_flow_lora_keys.py builds them) are all in ComfyUI's own ``transformer.<name>``
map (``comfy.utils.mmdit_to_diffusers`` / ``flux_to_diffusers``, as ``comfy.lora.model_lora_keys_unet`` uses
them for SD3 and FLUX), and Z-Image's in its ``diffusion_model.<name>`` map (``z_image_to_diffusers``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (the meta-device configs)

from test_flow_lora_keys import FLUX_DEV, PREFIX, SD35_LARGE, SD35_MEDIUM, ZIMAGE, _meta  # noqa: E402

from rlr_backend.lora.diffusers_export import lora_keys, lora_modules  # noqa: E402

pytestmark = pytest.mark.comfyui


@pytest.mark.parametrize("name,cls_name,config", [("sd3.5-medium", "SD3Transformer2DModel", SD35_MEDIUM),
                                                  ("sd3.5-large", "SD3Transformer2DModel", SD35_LARGE),
                                                  ("flux.1-dev", "FluxTransformer2DModel", FLUX_DEV),
                                                  ("z-image", "ZImageTransformer2DModel", ZIMAGE)])
def test_comfyui_maps_every_exported_key(comfy_inprocess, name, cls_name, config):
    import comfy.utils

    if cls_name == "FluxTransformer2DModel":
        comfy_map = comfy.utils.flux_to_diffusers({"depth": config["num_layers"], "hidden_size": 3072,
                                                   "depth_single_blocks": config["num_single_layers"]},
                                                  output_prefix="diffusion_model.")
    elif cls_name == "ZImageTransformer2DModel":  # comfy/lora.py's Lumina2 branch: diffusion_model.<name>
        comfy_map = comfy.utils.z_image_to_diffusers({"n_layers": config["n_layers"], "dim": config["dim"],
                                                      "n_refiner_layers": config["n_refiner_layers"]},
                                                     output_prefix="diffusion_model.")
    else:
        comfy_map = comfy.utils.mmdit_to_diffusers({"depth": config["num_layers"]}, output_prefix="diffusion_model.")
    prefix = PREFIX.get(cls_name, "transformer.")
    accepted = {f"{prefix}{k[:-len('.weight')]}" for k in comfy_map if k.endswith(".weight")}
    keys = [lora_keys(path, prefix)[0][:-len(".lora_A.weight")] for path in lora_modules(_meta(cls_name, config))]
    assert keys and not [k for k in keys if k not in accepted], name
