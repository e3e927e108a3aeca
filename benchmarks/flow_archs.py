"""The published flow-matching transformers (SD3.5 medium / large, FLUX.1-dev / schnell, Z-Image) at random init
from their public configs written out here (nothing downloads), their text encoders and VAE for parameter counts,
and the reduced-depth builds the memory model measures (``benchmarks.memory_model.flow``).

Why reduced depth: these transformers are stacks of identical blocks (at most three kinds per model), so the
bytes an update keeps grow by a fixed amount per block of each kind. Each model is measured at full width with
a few blocks (a ``base`` build and one build per block kind with one more block of that kind), and the full
depth is ``base + sum_k (full_k - base_k) x (build_k - base)``; the full models (5-24 GB in bf16) do not fit
this machine's share of RAM, one block more does.

Sources (config.json of each, architecture fields only, published values):
  stabilityai/stable-diffusion-3.5-medium (transformer/, text_encoder/, text_encoder_2/, text_encoder_3/, vae/),
  stabilityai/stable-diffusion-3.5-large (transformer/), black-forest-labs/FLUX.1-dev and FLUX.1-schnell
  (transformer/, text_encoder/, text_encoder_2/, vae/), Tongyi-MAI/Z-Image-Turbo (transformer/, text_encoder/:
  Qwen3-4B, vae/: FLUX's).
"""

from __future__ import annotations

from typing import Sequence

import torch

from rlr_backend.lora import is_target
from rlr_backend.models.flow_model import MMDIT_LORA_TARGETS
from rlr_backend.models.zimage_model import ZIMAGE_LORA_TARGETS

from .sd_archs import CLIP_L_TEXT, OPENCLIP_BIGG_TEXT, SD_VAE, _materialize, param_count


def stored_count(model: torch.nn.Module) -> int:
    """Parameters + buffers (SD3's positional embedding is a 90-230 M element buffer, saved and loaded with the
    weights)."""
    return param_count(model) + sum(b.numel() for b in model.buffers())

SD35_MEDIUM: dict = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24, "attention_head_dim": 64,
                     "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
                     "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 384,
                     "dual_attention_layers": tuple(range(13)), "qk_norm": "rms_norm"}
SD35_LARGE: dict = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 38, "attention_head_dim": 64,
                    "num_attention_heads": 38, "joint_attention_dim": 4096, "caption_projection_dim": 2432,
                    "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 192,
                    "dual_attention_layers": (), "qk_norm": "rms_norm"}
FLUX1_DEV: dict = {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
                   "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
                   "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": (16, 56, 56)}
FLUX1_SCHNELL: dict = {**FLUX1_DEV, "guidance_embeds": False}
ZIMAGE_TURBO: dict = {"all_patch_size": (2,), "all_f_patch_size": (1,), "in_channels": 16, "dim": 3840, "n_layers": 30,
                      "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30, "norm_eps": 1e-5, "qk_norm": True,
                      "cap_feat_dim": 2560, "rope_theta": 256.0, "t_scale": 1000.0, "axes_dims": (32, 48, 48),
                      "axes_lens": (1024, 512, 512)}

FLOW_VAE: dict = {**SD_VAE, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False}
T5_XXL_ENCODER: dict = {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24,
                        "vocab_size": 32128, "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32}
QWEN3_4B: dict = {"hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36, "num_attention_heads": 32,
                  "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": True,
                  "max_position_embeddings": 40960}

#: per model: the transformer's class and config; its block kinds with the full depth and the reduced builds
#: (``base``: config changes of the smallest build; ``builds``: block kind -> config changes of base + one block);
#: text encoders; text tokens per prompt as the adapter encodes them; whether sampling makes an unconditional
#: pass (CFG: a call of batch 2B); T, the usual number of sampling steps; LoRA targets (the adapter's)
FLOW_ARCHS: dict[str, dict] = {
    "sd35m": {"label": "SD3.5 medium", "cls": "SD3Transformer2DModel", "config": SD35_MEDIUM,
              # base: block 0 with dual attention + the last (context-pre-only) block; +1 dual / +1 plain block
              "base": {"num_layers": 2, "dual_attention_layers": (0,)},
              "builds": {"dual": {"num_layers": 3, "dual_attention_layers": (0, 1)},
                         "plain": {"num_layers": 3, "dual_attention_layers": (0,)}},
              "full": {"dual": 13 - 1, "plain": 10 - 0}, "text": ("clip_l", "clip_g", "t5_xxl"), "text_tokens": 77 + 256,
              "cfg": True, "T": 40, "targets": MMDIT_LORA_TARGETS},
    "sd35l": {"label": "SD3.5 large", "cls": "SD3Transformer2DModel", "config": SD35_LARGE,
              "base": {"num_layers": 2}, "builds": {"plain": {"num_layers": 3}}, "full": {"plain": 38 - 2},
              "text": ("clip_l", "clip_g", "t5_xxl"), "text_tokens": 77 + 256, "cfg": True, "T": 28,
              "targets": MMDIT_LORA_TARGETS},
    "flux-dev": {"label": "FLUX.1-dev", "cls": "FluxTransformer2DModel", "config": FLUX1_DEV,
                 "base": {"num_layers": 1, "num_single_layers": 1},
                 "builds": {"double": {"num_layers": 2, "num_single_layers": 1},
                            "single": {"num_layers": 1, "num_single_layers": 2}},
                 "full": {"double": 19 - 1, "single": 38 - 1}, "text": ("clip_l", "t5_xxl"), "text_tokens": 512,
                 "cfg": False, "T": 28, "targets": MMDIT_LORA_TARGETS},
    "flux-schnell": {"label": "FLUX.1-schnell", "cls": "FluxTransformer2DModel", "config": FLUX1_SCHNELL,
                     "measured_as": "flux-dev",  # the guidance embedder aside (weights only), the same network
                     "base": {"num_layers": 1, "num_single_layers": 1}, "builds": {},
                     "full": {"double": 19 - 1, "single": 38 - 1}, "text": ("clip_l", "t5_xxl"), "text_tokens": 512,
                     "cfg": False, "T": 4, "targets": MMDIT_LORA_TARGETS},
    "zimage": {"label": "Z-Image-Turbo", "cls": "ZImageTransformer2DModel", "config": ZIMAGE_TURBO,
               "base": {"n_layers": 1, "n_refiner_layers": 1},
               "builds": {"layer": {"n_layers": 2, "n_refiner_layers": 1},
                          "refiner": {"n_layers": 1, "n_refiner_layers": 2}},
               "full": {"layer": 30 - 1, "refiner": 2 - 1}, "text": ("qwen3_4b",), "text_tokens": 128,
               "cfg": False, "T": 8, "targets": ZIMAGE_LORA_TARGETS},
}
LATENT_CHANNELS = 16  # all of them: the 16-channel VAE (SD3's; FLUX's, also Z-Image's)


def build_transformer(arch: str, build: str | None = None, *, dtype: torch.dtype = torch.bfloat16, meta: bool = False,
                      seed: int = 0) -> torch.nn.Module:
    """``arch``'s transformer: full depth (``build=None``), its reduced ``"base"`` build, or base + one block of a
    kind (``build`` a key of its ``builds``); at random init (``meta=True``: shapes only)."""
    import diffusers

    a = FLOW_ARCHS[arch]
    changes = {} if build is None else a["base"] if build == "base" else {**a["base"], **a["builds"][build]}
    with torch.device("meta"):
        model = getattr(diffusers, a["cls"])(**{**a["config"], **changes})
    return model if meta else _materialize(model, dtype, seed)


def build_flow_vae(meta: bool = True) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(**FLOW_VAE)
    return vae if meta else _materialize(vae, torch.bfloat16, 0)


def _text_encoder(name: str) -> torch.nn.Module:
    import transformers as tf

    if name == "clip_l":
        return tf.CLIPTextModel(tf.CLIPTextConfig(**CLIP_L_TEXT))
    if name == "clip_g":
        return tf.CLIPTextModelWithProjection(tf.CLIPTextConfig(**OPENCLIP_BIGG_TEXT))
    if name == "t5_xxl":
        return tf.T5EncoderModel(tf.T5Config(**T5_XXL_ENCODER))
    if name == "qwen3_4b":
        return tf.Qwen3Model(tf.Qwen3Config(**QWEN3_4B))
    raise ValueError(f"unknown text encoder {name!r}")


def flow_text_params(arch: str) -> int:
    """Parameters of ``arch``'s text encoders, counted on the meta device."""
    total = 0
    for name in FLOW_ARCHS[arch]["text"]:
        with torch.device("meta"):
            total += param_count(_text_encoder(name))
    return total


def linear_weight_params(model: torch.nn.Module, skip: Sequence[str] = ("lora_",)) -> int:
    """Elements of the weights of ``model``'s ``nn.Linear`` layers (what ``--base-precision`` quantizes)."""
    return sum(m.weight.numel() for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and not any(s in n for s in skip))


def flow_lora_params(model: torch.nn.Module, rank: int, targets: Sequence[str]) -> int:
    return sum(rank * (m.in_features + m.out_features) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and is_target(n, targets))


def flow_counts(lora_ranks: Sequence[int] = (4,)) -> dict[str, int]:
    """Parameter counts of the flow models, in the key pattern of ``memory_model.model_counts``
    (``unet_<arch>`` is the denoiser, ``unet_linear_<arch>`` its ``nn.Linear`` weights)."""
    counts: dict[str, int] = {}
    vae = param_count(build_flow_vae())
    for arch, a in FLOW_ARCHS.items():
        counts[f"vae_{arch}"] = vae
        tr = build_transformer(arch, meta=True)
        counts[f"unet_{arch}"] = stored_count(tr)
        counts[f"unet_linear_{arch}"] = linear_weight_params(tr)
        counts[f"text_{arch}"] = flow_text_params(arch)
        for r in lora_ranks:
            counts[f"lora_{arch}_r{r}"] = flow_lora_params(tr, r, a["targets"])
    return counts


def flow_inputs(arch: str, n: int, lat: int, dtype: torch.dtype = torch.bfloat16,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, callable]:
    """(x, call): a latent batch (n, 16, lat, lat) requiring grad and ``call(model, x)`` -> the model's output, as
    the adapters call the transformer (``SD3Denoiser``, ``FluxDenoiser``, ``ZImageDenoiser``), with random text
    features of the arch's length."""
    a = FLOW_ARCHS[arch]
    g = generator or torch.Generator().manual_seed(0)
    x = torch.randn(n, LATENT_CHANNELS, lat, lat, generator=g).requires_grad_(True)
    L = a["text_tokens"]
    if a["cls"] == "SD3Transformer2DModel":
        text = torch.randn(n, L, 4096, generator=g, dtype=dtype)
        pooled = torch.randn(n, 2048, generator=g, dtype=dtype)

        def call(m, x):
            return m(hidden_states=x.to(dtype), timestep=torch.full((n,), 500.0, dtype=dtype),
                     encoder_hidden_states=text, pooled_projections=pooled, return_dict=False)[0]
        return x, call
    if a["cls"] == "FluxTransformer2DModel":
        from rlr_backend.models.flux_model import latent_image_ids, pack_latents

        text = torch.randn(n, L, 4096, generator=g, dtype=dtype)
        pooled = torch.randn(n, 768, generator=g, dtype=dtype)
        guidance = torch.full((n,), 3.5) if a["config"]["guidance_embeds"] else None

        def call(m, x):
            return m(hidden_states=pack_latents(x).to(dtype), timestep=torch.full((n,), 0.5, dtype=dtype),
                     guidance=guidance, pooled_projections=pooled, encoder_hidden_states=text,
                     txt_ids=torch.zeros(L, 3, dtype=dtype), img_ids=latent_image_ids(lat, lat, "cpu", dtype),
                     return_dict=False)[0]
        return x, call
    text = [torch.randn(L, 2560, generator=g, dtype=dtype) for _ in range(n)]

    def call(m, x):
        out = m(list(x.to(dtype).unsqueeze(2).unbind(0)), torch.full((n,), 0.5, dtype=dtype), text,
                return_dict=False)[0]
        return torch.stack(out)
    return x, call
