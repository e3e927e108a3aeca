"""Model rewards from local weights, on tiny random-weight models of each architecture built here.

Each reward is checked against an independent computation (tests/reward_references.py): the
transformers model it was saved from (CLIP score, PickScore, aesthetic) or a plain-torch forward of the
original architecture on the original tensor names (HPSv2's open_clip layout, ImageReward's BLIP
layout), so a wrong tensor mapping, activation or LayerNorm epsilon fails a test. Plus: shapes,
gradients, the no-grad path and the errors for missing, wrong-shape and pickled weights.
"""

import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from rlr_backend.rewards import REWARDS, MissingRewardWeights, find_reward_models, make_reward
from rlr_backend.rewards.models import MODEL_REWARDS
from rlr_backend.rewards.models.aesthetic import AestheticReward
from rlr_backend.rewards.models.clip_similarity import ClipScore, HPSv2
from rlr_backend.rewards.models.preprocess import CLIP_MEAN, CLIP_STD, clip_pixels
from rlr_backend.safe_io import InvalidModelFile

from reward_references import (PATCH, PROJ, SIZE, WIDTH, hf_cos, image_reward_reference,
                               open_clip_features)

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle on a blue background", "a photo of a cat"]


@pytest.fixture(autouse=True)
def _no_env_folder(monkeypatch):
    monkeypatch.delenv("RLR_REWARD_MODELS", raising=False)


def _rand(gen, *shape, std=0.05):
    return torch.randn(*shape, generator=gen) * std


def tiny_clip(act="gelu", text=True, seed=0):
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    tower = dict(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=2, num_attention_heads=1,
                 hidden_act=act)
    vision = dict(tower, image_size=SIZE, patch_size=PATCH, projection_dim=PROJ)
    cfg = CLIPConfig(text_config=dict(tower, vocab_size=49408, max_position_embeddings=77, projection_dim=PROJ),
                     vision_config=vision, projection_dim=PROJ, logit_scale_init_value=math.log(30.0))
    model = CLIPModel(cfg) if text else CLIPVisionModelWithProjection(cfg.vision_config)
    return model.eval()


def head_tensors(d, gen, bad_layer2=False):
    sizes = [(1024, d), (64 if bad_layer2 else 128, 1024), (64, 128), (16, 64), (1, 16)]
    out = {}
    for i, (o, n) in zip((0, 2, 4, 6, 7), sizes):
        out[f"layers.{i}.weight"] = _rand(gen, o, n, std=1 / math.sqrt(n))
        out[f"layers.{i}.bias"] = _rand(gen, o, std=0.1)
    return out


def open_clip_state_dict(gen, layers=2, width=WIDTH, vocab=49408, ctx=77):
    """Random weights with open_clip's names and layouts (nn.MultiheadAttention in_proj, proj as W x D)."""
    sd = {"visual.class_embedding": _rand(gen, width), "visual.positional_embedding": _rand(gen, 1 + (SIZE // PATCH) ** 2, width),
          "visual.conv1.weight": _rand(gen, width, 3, PATCH, PATCH), "visual.proj": _rand(gen, width, PROJ, std=0.2),
          "token_embedding.weight": _rand(gen, vocab, width, std=0.2), "positional_embedding": _rand(gen, ctx, width),
          "text_projection": _rand(gen, width, PROJ, std=0.2), "logit_scale": torch.tensor(math.log(100.0))}
    for ln in ("visual.ln_pre", "visual.ln_post", "ln_final"):
        sd[ln + ".weight"], sd[ln + ".bias"] = 1 + _rand(gen, width), _rand(gen, width)
    for tower in ("visual.transformer", "transformer"):
        for i in range(layers):
            p = f"{tower}.resblocks.{i}."
            for ln in ("ln_1", "ln_2"):
                sd[p + ln + ".weight"], sd[p + ln + ".bias"] = 1 + _rand(gen, width), _rand(gen, width)
            sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"] = _rand(gen, 3 * width, width, std=0.2), _rand(gen, 3 * width)
            sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"] = _rand(gen, width, width, std=0.2), _rand(gen, width)
            sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"] = _rand(gen, 4 * width, width, std=0.2), _rand(gen, 4 * width)
            sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"] = _rand(gen, width, 4 * width, std=0.1), _rand(gen, width)
    return sd


def image_reward_state_dict(gen, vocab, layers=2, width=WIDTH, hidden=WIDTH, bad_mlp=False):
    """Random weights with the names of THUDM's ImageReward.pt (BLIP ViT + med.py BERT + MLP)."""
    v, t = "blip.visual_encoder.", "blip.text_encoder."
    sd = {v + "cls_token": _rand(gen, 1, 1, width), v + "pos_embed": _rand(gen, 1, 1 + (SIZE // PATCH) ** 2, width),
          v + "patch_embed.proj.weight": _rand(gen, width, 3, PATCH, PATCH), v + "patch_embed.proj.bias": _rand(gen, width),
          v + "norm.weight": 1 + _rand(gen, width), v + "norm.bias": _rand(gen, width),
          t + "embeddings.word_embeddings.weight": _rand(gen, vocab, hidden, std=0.3),
          t + "embeddings.position_embeddings.weight": _rand(gen, 40, hidden),
          t + "embeddings.LayerNorm.weight": 1 + _rand(gen, hidden), t + "embeddings.LayerNorm.bias": _rand(gen, hidden),
          t + "embeddings.position_ids": torch.arange(40).unsqueeze(0),
          "blip.vision_proj.weight": _rand(gen, 8, width), "blip.vision_proj.bias": _rand(gen, 8),
          "blip.text_proj.weight": _rand(gen, 8, hidden), "blip.text_proj.bias": _rand(gen, 8)}
    for i in range(layers):
        p = f"{v}blocks.{i}."
        for ln in ("norm1", "norm2"):
            sd[p + ln + ".weight"], sd[p + ln + ".bias"] = 1 + _rand(gen, width), _rand(gen, width)
        sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"] = _rand(gen, 3 * width, width, std=0.2), _rand(gen, 3 * width)
        sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"] = _rand(gen, width, width, std=0.2), _rand(gen, width)
        sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = _rand(gen, 4 * width, width, std=0.2), _rand(gen, 4 * width)
        sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = _rand(gen, width, 4 * width, std=0.1), _rand(gen, width)
        q = f"{t}encoder.layer.{i}."
        for block, kv_in in (("attention", hidden), ("crossattention", width)):
            for name, n_in in (("query", hidden), ("key", kv_in), ("value", kv_in)):
                sd[f"{q}{block}.self.{name}.weight"] = _rand(gen, hidden, n_in, std=0.2)
                sd[f"{q}{block}.self.{name}.bias"] = _rand(gen, hidden)
            sd[f"{q}{block}.output.dense.weight"], sd[f"{q}{block}.output.dense.bias"] = _rand(gen, hidden, hidden, std=0.2), _rand(gen, hidden)
            sd[f"{q}{block}.output.LayerNorm.weight"], sd[f"{q}{block}.output.LayerNorm.bias"] = 1 + _rand(gen, hidden), _rand(gen, hidden)
        sd[q + "intermediate.dense.weight"], sd[q + "intermediate.dense.bias"] = _rand(gen, 4 * hidden, hidden, std=0.2), _rand(gen, 4 * hidden)
        sd[q + "output.dense.weight"], sd[q + "output.dense.bias"] = _rand(gen, hidden, 4 * hidden, std=0.1), _rand(gen, hidden)
        sd[q + "output.LayerNorm.weight"], sd[q + "output.LayerNorm.bias"] = 1 + _rand(gen, hidden), _rand(gen, hidden)
    sd.update({"mlp." + k: x for k, x in head_tensors(hidden, gen, bad_layer2=bad_mlp).items()})
    return sd


BERT_VOCAB = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "on", "blue",
              "background", "photo", "of", "cat"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A reward-models folder with tiny weights for every model reward, and the in-memory originals."""
    root = tmp_path_factory.mktemp("reward_models")
    gen = torch.Generator().manual_seed(0)
    clip = tiny_clip("gelu", seed=1)
    clip.save_pretrained(root / "clip_score")  # transformers folder; tokenizer: the packaged CLIP BPE
    pick = tiny_clip("gelu", seed=2)
    pick.save_pretrained(root / "pickscore")
    (root / "hpsv2").mkdir()
    hps = open_clip_state_dict(gen)
    save_file(hps, str(root / "hpsv2" / "HPS_v2.1_compressed.safetensors"))
    (root / "aesthetic").mkdir()
    head = head_tensors(PROJ, gen)
    save_file(head, str(root / "aesthetic" / "sac+logos+ava1-l14-linearMSE.safetensors"))
    vit_l = tiny_clip("quick_gelu", text=False, seed=3)  # OpenAI's ViT-L/14 uses quick_gelu
    (root / "clip_vision").mkdir()
    save_file({k: v.contiguous() for k, v in vit_l.state_dict().items()}, str(root / "clip_vision" / "clip-vit-large-patch14.safetensors"))
    (root / "image_reward").mkdir()
    ir = image_reward_state_dict(gen, vocab=len(BERT_VOCAB) + 2)
    save_file(ir, str(root / "image_reward" / "ImageReward.safetensors"))
    (root / "image_reward" / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n")
    return {"root": root, "clip": clip, "pick": pick, "hps": hps, "head": head, "vit_l": vit_l, "ir": ir}


def images(batch=2, size=SIZE, seed=0, requires_grad=False):
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return x.requires_grad_(requires_grad)


# ------------------------------------------------------------------------------ values
def test_each_reward_matches_an_independent_computation(models):
    root, x = models["root"], images()
    with torch.no_grad():
        torch.testing.assert_close(make_reward("clip_score", models_dir=root)(x, PROMPTS),
                                   2.5 * hf_cos(models["clip"], x, PROMPTS), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(make_reward("pickscore", models_dir=root)(x, PROMPTS),
                                   30.0 * hf_cos(models["pick"], x, PROMPTS), atol=1e-4, rtol=1e-5)
        img, txt = open_clip_features(models["hps"], x, PROMPTS)
        torch.testing.assert_close(make_reward("hpsv2", models_dir=root)(x, PROMPTS), (img * txt).sum(-1),
                                   atol=1e-5, rtol=1e-5)
        vit = models["vit_l"]
        emb = F.normalize(vit.visual_projection(vit.vision_model(pixel_values=clip_pixels(x, SIZE)).pooler_output), dim=-1)
        h = models["head"]
        for i in (0, 2, 4, 6, 7):
            emb = emb @ h[f"layers.{i}.weight"].T + h[f"layers.{i}.bias"]
        torch.testing.assert_close(make_reward("aesthetic", models_dir=root)(x, PROMPTS), emb.squeeze(-1),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(make_reward("image_reward", models_dir=root)(x, PROMPTS),
                                   image_reward_reference(models["ir"], x, PROMPTS, root / "image_reward"), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", MODEL_REWARDS)
def test_shapes_gradients_and_no_grad_path(models, name):
    reward = make_reward(name, models_dir=models["root"])
    assert reward.name == name and reward.differentiable
    x = images(3, size=40, requires_grad=True)  # not the model's size: resized and cropped inside
    value = reward(x, ["a red circle on a blue background"] * 3)
    assert value.shape == (3,) and torch.isfinite(value).all() and value.requires_grad
    value.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in _params(reward))  # the reward model stays frozen
    assert not reward(images(3, size=40), ["a cat"] * 3).requires_grad  # images without grad: no graph
    with torch.no_grad():
        assert not reward(x, ["a cat"] * 3).requires_grad


def _params(reward):
    return [p for m in vars(reward).values() if isinstance(m, torch.nn.Module) for p in m.parameters()]


def test_preprocessing_is_resize_shorter_side_then_center_crop():
    x = torch.rand(1, 3, 40, 60)
    out = clip_pixels(x, 20)
    resized = F.interpolate(x, size=(20, 30), mode="bicubic", align_corners=False, antialias=True)[..., 5:25]
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out, (resized - mean) / std)
    same = torch.rand(1, 3, 20, 20)
    torch.testing.assert_close(clip_pixels(same, 20), (same - mean) / std)  # right size: no resampling


def test_prompt_count_must_match_and_text_embeddings_are_cached(models):
    reward = make_reward("clip_score", models_dir=models["root"])
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        reward(images(), ["one"])
    reward(images(), ["a cat", "a cat"])
    assert list(reward._text_cache) == ["a cat"]


# ------------------------------------------------------------------------------ finding weights
def test_registry_builds_model_rewards_without_touching_files(tmp_path):
    for name in MODEL_REWARDS:
        r = REWARDS[name](models_dir=tmp_path / "nothing")  # what the Gradio app does to read `differentiable`
        assert r.name == name and r.differentiable is True
    code = "import sys, rlr_backend.rewards; assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("name,expected", [("aesthetic", "sac+logos+ava1-l14-linearMSE.safetensors"),
                                           ("clip_score", "config.json + model.safetensors"),
                                           ("pickscore", "PickScore_v1"),
                                           ("hpsv2", "HPS_v2.1_compressed.safetensors"),
                                           ("image_reward", "vocab.txt")])
def test_missing_weights_say_what_goes_where(tmp_path, name, expected):
    with pytest.raises(MissingRewardWeights) as err:
        make_reward(f"brightness,{name}=0.5", models_dir=tmp_path)
    msg = str(err.value)
    assert f"reward {name!r}" in msg and expected in msg and str(tmp_path / name) in msg
    assert "RLR_REWARD_MODELS" in msg and "docs/rewards.md" in msg
    with pytest.raises(MissingRewardWeights, match="RLR_REWARD_MODELS is not set"):
        make_reward(name)  # no folder at all


def test_environment_variable_and_comfyui_layout(models, tmp_path, monkeypatch):
    comfy = tmp_path / "ComfyUI" / "models"
    (comfy / "rewards").mkdir(parents=True)
    for name in ("aesthetic", "hpsv2", "image_reward"):
        (comfy / "rewards" / name).symlink_to(models["root"] / name)
    (comfy / "clip_vision").symlink_to(models["root"] / "clip_vision")
    found = find_reward_models(comfy)
    assert set(found) == {"aesthetic", "hpsv2", "image_reward"}
    assert found["aesthetic"]["clip"].name == "clip-vit-large-patch14.safetensors"
    assert set(find_reward_models(models["root"])) == set(MODEL_REWARDS)
    monkeypatch.setenv("RLR_REWARD_MODELS", os.pathsep.join([str(tmp_path / "empty"), str(models["root"])]))
    assert make_reward("pickscore").files()["clip"] == models["root"] / "pickscore"


def test_explicit_paths(models):
    root = models["root"]
    hps = HPSv2(root / "hpsv2" / "HPS_v2.1_compressed.safetensors")
    assert hps.check().files()["clip"].name == "HPS_v2.1_compressed.safetensors"
    aes = AestheticReward(root / "aesthetic", clip=root / "clip_vision" / "clip-vit-large-patch14.safetensors")
    assert aes(images(), PROMPTS).shape == (2,)
    with pytest.raises(MissingRewardWeights, match=str(root / "nowhere")):
        ClipScore(root / "nowhere").check()


# ------------------------------------------------------------------------------ bad files
def test_wrong_shapes_name_the_expected_architecture(models, tmp_path):
    gen = torch.Generator().manual_seed(1)
    (tmp_path / "aesthetic").mkdir()
    save_file(head_tensors(PROJ, gen, bad_layer2=True), str(tmp_path / "aesthetic" / "head.safetensors"))
    with pytest.raises(InvalidModelFile, match=r"improved-aesthetic-predictor MLP head.*layers\.2\.weight: file \[64, 1024\]"):
        make_reward("aesthetic", models_dir=tmp_path)

    save_file(head_tensors(2 * PROJ, gen), str(tmp_path / "aesthetic" / "head.safetensors"))  # 32-d input, CLIP gives 16
    (tmp_path / "clip_vision").symlink_to(models["root"] / "clip_vision")
    with pytest.raises(MissingRewardWeights, match="32-d image embeddings"):
        make_reward("aesthetic", models_dir=tmp_path)
    with pytest.raises(InvalidModelFile, match="needs OpenAI CLIP ViT-L/14"):
        AestheticReward(tmp_path / "aesthetic", clip=models["root"] / "clip_vision" / "clip-vit-large-patch14.safetensors").check()

    folder = tmp_path / "clip_score"
    models["clip"].save_pretrained(folder)
    cfg = (folder / "config.json").read_text().replace('"intermediate_size": 128', '"intermediate_size": 96')
    (folder / "config.json").write_text(cfg)
    with pytest.raises(InvalidModelFile, match=r"expected architecture, CLIP .*fc1\.weight: file \[128, 64\], expected \[96, 64\]"):
        make_reward("clip_score", models_dir=tmp_path)

    (tmp_path / "pickscore").mkdir()
    (tmp_path / "pickscore" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(InvalidModelFile, match="describes a 'bert' model; a CLIP model"):
        make_reward("pickscore", models_dir=tmp_path)

    (tmp_path / "image_reward").mkdir()
    save_file(image_reward_state_dict(gen, vocab=17, bad_mlp=True), str(tmp_path / "image_reward" / "ImageReward.safetensors"))
    with pytest.raises(InvalidModelFile, match=r"improved-aesthetic-predictor MLP head.*mlp\.layers\.2\.weight"):
        make_reward("image_reward", models_dir=tmp_path)

    (tmp_path / "hpsv2").mkdir()
    save_file({k: v.contiguous() for k, v in models["vit_l"].state_dict().items()}, str(tmp_path / "hpsv2" / "vit.safetensors"))
    with pytest.raises(InvalidModelFile, match="holds only CLIP's image tower"):
        make_reward("hpsv2", models_dir=tmp_path)


class _Canary:
    """Unpickling this creates a file: proof that nothing was unpickled if the file is absent."""

    path = None

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_pickles_are_refused_and_never_unpickled(models, tmp_path):
    canary = _Canary()
    canary.path = tmp_path / "canary"
    payload = pickle.dumps({"layers.0.weight": canary})
    (tmp_path / "aesthetic").mkdir()
    (tmp_path / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth").write_bytes(payload)
    with pytest.raises(InvalidModelFile, match=r"sac\+logos\+ava1-l14-linearMSE\.pth.*Convert them to \.safetensors"):
        make_reward("aesthetic", models_dir=tmp_path)
    (tmp_path / "hpsv2").mkdir()
    (tmp_path / "hpsv2" / "HPS_v2.1_compressed.safetensors").write_bytes(payload)  # a pickle under a safetensors name
    with pytest.raises(InvalidModelFile, match="pickle"):
        make_reward("hpsv2", models_dir=tmp_path)
    (tmp_path / "pickscore").mkdir()
    (tmp_path / "pickscore" / "config.json").write_text((models["root"] / "pickscore" / "config.json").read_text())
    (tmp_path / "pickscore" / "pytorch_model.bin").write_bytes(payload)
    with pytest.raises(InvalidModelFile, match=r"only pickle weights \(pytorch_model\.bin\)"):
        make_reward("pickscore", models_dir=tmp_path)
    assert not canary.path.exists()


def test_a_safetensors_header_length_starting_with_a_pickle_byte_is_not_a_pickle(tmp_path):
    """The 8-byte header length can begin with 0x80 (pickle's first byte) or b"PK" (torch's zip)."""
    import struct

    from rlr_backend.safe_io import load_tensors

    path = tmp_path / "w.safetensors"
    for pad in range(300):
        save_file({"w": torch.ones(2)}, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[:1] == b"\x80":
            break
    assert struct.unpack("<Q", path.read_bytes()[:8])[0] % 256 == 0x80
    torch.testing.assert_close(load_tensors(path)[0]["w"], torch.ones(2))
