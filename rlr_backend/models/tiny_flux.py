"""Tiny random-initialised FLUX.1 and Z-Image pipelines (tests; see :mod:`rlr_backend.models.tiny_flow_pipelines`).

Their T5 / Qwen3 tokenizers are word-level ``PreTrainedTokenizerFast`` tokenizers built here from a small
word list (the real ones come from the Hub); the Qwen one carries a minimal chat template, which Z-Image's
``encode_prompt`` applies. Z-Image's pad tokens start as uninitialised memory in diffusers, so they are set
to ones, as diffusers' own tests do.
"""

from __future__ import annotations

import torch

from .tiny_pipelines import _text_config, _tokenizer, _vae

WORDS = ("a", "an", "the", "red", "green", "blue", "yellow", "white", "black", "circle", "square", "triangle", "on",
         "background", "photo", "of", "cat", "dog", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = ("{% for m in messages %}<|user|> {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def word_tokenizer(max_length: int, chat: bool = False):
    """A word-level fast tokenizer over ``WORDS`` (+ <pad>, <unk>, </s>) with ``model_max_length``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(("<pad>", "<unk>", "</s>", *WORDS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>",
                                  model_max_length=max_length)
    if chat:
        out.chat_template = CHAT_TEMPLATE
    return out


def build_tiny_flux(dev: bool = True, seed: int = 0):
    """A random-init ``FluxPipeline``: CLIP-L-like pooled encoder (width 32), T5-like encoder (width 32, 16 tokens),
    one double and one single block, 4 latent channels (16 packed); ``dev``: a guidance embedding and the dynamic
    shift, else (schnell) neither."""
    from diffusers import FluxPipeline, FluxTransformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=dev)
    te = CLIPTextModel(_text_config(32, "quick_gelu"))
    t5 = T5EncoderModel(T5Config(vocab_size=len(WORDS) + 3, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                 decoder_start_token_id=0, pad_token_id=0, eos_token_id=2))
    sched = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=dev, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(transformer=transformer, scheduler=sched, vae=_vae(0.3611, shift_factor=0.1159), text_encoder=te,
                        tokenizer=_tokenizer(), text_encoder_2=t5, tokenizer_2=word_tokenizer(16))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_zimage(seed: int = 0):
    """A random-init ``ZImagePipeline``: Qwen3-like encoder (width 16, 2 layers), one main and one refiner layer of
    width 32, 4 latent channels, static shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32,
                                           n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=2, qk_norm=True,
                                           cap_feat_dim=16, rope_theta=256, t_scale=1000, axes_dims=[8, 4, 4],
                                           axes_lens=[256, 32, 32])
    with torch.no_grad():
        transformer.x_pad_token.fill_(1.0)
        transformer.cap_pad_token.fill_(1.0)
    qwen = Qwen3Model(Qwen3Config(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  num_key_value_heads=2, head_dim=8, vocab_size=len(WORDS) + 3,
                                  max_position_embeddings=64))
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(0.3611, shift_factor=0.1159),
                          text_encoder=qwen, tokenizer=word_tokenizer(16, chat=True), transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe
