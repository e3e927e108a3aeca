"""Quality figures of the embedded flow-matching default model, next to the UNet default's.

Samples the held-out caption combinations (never seen in pretraining) with fixed seeds,
with this project's flow steps (:class:`rlr_backend.sampling.flow.FlowSchedule` on the
sigmas the model's diffusers scheduler gives, as the SD3 pipeline samples), classifies
them with the prompt-alignment classifier (:mod:`rlr_backend.models.eval_default`'s
measure) and times sampling against the UNet default in the same run::

    python -m rlr_backend.models.eval_flow                  # ODE and flow_sde eta 0.7 rows + the UNet row
    python -m rlr_backend.models.eval_flow --save-json rlr_backend/assets/default_flow_model/rlr_eval.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch

from rlr_backend.models.default_flow_model import DEFAULT_FLOW_MODEL_DIR, flow_sampling_defaults, load_flow_pipeline
from rlr_backend.models.eval_default import eval_prompts, match_rates, model_size_mb, save_grid
from rlr_backend.sampling.flow import FlowSchedule

logger = logging.getLogger(__name__)


@torch.no_grad()
def sample_flow(pipe, prompts: list[str], seeds: list[int], schedule: FlowSchedule, guidance_scale: float,
                max_sequence_length: int, batch_size: int = 16) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1], one per (prompt, seed): the initial latent and every step's noise are
    drawn from ``torch.Generator().manual_seed(seed)``, so a sample does not depend on its batch."""
    from rlr_backend.data import shapes

    tr, vae = pipe.transformer, pipe.vae
    side = shapes.IMAGE_SIZE // pipe.vae_scale_factor
    cfg = guidance_scale > 1
    out = []
    for i in range(0, len(prompts), batch_size):
        ps, gens = prompts[i : i + batch_size], [torch.Generator().manual_seed(s) for s in seeds[i : i + batch_size]]
        emb, neg, pooled, negp = pipe.encode_prompt(ps, None, None, do_classifier_free_guidance=cfg, max_sequence_length=max_sequence_length)
        if cfg:
            emb, pooled = torch.cat([neg, emb]), torch.cat([negp, pooled])
        x = torch.cat([torch.randn(1, tr.config.in_channels, side, side, generator=g) for g in gens])
        for k in range(schedule.num_steps):
            xin = torch.cat([x, x]) if cfg else x
            t = torch.full((xin.shape[0],), schedule.timesteps[k])
            v = tr(hidden_states=xin, encoder_hidden_states=emb, pooled_projections=pooled, timestep=t).sample
            if cfg:
                vu, vc = v.chunk(2)
                v = vu + guidance_scale * (vc - vu)
            noise = torch.cat([torch.randn(1, *x.shape[1:], generator=g) for g in gens]) if schedule.stds[k] > 0 else None
            x = schedule.step(k, v, x, noise).prev_sample
        z = x / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        out.append((vae.decode(z).sample / 2 + 0.5).clamp(0, 1).float())
    return torch.cat(out)


def evaluate_flow(model_dir: str | Path | None = None, n: int = 256, seed: int = 1234, kind: str = "ode", eta: float = 0.0,
                  num_inference_steps: int | None = None, guidance_scale: float | None = None, split: str = "heldout",
                  reward=None, grid: str | Path | None = None) -> dict:
    """Match rates of ``n`` samples of the flow default with the ``kind``/``eta`` step (defaults: rlr_defaults.json)."""
    from rlr_backend.rewards.alignment import PromptAlignmentReward

    model_dir = Path(DEFAULT_FLOW_MODEL_DIR if model_dir is None else model_dir)
    d = flow_sampling_defaults(model_dir)
    steps = int(d["num_inference_steps"] if num_inference_steps is None else num_inference_steps)
    g = float(d["guidance_scale"] if guidance_scale is None else guidance_scale)
    pipe = load_flow_pipeline(model_dir)
    reward = reward or PromptAlignmentReward()
    sched = FlowSchedule.from_diffusers(pipe.scheduler, steps, kind=kind, eta=eta)
    prompts, seeds = eval_prompts(n, split), [seed + i for i in range(n)]
    t0 = time.time()
    images = sample_flow(pipe, prompts, seeds, sched, g, int(d["max_sequence_length"]))
    dt = time.time() - t0
    if grid is not None:
        save_grid(images[:64], grid)
    return {"model_dir": str(model_dir), "n": n, "split": split,
            "sampler": f"flow {kind} {steps} steps, eta {eta}, CFG {g}, shift {pipe.scheduler.config.shift}",
            **match_rates(images, prompts, reward), "model_size_mb": round(model_size_mb(model_dir), 2),
            "sampling_seconds_per_image": dt / n, "torch_threads": torch.get_num_threads()}


def forward_time_ratio(flow_dir: str | Path | None = None, batch: int = 8, repeats: int = 20) -> dict:
    """Seconds per model call (batch ``batch``, conditional only) of the flow transformer and of the UNet
    default, interleaved in one run: a no-grad forward, and a forward + backward to the input (what a
    gradient through the chain costs per step, base weights frozen); and the flow / UNet ratios."""
    from rlr_backend.models.default_model import load_default_pipeline

    fp, up = load_flow_pipeline(flow_dir), load_default_pipeline()
    fp.transformer.requires_grad_(False)  # frozen base weights, as under a LoRA: the backward goes to the input
    up.unet.requires_grad_(False)
    n = int(flow_sampling_defaults(flow_dir)["max_sequence_length"])
    prompts = eval_prompts(batch)
    with torch.no_grad():
        emb, _, pooled, _ = fp.encode_prompt(prompts, None, None, do_classifier_free_guidance=False, max_sequence_length=n)
        cond = up.encode_prompt(prompts, "cpu", 1, False)[0]
    g = torch.Generator().manual_seed(0)
    xf, xu = torch.randn(batch, 4, 16, 16, generator=g), torch.randn(batch, 4, 16, 16, generator=g)
    tf, tu = torch.full((batch,), 500.0), torch.full((batch,), 500, dtype=torch.long)
    models = {"flow": lambda x: fp.transformer(hidden_states=x, encoder_hidden_states=emb, pooled_projections=pooled, timestep=tf).sample,
              "unet": lambda x: up.unet(x, tu, cond).sample}
    inputs = {"flow": xf, "unet": xu}
    spent = {(k, m): 0.0 for k in models for m in ("nograd", "grad")}
    for r in range(repeats + 2):
        for k, f in models.items():
            t0 = time.perf_counter()
            with torch.no_grad():
                f(inputs[k])
            t1 = time.perf_counter()
            x = inputs[k].clone().requires_grad_(True)
            f(x).square().mean().backward()
            t2 = time.perf_counter()
            if r >= 2:  # two warm-up rounds
                spent[k, "nograd"] += t1 - t0
                spent[k, "grad"] += t2 - t1
    s = {f"{k}_{m}_s": v / repeats for (k, m), v in spent.items()}
    return {"batch": batch, **s, "ratio": spent["flow", "nograd"] / spent["unet", "nograd"],
            "grad_ratio": spent["flow", "grad"] / spent["unet", "grad"],
            "flow_grad_over_nograd": spent["flow", "grad"] / spent["flow", "nograd"],
            "unet_grad_over_nograd": spent["unet", "grad"] / spent["unet", "nograd"], "torch_threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> None:
    from rlr_backend.models.default_model import DEFAULT_GUIDANCE, DEFAULT_NUM_STEPS
    from rlr_backend.models.eval_default import evaluate
    from rlr_backend.rewards.alignment import PromptAlignmentReward

    ap = argparse.ArgumentParser(description="Shape / colour match rates of the flow default on held-out caption combinations, "
                                             "and its sampling time against the UNet default's.")
    ap.add_argument("--model", default=str(DEFAULT_FLOW_MODEL_DIR))
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--steps", type=int, default=None, help="default: the folder's rlr_defaults.json")
    ap.add_argument("--guidance", type=float, default=None, help="default: the folder's rlr_defaults.json")
    ap.add_argument("--sde-eta", type=float, default=0.7, help="eta of the flow_sde row (CFG 1, as the UNet table's eta-1 row)")
    ap.add_argument("--no-unet", action="store_true", help="skip the UNet default's reference row")
    ap.add_argument("--grid", default=None, help="save the first 64 ODE samples as a PNG grid")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--save-json", default=None, help="write the results to this JSON file")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    reward = PromptAlignmentReward()
    rows = [evaluate_flow(args.model, args.n, args.seed, "ode", 0.0, args.steps, args.guidance, reward=reward, grid=args.grid),
            evaluate_flow(args.model, args.n, args.seed, "flow_sde", args.sde_eta, args.steps, 1.0, reward=reward),
            evaluate_flow(args.model, args.n, args.seed, "ode", 0.0, args.steps, args.guidance, "train", reward=reward)]
    res = {"rows": rows, "forward_call": forward_time_ratio(args.model)}
    if not args.no_unet:
        unet = evaluate(None, args.n, args.seed, DEFAULT_NUM_STEPS, DEFAULT_GUIDANCE)
        res["unet_reference"] = unet
        res["sampling_time_ratio_vs_unet"] = rows[0]["sampling_seconds_per_image"] / unet["sampling_seconds_per_image"]
    if args.save_json:
        Path(args.save_json).write_text(json.dumps(res, indent=2) + "\n")
    for r in rows + ([res["unet_reference"]] if "unet_reference" in res else []):
        print(f"{r['sampler']:<48} {r['split']:<8} shape {r['shape']:.1%} fg {r['fg']:.1%} bg {r['bg']:.1%} all {r['all']:.1%} "
              f"reward {r['mean_reward']:.3f} {r['sampling_seconds_per_image'] * 1000:.0f} ms/image {r['model_size_mb']:.2f} MB")
    f = res["forward_call"]
    print(f"one model call at batch {f['batch']}: flow {f['flow_nograd_s'] * 1000:.1f} ms, UNet {f['unet_nograd_s'] * 1000:.1f} ms, "
          f"ratio {f['ratio']:.2f}; with backward to the input: ratio {f['grad_ratio']:.2f}, grad/no-grad flow "
          f"{f['flow_grad_over_nograd']:.2f} UNet {f['unet_grad_over_nograd']:.2f}")


if __name__ == "__main__":
    main()
