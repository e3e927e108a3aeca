"""rlr_backend.lora.keys: the one set of LoRA conventions the peft path and the ComfyUI wrappers share."""

import pytest
import torch

from rlr_backend.lora import (DEFAULT_TARGET_MODULES, add_lora, init_down, is_target, kohya_key, kohya_state_dict,
                              kohya_tensors, one_rank_and_alpha, resolve_alpha)
from rlr_backend.models.tiny import build_tiny_unet


def test_targets_follow_peft_suffix_rule():
    assert is_target("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    assert is_target("mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0")
    assert not is_target("mid_block.attentions.0.transformer_blocks.0.attn2.to_out")  # the Sequential, not its Linear
    assert not is_target("down_blocks.0.attentions.0.proj_in.to_qx")
    unet = build_tiny_unet(sample_size=8, channels=4)
    expected = {n for n, m in unet.named_modules() if is_target(n) and isinstance(m, torch.nn.Linear)}
    params = add_lora(unet, rank=2)  # peft's own matching of the same target names
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in unet.named_parameters() if ".lora_A." in n}
    assert adapted == expected
    assert len(params) == 2 * len(adapted) > 0 and len(DEFAULT_TARGET_MODULES) == 4


def test_export_uses_the_shared_keys_and_init():
    unet = build_tiny_unet(sample_size=8, channels=4)
    add_lora(unet, rank=3, alpha=6.0, seed=5)
    sd, rank, alpha = kohya_state_dict(unet, dtype=torch.float32)
    assert (rank, alpha) == (3, 6.0)
    name = next(n for n, m in unet.named_modules() if hasattr(m, "lora_A"))
    module = dict(unet.named_modules())[name]
    assert torch.equal(sd[f"{kohya_key(name)}.lora_down.weight"], module.lora_A["default"].weight.detach())
    assert float(sd[f"{kohya_key(name)}.alpha"]) == 6.0
    # the first adapted module's A is the first draw of the seed's generator, A ~ N(0, 1/r^2)
    g = torch.Generator().manual_seed(5)
    assert torch.equal(module.lora_A["default"].weight.detach(), init_down(module.lora_A["default"].weight.shape, 3, g))
    big = init_down((3, 20_000), 3, torch.Generator().manual_seed(0))
    assert float(big.std()) == pytest.approx(1 / 3, rel=0.02)


def test_key_tensors_and_header_rules():
    assert kohya_key("up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_out.0") == \
        "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn1_to_out_0"
    t = kohya_tensors("k", torch.ones(2, 5), torch.zeros(7, 2), 4.0, torch.float16)
    assert {n: (v.shape, v.dtype) for n, v in t.items()} == {
        "k.lora_down.weight": ((2, 5), torch.float16), "k.lora_up.weight": ((7, 2), torch.float16),
        "k.alpha": ((), torch.float16)}
    assert resolve_alpha(4, None) == 4.0 and resolve_alpha(4, 1) == 1.0
    with pytest.raises(ValueError, match="rank must be >= 1"):
        resolve_alpha(0, None)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        resolve_alpha(2, 0.0)
    assert one_rank_and_alpha([4, 4], [2.0, 2.0]) == (4, 2.0)
    with pytest.raises(ValueError, match="mixed LoRA ranks"):
        one_rank_and_alpha([4, 8], [4.0, 4.0])
