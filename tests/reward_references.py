"""Independent computations the model rewards are checked against (tests/test_reward_models.py): the
transformers CLIP model's cosine, and plain-torch forwards of open_clip's CLIP (HPSv2) and ImageReward's BLIP
on their original tensor names, so a wrong tensor mapping, activation or LayerNorm epsilon shows."""

import math

import torch
import torch.nn.functional as F

from rlr_backend.rewards.models.clip import PACKAGED_TOKENIZER
from rlr_backend.rewards.models.image_reward import MEAN as IR_MEAN
from rlr_backend.rewards.models.image_reward import STD as IR_STD
from rlr_backend.rewards.models.preprocess import clip_pixels

WIDTH, PATCH, SIZE, PROJ = 64, 8, 32, 16  # tiny: one 64-wide head per tower, 32 px images, 16-d embeddings


def clip_tokens(prompts):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(PACKAGED_TOKENIZER), local_files_only=True)
    return [tok([p], truncation=True, max_length=77, return_tensors="pt") for p in prompts]


def hf_cos(model, imgs, prompts):
    pixels = clip_pixels(imgs, SIZE)
    img = F.normalize(model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output), dim=-1)
    txt = [model.text_projection(model.text_model(**t).pooler_output) for t in clip_tokens(prompts)]
    return (img * F.normalize(torch.cat(txt), dim=-1)).sum(-1)


def _mha(q_in, kv_in, wq, bq, wk, bk, wv, bv, heads, mask=None):
    b, n, d = q_in.shape
    split = lambda x: x.view(b, -1, heads, d // heads).transpose(1, 2)  # noqa: E731
    q, k, v = split(q_in @ wq.T + bq), split(kv_in @ wk.T + bk), split(kv_in @ wv.T + bv)
    att = q @ k.transpose(-1, -2) / math.sqrt(d // heads)
    if mask is not None:
        att = att + mask
    return (att.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)


def open_clip_features(sd, imgs, prompts, layers=2):
    """open_clip's CLIP.encode_image / encode_text (pre-LN blocks, GELU, EOT pooling), written out."""
    def block(x, p, mask=None):
        d = x.shape[-1]
        h = F.layer_norm(x, (d,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        wq, wk, wv = sd[p + "attn.in_proj_weight"].chunk(3)
        bq, bk, bv = sd[p + "attn.in_proj_bias"].chunk(3)
        x = x + _mha(h, h, wq, bq, wk, bk, wv, bv, 1, mask) @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
        h = F.layer_norm(x, (d,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        h = F.gelu(h @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"])
        return x + h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]

    x = F.conv2d(clip_pixels(imgs, SIZE), sd["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, -1), x], 1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, (WIDTH,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    for i in range(layers):
        x = block(x, f"visual.transformer.resblocks.{i}.")
    img = F.layer_norm(x[:, 0], (WIDTH,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"]) @ sd["visual.proj"]
    texts = []
    for t in clip_tokens(prompts):
        ids = torch.zeros(1, 77, dtype=torch.long)  # open_clip pads with 0 to 77
        ids[:, : t["input_ids"].shape[1]] = t["input_ids"]
        y = sd["token_embedding.weight"][ids] + sd["positional_embedding"]
        causal = torch.full((77, 77), float("-inf")).triu(1)
        for i in range(layers):
            y = block(y, f"transformer.resblocks.{i}.", causal)
        y = F.layer_norm(y, (WIDTH,), sd["ln_final.weight"], sd["ln_final.bias"])
        texts.append(y[torch.arange(1), ids.argmax(-1)] @ sd["text_projection"])
    return F.normalize(img, dim=-1), F.normalize(torch.cat(texts), dim=-1)


def image_reward_reference(sd, imgs, prompts, vocab_dir, layers=2):
    """ImageReward.score_gard written out: timm ViT (LayerNorm eps 1e-6) -> med.py BERT with cross-attention."""
    from transformers import BertTokenizer

    v, t = "blip.visual_encoder.", "blip.text_encoder."
    x = F.conv2d(clip_pixels(imgs, SIZE), sd[v + "patch_embed.proj.weight"], sd[v + "patch_embed.proj.bias"], stride=PATCH)
    x = torch.cat([sd[v + "cls_token"].expand(x.shape[0], 1, -1), x.flatten(2).transpose(1, 2)], 1) + sd[v + "pos_embed"]
    ln6 = lambda y, p: F.layer_norm(y, (y.shape[-1],), sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)  # noqa: E731
    for i in range(layers):
        p = f"{v}blocks.{i}."
        h = ln6(x, p + "norm1")
        wq, wk, wv = sd[p + "attn.qkv.weight"].chunk(3)
        bq, bk, bv = sd[p + "attn.qkv.bias"].chunk(3)
        x = x + _mha(h, h, wq, bq, wk, bk, wv, bv, 1) @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        h = F.gelu(ln6(x, p + "norm2") @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
        x = x + h @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
    enc = ln6(x, v + "norm")

    tok = BertTokenizer.from_pretrained(str(vocab_dir), local_files_only=True)
    ids = tok(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    ln12 = lambda y, p: F.layer_norm(y, (y.shape[-1],), sd[p + ".weight"], sd[p + ".bias"], eps=1e-12)  # noqa: E731
    lin = lambda y, p: y @ sd[p + ".weight"].T + sd[p + ".bias"]  # noqa: E731
    y = sd[t + "embeddings.word_embeddings.weight"][ids["input_ids"]] + sd[t + "embeddings.position_embeddings.weight"][:35]
    y = ln12(y, t + "embeddings.LayerNorm")
    pad = (1.0 - ids["attention_mask"][:, None, None, :].float()) * torch.finfo(torch.float32).min
    for i in range(layers):
        q = f"{t}encoder.layer.{i}."
        for block, kv, mask in (("attention", y, pad), ("crossattention", enc, None)):
            s = q + block + ".self."
            a = _mha(y, kv, *(sd[s + n + "." + w] for n in ("query", "key", "value") for w in ("weight", "bias")), 1, mask)
            y = ln12(lin(a, q + block + ".output.dense") + y, q + block + ".output.LayerNorm")
        h = F.gelu(lin(y, q + "intermediate.dense"))
        y = ln12(lin(h, q + "output.dense") + y, q + "output.LayerNorm")
    z = y[:, 0]
    for i in (0, 2, 4, 6, 7):
        z = lin(z, f"mlp.layers.{i}")
    return ((z - IR_MEAN) / IR_STD).squeeze(-1)
