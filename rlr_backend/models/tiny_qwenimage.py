"""A tiny random-initialised Qwen-Image pipeline (tests; see :mod:`rlr_backend.models.tiny_flow_pipelines`).

Widths from diffusers' own Qwen-Image pipeline test (shared/reference/flow-matching.md §3): a 2-layer transformer of
2 x 16 heads, a Qwen2.5-VL text encoder of width 16 (2 layers, its vision tower 1 layer: the text path never runs
it), a 3-D ``AutoencoderKLQwenImage`` (base width 8, z_dim 4, spatial factor 4) with per-channel latent
statistics that are not the identity (so decoding tests them), and the released scheduler config (dynamic shift
0.5 -> 0.9 over 256 -> 8192 tokens, shift_terminal 0.02). 32 px images give 8x8 latents, 16 tokens of 2x2.

The tokenizer is a word-level one over ``tiny_flux.WORDS`` built here (the real Qwen2 tokenizer comes from the Hub):
``<|im_start|>`` / ``<|im_end|>`` are special tokens, and newlines, words and punctuation are tokens of their own,
so the pipeline's system-prompt template is 34 tokens before the prompt, as with the real tokenizer, and the
pipeline's ``prompt_template_encode_start_idx`` = 34 drops exactly the template's head.
"""

from __future__ import annotations

import torch

from .tiny_flux import WORDS

SPECIAL = ("<|im_start|>", "<|im_end|>")


def qwen_word_tokenizer():
    """A word-level fast tokenizer over ``WORDS`` and the template's words, with the chat special tokens."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    template = ("system user assistant Describe image by detailing color shape size texture quantity text spatial "
                "relationships objects and , : \n").split(" ")
    vocab = {w: i for i, w in enumerate(dict.fromkeys(("<pad>", "<unk>", "</s>", *SPECIAL, *WORDS, *template)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n|\w+|[^\w\s]"), behavior="removed", invert=True)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>",
                                  model_max_length=2048)
    out.add_special_tokens({"additional_special_tokens": list(SPECIAL)})
    return out


def build_tiny_qwenimage(seed: int = 0):
    """A random-init ``QwenImagePipeline`` (see the module docstring)."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = qwen_word_tokenizer()
    vocab = len(tokenizer)
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                              axes_dims_rope=(8, 4, 4))
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
                                 latents_std=[1.5, 0.8, 1.2, 2.0])
    ids = dict(bos_token_id=vocab - 1, eos_token_id=vocab - 1, pad_token_id=0)
    text = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                rope_theta=1e6, vocab_size=vocab, max_position_embeddings=128, **ids)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=dict(depth=1, hidden_size=16, intermediate_size=16,
                                                                   num_heads=2, out_hidden_size=16),
                              hidden_size=16, vocab_size=vocab, image_token_id=vocab + 1, video_token_id=vocab + 2,
                              vision_start_token_id=vocab + 3, vision_end_token_id=vocab + 4, **ids)
    encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                                base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
                                                time_shift_type="exponential")
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=encoder, tokenizer=tokenizer,
                             transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe
