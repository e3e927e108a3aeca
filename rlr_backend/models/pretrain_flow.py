"""Train the embedded flow-matching default model from a seed.

A tiny rectified-flow text-to-image model in diffusers ``StableDiffusion3Pipeline``
format, trained on the procedural coloured-shapes data (training split of caption
combinations only, as the UNet default), reusing the UNet default's trained parts:

* ``transformer``: ``SD3Transformer2DModel`` (MMDiT), patch 2 on the 16x16x4 latents
  (64 image tokens), inner dim 64 (2 heads of 32), 6 joint blocks, 0.89 M parameters;
* ``vae``: the UNet default's ``AutoencoderKL`` (frozen), same scaling factor,
  ``shift_factor`` 0;
* ``text_encoder`` and ``text_encoder_2``: ``CLIPTextModelWithProjection`` built from the
  UNet default's trained ``CLIPTextModel`` (frozen) with an identity projection;
  ``tokenizer``/``tokenizer_2``: its CLIP tokenizer; no T5 (``text_encoder_3`` null);
* ``scheduler``: ``FlowMatchEulerDiscreteScheduler``, 1000 training steps, shift 1.

The conditioning is exactly ``StableDiffusion3Pipeline.encode_prompt(...,
max_sequence_length=MAX_SEQUENCE_LENGTH)``: the penultimate hidden states of the two
CLIP encoders concatenated on channels (2 x 32 = the transformer's
``joint_attention_dim``), followed by ``MAX_SEQUENCE_LENGTH`` zero tokens where T5's
would be, and the two pooled outputs concatenated (64). It is computed once per caption
(the encoders are frozen).

Objective (rectified flow, shared/reference/flow-matching.md section 1):
x_sigma = (1 - sigma) x0 + sigma eps, the model predicts v = eps - x0 at time input
sigma * 1000, plain MSE. sigma is drawn logit-normal (sigmoid of a standard normal; SD3's
choice): it spends the samples on the middle noise levels, where the velocity is hard to
predict, rather than near sigma = 0 or 1, where it is nearly eps or eps - E[x0]. 10 %
empty captions for classifier-free guidance, AdamW with warm-up + cosine learning rate,
EMA of the transformer (the EMA weights are saved). Everything is seeded; on one thread
the run is reproducible, and ``--resume`` continues an interrupted run from its last
checkpoint (``<out>.resume``, safetensors + JSON) bit for bit.

Usage::

    python -m rlr_backend.models.pretrain_flow --out rlr_backend/assets/default_flow_model --seed 0
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rlr_backend.data import shapes
from rlr_backend.models.pretrain_common import (
    atomic_folder,
    cosine_lr,
    ema_decay_at,
    ema_update,
    setup_logging,
    train_batch,
    write_tokenizer_folder,
)
from rlr_backend.safe_io import load_tensors, save_tensors

logger = logging.getLogger(__name__)

#: T5 tokens the SD3 pipeline appends (as zeros, there being no T5) to the 16 CLIP tokens
MAX_SEQUENCE_LENGTH = 4

#: recommended sampling settings, written to the folder's rlr_defaults.json
SAMPLING_DEFAULTS = {"max_sequence_length": MAX_SEQUENCE_LENGTH, "num_inference_steps": 20, "guidance_scale": 4.0, "shift": 1.0,
                     # LoRAs made on it are labelled as its own (not "sd3": they fit no real SD3 model)
                     "base_model_version": "rlr_default_flow"}


@dataclass(frozen=True)
class FlowConfig:
    """The run's settings (recorded in rlr_training.json and the resume checkpoint)."""

    seed: int = 0
    steps: int = 6000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 200
    cfg_dropout: float = 0.1
    ema_decay: float = 0.999
    num_layers: int = 6
    num_heads: int = 2
    head_dim: int = 32
    patch_size: int = 2

    def __post_init__(self) -> None:
        small = [f"{k}={getattr(self, k)}" for k in ("steps", "batch_size", "num_layers", "num_heads", "head_dim", "patch_size") if getattr(self, k) < 1]
        if small:
            raise ValueError(f"these must be >= 1: {', '.join(small)}")
        if not (self.lr > 0 and 0 <= self.cfg_dropout < 1 and 0 <= self.ema_decay < 1 and self.warmup >= 0):
            raise ValueError(f"need lr > 0, 0 <= cfg_dropout < 1, 0 <= ema_decay < 1, warmup >= 0; got {self}")


# ----------------------------------------------------------------------------- components
def make_transformer(cfg: FlowConfig, text_dim: int):
    from diffusers import SD3Transformer2DModel

    latent = shapes.IMAGE_SIZE // 2
    return SD3Transformer2DModel(
        sample_size=latent,
        patch_size=cfg.patch_size,
        in_channels=4,
        out_channels=4,
        num_layers=cfg.num_layers,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.num_heads,
        joint_attention_dim=2 * text_dim,
        caption_projection_dim=cfg.num_heads * cfg.head_dim,
        pooled_projection_dim=2 * text_dim,
        pos_embed_max_size=latent // cfg.patch_size,
    )


def make_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SAMPLING_DEFAULTS["shift"])


def clip_with_projection(text_encoder):
    """A ``CLIPTextModelWithProjection`` with ``text_encoder``'s weights and an identity projection."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(**{k: v for k, v in text_encoder.config.to_dict().items() if k in CLIPTextConfig().to_dict()})
    cfg.projection_dim = cfg.hidden_size
    model = CLIPTextModelWithProjection(cfg)
    with torch.no_grad():
        model.text_model.load_state_dict(getattr(text_encoder, "text_model", text_encoder).state_dict())  # strict
        model.text_projection.weight.copy_(torch.eye(cfg.hidden_size))
    return model.eval().requires_grad_(False)


def load_default_parts(default_dir: str | Path):
    """(vae, text_encoder with projection, tokenizer, tokenizer source folder) of the UNet default."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    d = Path(default_dir)
    vae = AutoencoderKL.from_pretrained(str(d / "vae"), use_safetensors=True).eval().requires_grad_(False)
    vae.register_to_config(shift_factor=0.0)  # the SD3 pipeline decodes z / scaling + shift
    te = CLIPTextModel.from_pretrained(str(d / "text_encoder"), use_safetensors=True)
    tok = CLIPTokenizer.from_pretrained(str(d / "tokenizer"))
    return vae, clip_with_projection(te), tok, d / "tokenizer"


def make_pipeline(transformer, vae, text_encoder, tokenizer, scheduler=None):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler or make_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder,
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )


class CaptionCache:
    """``encode_prompt`` of each caption, computed once (the text encoders are frozen)."""

    def __init__(self, pipe, max_sequence_length: int = MAX_SEQUENCE_LENGTH):
        self.pipe, self.n, self.cache = pipe, max_sequence_length, {}

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        new = sorted({c for c in captions if c not in self.cache})
        if new:
            emb, _, pooled, _ = self.pipe.encode_prompt(new, None, None, do_classifier_free_guidance=False, max_sequence_length=self.n)
            self.cache.update({c: (emb[i], pooled[i]) for i, c in enumerate(new)})
        return torch.stack([self.cache[c][0] for c in captions]), torch.stack([self.cache[c][1] for c in captions])


def sample_sigmas(batch_size: int, gen: torch.Generator) -> torch.Tensor:
    """Logit-normal noise levels: sigmoid of a standard normal."""
    return torch.sigmoid(torch.randn(batch_size, generator=gen))


def flow_loss(transformer, z: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, emb: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """MSE between the predicted and the true velocity eps - x0 at x_sigma = (1 - sigma) x0 + sigma eps."""
    s = sigma.view(-1, 1, 1, 1)
    zt = (1 - s) * z + s * noise
    pred = transformer(hidden_states=zt, encoder_hidden_states=emb, pooled_projections=pooled, timestep=sigma * 1000).sample
    return F.mse_loss(pred, noise - z)


# ----------------------------------------------------------------------------- save / resume
#: components stored in float16 (diffusers and transformers load them as float32, their configs' dtype):
#: halves the folder; the VAE stays the UNet default's float32 file
FP16_COMPONENTS = ("transformer", "text_encoder", "text_encoder_2")


def _store_fp16(folder: Path) -> None:
    for f in folder.glob("*.safetensors"):
        tensors, meta = load_tensors(f)
        save_tensors({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, f, {**meta, "format": "pt"})


def save_pipeline(out: Path, pipe, tokenizer_src: Path, info: dict) -> None:
    """StableDiffusion3Pipeline folder (safetensors; ``FP16_COMPONENTS`` in float16) plus rlr_training.json and
    rlr_defaults.json, atomically."""
    with atomic_folder(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for c in FP16_COMPONENTS:
            _store_fp16(tmp / c)
        for t in ("tokenizer", "tokenizer_2"):
            write_tokenizer_folder(tmp / t, tokenizer_src)
        (tmp / "rlr_training.json").write_text(json.dumps(info, indent=2) + "\n")
        (tmp / "rlr_defaults.json").write_text(json.dumps(SAMPLING_DEFAULTS, indent=2) + "\n")
    logger.info("saved pipeline to %s", out)


def resume_path(out: Path) -> Path:
    return out.with_name(out.name + ".resume")


def save_resume(path: Path, cfg: FlowConfig, step: int, model, ema, opt, gen, rng, minutes: float) -> None:
    """Everything needed to continue bit for bit: weights, EMA, optimizer moments, RNG states."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    st = opt.state_dict()
    for i, s in st["state"].items():
        tensors.update({f"opt.{i}.{k}": torch.as_tensor(v) for k, v in s.items()})
    tensors["gen"] = gen.get_state()
    meta = {"config": asdict(cfg), "step": step, "minutes": minutes, "param_groups": st["param_groups"], "rng": rng.bit_generator.state}
    with atomic_folder(path) as tmp:
        save_tensors({k: v.contiguous() for k, v in tensors.items()}, tmp / "state.safetensors")
        (tmp / "state.json").write_text(json.dumps(meta))


def load_resume(path: Path, cfg: FlowConfig, model, ema, opt, gen, rng) -> tuple[int, float]:
    """Restore a ``save_resume`` checkpoint into the objects; return (steps done, minutes spent)."""
    meta = json.loads((path / "state.json").read_text())
    if meta["config"] != asdict(cfg):
        raise ValueError(f"{path} was written by another configuration ({meta['config']}); remove it or run with the same settings")
    t, _ = load_tensors(path / "state.safetensors")
    model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
    ema.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("ema.")})
    state: dict = {}
    for k, v in t.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    gen.set_state(t["gen"])
    rng.bit_generator.state = meta["rng"]
    return int(meta["step"]), float(meta["minutes"])


# ----------------------------------------------------------------------------- main training
def pretrain(
    out: str | Path,
    cfg: FlowConfig = FlowConfig(),
    default_dir: str | Path | None = None,
    save_every: int = 1000,
    max_minutes: float | None = None,
    stop_after: int | None = None,
    resume: bool = False,
) -> Path:
    from rlr_backend.models.default_model import DEFAULT_MODEL_DIR

    out = Path(out)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    vae, text_encoder, tokenizer, tok_src = load_default_parts(DEFAULT_MODEL_DIR if default_dir is None else default_dir)
    sf = float(vae.config.scaling_factor)
    transformer = make_transformer(cfg, text_encoder.config.hidden_size)
    ema = copy.deepcopy(transformer).requires_grad_(False)
    ema_pipe = make_pipeline(ema, vae, text_encoder, tokenizer)
    encode = CaptionCache(ema_pipe)
    params = list(transformer.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    logger.info("transformer %.3f M params", sum(p.numel() for p in params) / 1e6)

    start, minutes_before = 0, 0.0
    rpath = resume_path(out)
    if resume and (rpath / "state.json").is_file():
        start, minutes_before = load_resume(rpath, cfg, transformer, ema, opt, gen, rng)
        logger.info("resumed from %s at step %d (%.1f min spent)", rpath, start, minutes_before)
    t_start = time.time()

    def minutes() -> float:
        return minutes_before + (time.time() - t_start) / 60

    def info(step: int) -> dict:
        return {
            **asdict(cfg),
            "steps_done": step,
            "objective": "rectified flow, v = eps - x0, logit-normal(0, 1) sigma, time input sigma * 1000",
            "max_sequence_length": MAX_SEQUENCE_LENGTH,
            "vae_and_text_encoder": "the UNet default's (rlr_backend/assets/default_model), frozen",
            "train_minutes": minutes(),
            "torch_threads": torch.get_num_threads(),
            "split": "train (held-out combinations excluded; see rlr_backend.data.shapes.heldout_combinations)",
        }

    transformer.train()
    t0, run_loss = time.time(), 0.0
    for step in range(start, cfg.steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, cfg.steps, cfg.warmup, cfg.lr)
        x, caps = train_batch(rng, cfg.batch_size, cfg.cfg_dropout)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample(generator=gen) * sf
        noise = torch.randn(z.shape, generator=gen)
        sigma = sample_sigmas(cfg.batch_size, gen)
        emb, pooled = encode(caps)
        loss = flow_loss(transformer, z, noise, sigma, emb, pooled)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_update(ema, transformer, ema_decay_at(step, cfg.ema_decay))
        run_loss += loss.item()
        done = step + 1
        if done % 100 == 0:
            el = time.time() - t0
            logger.info("step %d/%d loss %.4f lr %.2e %.3fs/step elapsed %.1f min", done, cfg.steps, run_loss / 100, opt.param_groups[0]["lr"], el / (done - start), minutes())
            run_loss = 0.0
        stop = (max_minutes is not None and minutes() > max_minutes) or (stop_after is not None and done >= stop_after)
        if (save_every and done % save_every == 0) or stop or done == cfg.steps:
            save_pipeline(out, ema_pipe, tok_src, info(done))
            if done < cfg.steps:
                save_resume(rpath, cfg, done, transformer, ema, opt, gen, rng, minutes())
        if stop:
            logger.warning("stopping at step %d of the %d-step schedule (--max-minutes / --stop-after); --resume continues", done, cfg.steps)
            break
    else:
        if rpath.exists():
            shutil.rmtree(rpath)
    logger.info("done in %.1f min", minutes())
    return out


def main(argv: list[str] | None = None) -> None:
    from rlr_backend.models.default_model import DEFAULT_MODEL_DIR

    d = FlowConfig()
    ap = argparse.ArgumentParser(description="Train the embedded flow-matching default model (tiny SD3-style rectified flow on coloured shapes).")
    ap.add_argument("--out", required=True, help="output folder (StableDiffusion3Pipeline format)")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--cfg-dropout", type=float, default=d.cfg_dropout, help="fraction of empty captions")
    ap.add_argument("--ema-decay", type=float, default=d.ema_decay)
    ap.add_argument("--layers", type=int, default=d.num_layers)
    ap.add_argument("--heads", type=int, default=d.num_heads)
    ap.add_argument("--head-dim", type=int, default=d.head_dim)
    ap.add_argument("--save-every", type=int, default=1000)
    ap.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this wall time")
    ap.add_argument("--stop-after", type=int, default=None, help="stop (and save) after this many steps, keeping the learning-rate schedule of --steps")
    ap.add_argument("--resume", action="store_true", help="continue from <out>.resume if it is there")
    ap.add_argument("--default-model", default=str(DEFAULT_MODEL_DIR), help="the UNet default whose VAE and text encoder are reused")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args(argv)
    setup_logging()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        cfg = FlowConfig(seed=args.seed, steps=args.steps, batch_size=args.batch_size, lr=args.lr, cfg_dropout=args.cfg_dropout,
                         ema_decay=args.ema_decay, num_layers=args.layers, num_heads=args.heads, head_dim=args.head_dim)
    except ValueError as e:
        ap.error(str(e))
    pretrain(args.out, cfg, args.default_model, args.save_every, args.max_minutes, args.stop_after, args.resume)


if __name__ == "__main__":
    main()
