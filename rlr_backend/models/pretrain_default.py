"""Train the embedded default text-to-image model from a seed.

A tiny latent-diffusion model in diffusers ``StableDiffusionPipeline`` format,
trained on the procedural coloured-shapes dataset (:mod:`rlr_backend.data.shapes`,
training split of caption combinations only):

* ``tokenizer``: CLIP BPE tokenizer with OpenAI CLIP's vocabulary and ids
  (:mod:`rlr_backend.models.build_tokenizer`), ``model_max_length`` 16;
* ``text_encoder``: ``CLIPTextModel``, hidden size 32, 2 layers (trained jointly);
* ``vae``: ``AutoencoderKL`` with block channels (16, 32): 32x32x3 images <-> 16x16x4
  latents, trained first for reconstruction;
* ``unet``: ``UNet2DConditionModel`` with block channels (32, 64), cross-attention at
  8x8, about 1 M parameters;
* ``scheduler``: ``DDIMScheduler`` with Stable Diffusion's ``scaled_linear`` betas
  (0.00085 -> 0.012), epsilon prediction, 1000 training steps.

UNet training: AdamW, min-SNR-5 loss weighting, 10% empty captions (so
classifier-free guidance works), EMA of the UNet and text-encoder weights (the
EMA weights are saved), warm-up + cosine learning-rate schedule.  Everything is
seeded; on one thread the run is reproducible.

Usage (about an hour on one CPU thread with the defaults)::

    python -m rlr_backend.models.pretrain_default --out rlr_backend/assets/default_model --seed 0

The tokenizer files are taken from ``--tokenizer-from`` (a folder with
``vocab.json`` and ``merges.txt``; default: the committed default model's
tokenizer) or built from an ``open_clip_torch`` wheel given with ``--bpe-wheel``.
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rlr_backend.data import shapes
from rlr_backend.models.pretrain_common import (
    MODEL_MAX_LENGTH,
    atomic_folder,
    cosine_lr,
    ema_decay_at,
    ema_update,
    images_to_tensor,
    setup_logging,
    train_batch,
    write_tokenizer_folder,
)

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- components
def make_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=shapes.IMAGE_SIZE,
    )


def make_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        projection_dim=32,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(cfg)


def make_unet(cross_attention_dim: int = 32):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=shapes.IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def make_tokenizer(tokenizer_from: str | None, bpe_wheel: str | None, workdir: Path):
    """A CLIPTokenizer with OpenAI CLIP ids, from existing vocab/merges files or a wheel."""
    from transformers import CLIPTokenizer

    src = None
    if tokenizer_from and (Path(tokenizer_from) / "vocab.json").is_file() and (Path(tokenizer_from) / "merges.txt").is_file():
        src = Path(tokenizer_from)
    elif bpe_wheel:
        from rlr_backend.models import build_tokenizer

        hits = sorted(glob.glob(bpe_wheel))
        if not hits:
            raise FileNotFoundError(f"no open_clip_torch wheel matches {bpe_wheel!r}; run: pip download --no-deps -d /tmp/oc open_clip_torch")
        src = workdir / "tokenizer_src"
        build_tokenizer.write_tokenizer_files(build_tokenizer.read_bpe_from_wheel(hits[-1]), src)
    else:
        raise FileNotFoundError(
            f"no tokenizer files in {tokenizer_from!r} and no --bpe-wheel given; "
            "run: pip download --no-deps -d /tmp/oc open_clip_torch, then pass --bpe-wheel '/tmp/oc/open_clip_torch-*.whl'"
        )
    tok = CLIPTokenizer.from_pretrained(str(src), model_max_length=MODEL_MAX_LENGTH)
    return tok, src


# ----------------------------------------------------------------------------- helpers
def train_vae(vae, rng: np.random.Generator, steps: int, batch_size: int = 32, lr: float = 1e-3, kl_weight: float = 1e-4):
    """Reconstruction training (MSE + small KL) on training-split images."""
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, 50, lr)
        imgs, _, _ = shapes.make_batch(rng, batch_size, "train")
        x = images_to_tensor(imgs)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        mse = F.mse_loss(rec, x)
        kl = post.kl().mean() / x[0].numel()
        loss = mse + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            logger.info("vae step %d/%d mse %.5f kl %.3f (%.0fs)", step, steps, mse.item(), kl.item(), time.time() - t0)
    vae.eval()
    return mse.item()


@torch.no_grad()
def latent_scaling_factor(vae, rng: np.random.Generator, n: int = 512) -> float:
    imgs, _, _ = shapes.make_batch(rng, n, "train")
    z = vae.encode(images_to_tensor(imgs)).latent_dist.mean
    return float(1.0 / z.std())


def save_pipeline(out: Path, vae, text_encoder, tokenizer, tokenizer_src: Path, unet, scheduler, info: dict) -> None:
    """Save in StableDiffusionPipeline format (safetensors), atomically (temp dir + rename).

    The tokenizer folder holds vocab.json + merges.txt + tokenizer_config.json (the
    3.6 MB tokenizer.json that transformers 5 writes is dropped: it is rebuilt from the two
    files on load)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    with atomic_folder(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        write_tokenizer_folder(tmp / "tokenizer", tokenizer_src)
        (tmp / "rlr_training.json").write_text(json.dumps(info, indent=2))
    logger.info("saved pipeline to %s", out)


def _encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids)[0]


# ----------------------------------------------------------------------------- main training
def pretrain(
    out: str | Path,
    seed: int = 0,
    steps: int = 9000,
    vae_steps: int = 1000,
    batch_size: int = 32,
    lr: float = 2e-3,
    cfg_dropout: float = 0.1,
    snr_gamma: float = 5.0,
    ema_decay: float = 0.999,
    warmup: int = 200,
    save_every: int = 1000,
    max_minutes: float | None = None,
    stop_after: int | None = None,
    tokenizer_from: str | None = None,
    bpe_wheel: str | None = None,
) -> Path:
    out = Path(out)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    t_start = time.time()
    with tempfile.TemporaryDirectory() as wd:
        tokenizer, tok_src = make_tokenizer(tokenizer_from, bpe_wheel, Path(wd))
        tok_keep = Path(wd) / "tok_keep"
        tok_keep.mkdir()
        shutil.copy(tok_src / "vocab.json", tok_keep)
        shutil.copy(tok_src / "merges.txt", tok_keep)

        vae = make_vae()
        vae_mse = train_vae(vae, rng, vae_steps, batch_size)
        vae.requires_grad_(False)
        sf = latent_scaling_factor(vae, rng)
        vae.register_to_config(scaling_factor=sf)
        logger.info("vae reconstruction mse %.5f, latent scaling factor %.4f", vae_mse, sf)

        text_encoder = make_text_encoder()
        unet = make_unet(text_encoder.config.hidden_size)
        scheduler = make_scheduler()
        ema_unet, ema_te = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
        params = list(unet.parameters()) + list(text_encoder.parameters())
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
        alphas_cumprod = scheduler.alphas_cumprod
        snr = alphas_cumprod / (1 - alphas_cumprod)
        loss_w = torch.clamp(snr, max=snr_gamma) / snr  # min-SNR-gamma weights for epsilon prediction
        gen = torch.Generator().manual_seed(seed + 1)
        unet.train()
        text_encoder.train()
        n_params = sum(p.numel() for p in unet.parameters())
        logger.info("unet %.2f M params, text encoder %.2f M params", n_params / 1e6, sum(p.numel() for p in text_encoder.parameters()) / 1e6)

        def info(step):
            return {
                "seed": seed,
                "steps_done": step,
                "steps": steps,
                "vae_steps": vae_steps,
                "batch_size": batch_size,
                "lr": lr,
                "cfg_dropout": cfg_dropout,
                "snr_gamma": snr_gamma,
                "ema_decay": ema_decay,
                "vae_mse": vae_mse,
                "train_minutes": (time.time() - t_start) / 60,
                "torch_threads": torch.get_num_threads(),
                "split": "train (held-out combinations excluded; see rlr_backend.data.shapes.heldout_combinations)",
            }

        t0 = time.time()
        run_loss = 0.0
        step = 0
        for step in range(steps):
            for g in opt.param_groups:
                g["lr"] = cosine_lr(step, steps, warmup, lr)
            x, caps = train_batch(rng, batch_size, cfg_dropout)
            with torch.no_grad():
                z = vae.encode(x).latent_dist.sample(generator=gen) * sf
            noise = torch.randn(z.shape, generator=gen)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=gen)
            zt = scheduler.add_noise(z, noise, t)
            cond = _encode_prompts(tokenizer, text_encoder, caps)
            pred = unet(zt, t, cond).sample
            per = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
            loss = (per * loss_w[t]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            d = ema_decay_at(step, ema_decay)
            ema_update(ema_unet, unet, d)
            ema_update(ema_te, text_encoder, d)
            run_loss += loss.item()
            if (step + 1) % 100 == 0:
                el = time.time() - t0
                logger.info("step %d/%d loss %.4f lr %.2e %.3fs/step elapsed %.1f min", step + 1, steps, run_loss / 100, opt.param_groups[0]["lr"], el / (step + 1), el / 60)
                run_loss = 0.0
            stop = (max_minutes is not None and (time.time() - t_start) / 60 > max_minutes) or (stop_after is not None and step + 1 >= stop_after)
            if (save_every and (step + 1) % save_every == 0) or stop or step == steps - 1:
                save_pipeline(out, vae, ema_te, tokenizer, tok_keep, ema_unet, scheduler, info(step + 1))
            if stop:
                logger.warning("stopping at step %d of the %d-step schedule (--max-minutes / --stop-after)", step + 1, steps)
                break
    logger.info("done in %.1f min", (time.time() - t_start) / 60)
    return out


def main(argv: list[str] | None = None) -> None:
    from rlr_backend.models.default_model import DEFAULT_MODEL_DIR

    ap = argparse.ArgumentParser(description="Train the embedded default text-to-image model (tiny latent diffusion on coloured shapes).")
    ap.add_argument("--out", default=str(DEFAULT_MODEL_DIR), help="output folder (StableDiffusionPipeline format)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=9000, help="UNet/text-encoder training steps")
    ap.add_argument("--vae-steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--cfg-dropout", type=float, default=0.1, help="fraction of empty captions")
    ap.add_argument("--ema-decay", type=float, default=0.999)
    ap.add_argument("--save-every", type=int, default=1000)
    ap.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this wall time")
    ap.add_argument("--stop-after", type=int, default=None, help="stop (and save) after this many steps, keeping the learning-rate schedule of --steps")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--tokenizer-from", default=str(DEFAULT_MODEL_DIR / "tokenizer"), help="folder with vocab.json + merges.txt")
    ap.add_argument("--bpe-wheel", default="/tmp/oc/open_clip_torch-*.whl", help="open_clip_torch wheel (glob) to build the tokenizer from if --tokenizer-from has no files")
    args = ap.parse_args(argv)
    setup_logging()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok_from = args.tokenizer_from
    if Path(tok_from).resolve() == (Path(args.out) / "tokenizer").resolve() and not (Path(tok_from) / "vocab.json").is_file():
        tok_from = None
    pretrain(
        args.out,
        seed=args.seed,
        steps=args.steps,
        vae_steps=args.vae_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        cfg_dropout=args.cfg_dropout,
        ema_decay=args.ema_decay,
        save_every=args.save_every,
        max_minutes=args.max_minutes,
        stop_after=args.stop_after,
        tokenizer_from=tok_from,
        bpe_wheel=args.bpe_wheel,
    )


if __name__ == "__main__":
    main()
