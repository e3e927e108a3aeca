"""Third-party LoRA formats: kohya with diffusers or SD/SGM module names (UNet and text encoders), diffusers and
PEFT keys, alphas from tensors or the header, mixed ranks; unknown formats refused in one line. Tiny models per
format (diffusers' own loader as the oracle where it reads the format), and a full-size name check of SD1.5
and SDXL on the meta device."""

import json

import pytest
import torch

from benchmarks.ldm_export import _rename, unet_rules
from rlr_backend.lora import add_lora, kohya_state_dict, load_lora, load_lora_state_dict, save_kohya
from rlr_backend.lora.formats import _check_shapes, module_names
from rlr_backend.models.tiny_pipelines import build_tiny_pipeline
from rlr_backend.safe_io import InvalidModelFile, save_tensors

#: attention and the resnets' convolutions (LoCon-style), so conv LoRAs and resnet renames are covered
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2", "time_emb_proj", "ff.net.2")


def trained_unet(arch, rank=4, alpha=8.0):
    """A tiny pipeline of ``arch`` whose UNet carries a LoRA with non-zero weights (the reference)."""
    pipe = build_tiny_pipeline(arch, seed=0)
    add_lora(pipe.unet, rank=rank, alpha=alpha, target_modules=TARGETS, seed=1)
    with torch.no_grad():
        g = torch.Generator().manual_seed(2)
        for n, p in pipe.unet.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return pipe


def run(unet, arch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    width = unet.config.cross_attention_dim
    kw = {}
    if arch == "sdxl":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32, generator=g),
                                   "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)}
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), encoder_hidden_states=torch.randn(2, 8, width, generator=g), **kw).sample


def sgm_names(unet, state):
    """kohya keys with SD/SGM module names, made with benchmarks.ldm_export's rules (independent of the loader)."""
    rules = unet_rules(unet.config)
    out = {}
    for key, t in state.items():
        module, suffix = key[len("lora_unet_"):].split(".", 1)
        path = next(n for n, _ in unet.named_modules() if n.replace(".", "_") == module)
        ldm = next(iter(_rename({path + ".weight": t}, rules)))[:-len(".weight")]
        out["lora_unet_" + ldm.replace(".", "_") + "." + suffix] = t
    return out


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def reference(request):
    pipe = trained_unet(request.param)
    state, rank, alpha = kohya_state_dict(pipe.unet, dtype=torch.float32)
    return request.param, pipe, state, run(pipe.unet, request.param)


def fresh(arch):
    return build_tiny_pipeline(arch, seed=0)


def test_kohya_diffusers_and_sgm_names_load_the_same_adapter(reference, tmp_path):
    arch, pipe, state, want = reference
    base = run(fresh(arch).unet, arch)
    assert (want - base).abs().max() > 1e-3  # the adapter does something: the comparisons are not vacuous
    for name, tensors in (("diffusers", state), ("sgm", sgm_names(pipe.unet, state))):
        path = save_kohya(tensors, tmp_path / f"{name}.safetensors", 4, 8.0)
        target = fresh(arch)
        load_lora(target.unet, path)
        torch.testing.assert_close(run(target.unet, arch), want, rtol=1e-5, atol=1e-5, msg=name)
    if arch == "sdxl":  # diffusers reads SGM-named kohya SDXL LoRAs: it must agree with us
        oracle = fresh(arch)
        oracle.load_lora_weights(str(tmp_path / "sgm.safetensors"))
        torch.testing.assert_close(run(oracle.unet, arch), want, rtol=1e-4, atol=1e-4)


def test_diffusers_and_peft_keys_with_their_alpha(reference, tmp_path):
    from peft import get_peft_model_state_dict

    arch, pipe, _, want = reference
    peft_state = {k: v.float() for k, v in get_peft_model_state_dict(pipe.unet, adapter_name="default").items()}
    config = pipe.unet.peft_config["default"].to_dict()
    # diffusers' own writer: 'unet.<module>.lora_A.weight' and the adapter config (alpha 8) in the header
    type(pipe).save_lora_weights(str(tmp_path / "d"), unet_lora_layers=peft_state,
                                 unet_lora_adapter_metadata={k: (sorted(v) if isinstance(v, set) else v)
                                                             for k, v in config.items()})
    target = fresh(arch)
    load_lora(target.unet, tmp_path / "d" / "pytorch_lora_weights.safetensors")
    torch.testing.assert_close(run(target.unet, arch), want, rtol=1e-5, atol=1e-5)
    # PEFT's layout without a header: alpha is the rank (scale 1), so a rank-4 alpha-8 LoRA needs B doubled
    plain = {"base_model.model." + k: (v * 2 if "lora_B" in k else v) for k, v in peft_state.items()}
    save_tensors(plain, tmp_path / "peft.safetensors")
    target = fresh(arch)
    load_lora(target.unet, tmp_path / "peft.safetensors")
    torch.testing.assert_close(run(target.unet, arch), want, rtol=1e-5, atol=1e-5)


def test_mixed_ranks_and_alphas(tmp_path):
    pipe = trained_unet("sd1", rank=4, alpha=8.0)
    state, _, _ = kohya_state_dict(pipe.unet, dtype=torch.float32)
    key = next(k for k in state if k.endswith("attn1_to_q.lora_down.weight"))
    module = key[:-len(".lora_down.weight")]
    # rank 4 -> 6 on one module (zero-padded: same delta), alpha 8 -> 4 there with B doubled (same delta)
    state[module + ".lora_down.weight"] = torch.cat([state[module + ".lora_down.weight"], torch.zeros(2, 32)])
    up = state[module + ".lora_up.weight"] * 2 * 6 / 4
    state[module + ".lora_up.weight"] = torch.cat([up, torch.zeros(up.shape[0], 2)], dim=1)
    state[module + ".alpha"] = torch.tensor(4.0)
    target = fresh("sd1")
    load_lora_state_dict(target.unet, state)
    torch.testing.assert_close(run(target.unet, "sd1"), run(pipe.unet, "sd1"), rtol=1e-5, atol=1e-5)


def test_text_encoder_parts_apply_to_the_text_encoder(tmp_path):
    """A kohya LoRA with 'lora_te_' parts: rlr-sample's path adapts the text encoder as W + alpha/r * up @ down
    (merged by hand here; diffusers' own text-encoder loader does not find transformers 5's flattened CLIP)."""
    from rlr_backend.models.loader import model_for_pipeline
    from rlr_backend.train.sample import add_lora_file, set_lora_strength

    te = fresh("sd1").text_encoder
    names = [n for n, m in te.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(("q_proj", "v_proj"))]
    g = torch.Generator().manual_seed(3)
    state, merged = {}, fresh("sd1")
    for n in names:
        layer = te.get_submodule(n)
        key = "lora_te_" + (n if n.startswith("text_model.") else "text_model." + n).replace(".", "_")
        down = torch.randn(2, layer.in_features, generator=g)
        up = torch.randn(layer.out_features, 2, generator=g) * 0.1
        state.update({key + ".lora_down.weight": down, key + ".lora_up.weight": up, key + ".alpha": torch.tensor(1.0)})
        with torch.no_grad():
            merged.text_encoder.get_submodule(n).weight += 0.5 * up @ down  # alpha 1 / rank 2
    unet_state, _, _ = kohya_state_dict(trained_unet("sd1").unet, dtype=torch.float32)
    path = save_kohya({**state, **unet_state}, tmp_path / "te.safetensors", 2, 1.0)

    def embeds(p):
        return model_for_pipeline(p).encode(["a red circle"])
    base = embeds(fresh("sd1"))
    ours = fresh("sd1")
    add_lora_file(ours, path)
    torch.testing.assert_close(embeds(ours), embeds(merged), rtol=1e-5, atol=1e-5)
    assert (embeds(ours) - base).abs().max() > 1e-3
    set_lora_strength(ours, 0.0)  # strength 0 gives the base model, text encoder included
    model = model_for_pipeline(ours)
    torch.testing.assert_close(model.encode(["a red circle"]), base)


@pytest.mark.parametrize("key, match", [
    ("lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a", "LyCORIS LoHa is not supported"),
    ("lora_unet_down_blocks_0_attentions_0_proj_in.dora_scale", "DoRA is not supported"),
    ("model.diffusion_model.input_blocks.0.0.weight", "unknown LoRA format"),
    ("lora_unet_down_blocks_0_attentions_0_proj_in.weight", "unknown LoRA format"),
])
def test_unknown_formats_are_refused_in_one_line_naming_what_was_expected(tmp_path, key, match):
    unet = fresh("sd1").unet
    with pytest.raises(InvalidModelFile, match=match) as info:
        load_lora_state_dict(unet, {key: torch.zeros(4, 4)}, source="x.safetensors")
    msg = str(info.value)
    assert "\n" not in msg and key in msg and "lora_unet_<module>.lora_down.weight" in msg and "lora_A" in msg
    assert not getattr(unet, "peft_config", None)


def full_size_unet(arch):
    from diffusers import UNet2DConditionModel

    from benchmarks.memory_model import ARCHS

    with torch.device("meta"):
        return UNet2DConditionModel(**ARCHS[arch]["unet"])


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_full_size_names_resolve_on_the_meta_device(arch):
    """Every linear/conv module of the real SD1.5 / SDXL UNet, by its kohya name in both spellings, resolves
    to itself (SGM names from benchmarks.ldm_export's independent rules), and a LoRA of its shape passes."""
    unet = full_size_unet(arch)
    names = module_names(unet, "unet")
    rules = unet_rules(unet.config)
    layers = {n: m for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    assert len({n.replace(".", "_") for n in layers}) == len(layers)  # the '_' spelling is unambiguous
    for path, layer in layers.items():
        sgm = next(iter(_rename({path + ".weight": None}, rules)))[:-len(".weight")]
        assert names[path.replace(".", "_")] == path and names[sgm.replace(".", "_")] == path, (path, sgm)
        w = layer.weight
        from rlr_backend.lora.formats import LoraModule

        m = LoraModule("unet", path, torch.empty(4, *w.shape[1:], device="meta"),
                       torch.empty(w.shape[0], 4, *([1] * (w.dim() - 2)), device="meta"), 4.0, [path])
        _check_shapes(m, layer, "full-size", "")
    known = {"sd15": ["input_blocks_1_1_proj_in", "output_blocks_11_1_transformer_blocks_0_attn2_to_out_0",
                      "middle_block_1_transformer_blocks_0_ff_net_2", "input_blocks_3_0_op", "output_blocks_2_1_conv"],
             "sdxl": ["input_blocks_4_1_transformer_blocks_0_attn1_to_q", "middle_block_1_transformer_blocks_9_ff_net_2",
                      "output_blocks_0_1_proj_out", "label_emb_0_0", "output_blocks_5_2_conv"]}[arch]
    assert all(k in names for k in known), [k for k in known if k not in names]
    assert names["output_blocks_2_1_conv" if arch == "sd15" else "output_blocks_5_2_conv"].endswith("upsamplers.0.conv")


def test_full_size_text_encoder_names_resolve():
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from benchmarks.memory_model import CLIP_L_TEXT, OPENCLIP_BIGG_TEXT

    with torch.device("meta"):
        encoders = {"text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)),
                    "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_BIGG_TEXT))}
    for target, model in encoders.items():
        names = module_names(model, target)
        for layer in (0, 11):
            assert f"text_model_encoder_layers_{layer}_self_attn_q_proj" in names
            assert f"text_model_encoder_layers_{layer}_mlp_fc2" in names
    assert json.dumps(sorted(names))  # plain strings
